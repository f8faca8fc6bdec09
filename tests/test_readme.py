"README.md is generated from nbs/index.ipynb by .ci/readme.py (Quarto, needed by nbdev-readme, is unavailable)."
import subprocess, sys, shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def test_readme_in_step_with_index(tmp_path):
    (tmp_path/'nbs').mkdir()
    shutil.copy(ROOT/'nbs'/'index.ipynb', tmp_path/'nbs'/'index.ipynb')
    subprocess.run([sys.executable, str(ROOT/'.ci'/'readme.py'), str(tmp_path)], check=True)
    assert (tmp_path/'README.md').read_text() == (ROOT/'README.md').read_text(), \
        "README.md is out of date: run `python .ci/readme.py` after editing nbs/index.ipynb"

def test_quick_start_has_two_commands():
    text = (ROOT/'README.md').read_text()
    block = text.split('## Quick start', 1)[1].split('```bash', 1)[1].split('```', 1)[0]
    cmds = [l for l in block.splitlines() if l.strip()]
    assert len(cmds) == 2
    assert 'constraints.txt' in cmds[0] and 'influence-nb demo' in cmds[0]
    assert 'constraints.txt' in cmds[1] and '.ci/test' in cmds[1]
