"The nbdev settings live twice: pyproject.toml's [tool.nbdev] (read by nbdev 3) and settings.ini (nbdev-2 form)."
import configparser, re, tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def _norm(v):
    if isinstance(v, bool): return str(v)
    if isinstance(v, (list, tuple)): return ' '.join(map(str, v))
    return str(v)

def load():
    pp = tomllib.loads((ROOT/'pyproject.toml').read_text())
    ini = configparser.ConfigParser(); ini.read(ROOT/'settings.ini')
    return pp, ini['DEFAULT']

def test_nbdev_settings_agree():
    pp, ini = load()
    nb = pp['tool']['nbdev']
    missing = [k for k in nb if k not in ini]
    assert not missing, f"settings.ini lacks {missing}"
    diff = {k: (nb[k], ini[k]) for k in nb if _norm(nb[k]) != ini[k]}
    assert not diff, f"pyproject [tool.nbdev] and settings.ini disagree: {diff}"

def test_project_metadata_agrees():
    pp, ini = load()
    proj = pp['project']
    assert ini['lib_name'] == proj['name'] == ini['lib_path']
    assert ini['description'] == proj['description']
    assert ini['min_python'] == proj['requires-python'].lstrip('>=')
    assert ini['author'] == proj['authors'][0]['name'] and ini['author_email'] == proj['authors'][0]['email']
    assert ini['keywords'].split() == proj['keywords']
    assert ini['git_url'] == proj['urls']['Repository']
    init = (ROOT/'influence_nb'/'__init__.py').read_text()
    assert re.search(r'__version__ = "([^"]+)"', init).group(1) == ini['version']

def test_nbdev_reads_pyproject():
    from nbdev.config import get_config
    cfg = get_config(ROOT)
    assert cfg.config_file.name == 'pyproject.toml'
    assert cfg.lib_name == 'influence_nb' and cfg.tst_flags == 'notest slow'
    assert cfg.path('nbs_path') == ROOT/'nbs'

def test_constraints_pin_torch_cpu():
    lines = [l.strip() for l in (ROOT/'constraints.txt').read_text().splitlines() if l.strip() and not l.startswith('#')]
    pins = dict(l.split('==', 1) for l in lines)
    assert pins['torch'] == '2.13.0', "torch must stay pinned to the CPU wheel on disk"
    assert pins['nbdev'] == '3.3.26'
    assert all('==' in l for l in lines), "constraints.txt holds exact pins only"

def test_no_docs_url_that_does_not_exist():
    "nbdev appends `Docs: <url>` to every module docstring when a docs host is configured; none is published."
    pp, ini = load()
    assert 'Documentation' not in pp['project'].get('urls', {}) and 'doc_host' not in ini and 'doc_baseurl' not in ini
    stale = [p.name for p in (ROOT/'influence_nb').rglob('*.py') if 'github.io' in p.read_text(encoding='utf-8')]
    assert not stale, f"modules still name a docs URL (run nbdev-export): {stale}"
