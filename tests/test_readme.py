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
    figures = sorted((tmp_path/'nbs'/'images').glob('readme_*.png'))
    assert figures, "index.ipynb's figure must reach the README as a PNG, not as '<Figure ...>' text"
    assert '<Figure size' not in (ROOT/'README.md').read_text()
    for f in figures:                                   # the committed PNGs are the notebook's current figures
        assert (ROOT/'nbs'/'images'/f.name).read_bytes() == f.read_bytes(), f"{f.name} is out of date: run .ci/readme.py"
        assert f'](nbs/images/{f.name})' in (ROOT/'README.md').read_text()

def test_quick_start_has_two_commands():
    text = (ROOT/'README.md').read_text()
    block = text.split('## Quick start', 1)[1].split('```bash', 1)[1].split('```', 1)[0]
    cmds = [l for l in block.splitlines() if l.strip()]
    assert len(cmds) == 2
    assert 'constraints.txt' in cmds[0] and 'influence-nb demo' in cmds[0]
    assert 'constraints.txt' in cmds[1] and '.ci/test' in cmds[1]


def _section(text, title):
    return text.split(f'## {title}', 1)[1].split('\n## ', 1)[0]


def test_use_your_own_model_section_runs():
    "The README's 'Use your own model' example: its Python runs, and each shell command parses as the CLI's."
    import shlex, torch
    import influence_nb as inf
    from influence_nb.cli import build_parser
    sec = _section((ROOT/'README.md').read_text(), 'Use your own model')
    code = sec.split('```python\n', 1)[1].split('```', 1)[0]
    assert len(code.strip().splitlines()) <= 11
    torch.set_num_threads(1)
    ns = {}                                   # as a fresh script: the section brings its own imports
    exec(compile(code, 'README:Use your own model', 'exec'), ns)
    assert tuple(ns['scores'].total.shape) == (1, 100)
    assert type(ns['llama']).__name__ == 'LlamaForCausalLM' and all('.mlp.' in m for m in ns['factors'].modules)
    cmds = [l for l in sec.split('```bash\n', 1)[1].split('```', 1)[0].splitlines() if l.strip()]
    assert {c.split()[1] for c in cmds} == {'fit-factors', 'scan', 'top', 'score', 'self-scores', 'explore'}
    for c in cmds:
        args = build_parser().parse_args(shlex.split(c)[1:])
        assert args.model in ('my-llama', None) and args.command == c.split()[1]
