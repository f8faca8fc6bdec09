"""The repository's readability rules (issue 18), checked over every notebook and module.

Each test lists every offender with its place, so a failure is a to-do list:
- no notebook code cell over 60 lines; no function or method in influence_nb/ over 60 lines (ast);
- a markdown line starting with `# ` is a title, allowed only as its cell's one heading (fenced code is not prose);
- no single-letter alias for a module of the package, no variable named `l` (PEP 8 E741: reads as 1 or I);
- no module imports the command line (`influence_nb.cli`); the curated `inf.__all__` resolves and 99_api names it;
- every file under influence_nb/assets is package data in pyproject.toml.
"""
import ast, fnmatch, json, re, tomllib
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
NBS, PKG = ROOT/'nbs', ROOT/'influence_nb'
MAX_LINES = 60


def notebooks():
    return sorted(NBS.glob('*.ipynb'))


def cells(path, kind):
    "`(index, source lines)` of the cells of `kind` ('code' or 'markdown') in a notebook."
    nb = json.loads(path.read_text(encoding='utf-8'))
    return [(i, ''.join(c['source']).splitlines()) for i, c in enumerate(nb['cells']) if c['cell_type'] == kind]


def modules():
    return sorted(p for p in PKG.rglob('*.py') if p.name != '_modidx.py')


def code_sources():
    "`(where, source)` of every module, test, benchmark and notebook code cell (notebook magics blanked)."
    out = [(str(p.relative_to(ROOT)), p.read_text(encoding='utf-8')) for p in modules()]
    out += [(str(p.relative_to(ROOT)), p.read_text(encoding='utf-8'))
            for d in ('tests', 'benchmarks') for p in sorted((ROOT/d).glob('*.py'))]
    for nb in notebooks():
        for i, lines in cells(nb, 'code'):
            src = '\n'.join('' if l.lstrip().startswith(('%', '!')) else l for l in lines)
            out.append((f'{nb.name} cell {i}', src))
    return out


def parsed(sources):
    for where, src in sources:
        try: yield where, ast.parse(src)
        except SyntaxError: continue       # a cell that is not plain Python (shell, magics) has nothing to check


def test_code_cells_are_short():
    long = [f'{nb.name} cell {i}: {len(lines)} lines' for nb in notebooks() for i, lines in cells(nb, 'code')
            if len(lines) > MAX_LINES]
    assert not long, f"{len(long)} code cells over {MAX_LINES} lines (split them into named steps):\n" + '\n'.join(long)


def test_functions_are_short():
    long = []
    for p in modules():
        for node in ast.walk(ast.parse(p.read_text(encoding='utf-8'))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES: long.append(f'{p.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines')
    assert not long, f"{len(long)} functions over {MAX_LINES} lines:\n" + '\n'.join(long)


def prose_lines(lines):
    "The lines of a markdown cell outside fenced code blocks."
    out, fence = [], None
    for line in lines:
        m = re.match(r'\s*(```|~~~)', line)
        if m and fence is None: fence = m.group(1); continue
        if m and line.strip().startswith(fence): fence = None; continue
        if fence is None: out.append(line)
    return out


def test_markdown_titles_are_titles():
    bad = []
    for nb in notebooks():
        for i, lines in cells(nb, 'markdown'):
            prose = prose_lines(lines)
            titles = [l for l in prose if l.startswith('# ')]
            headings = [l for l in prose if re.match(r'#{1,6} ', l)]
            if titles and len(headings) > 1:
                bad.append(f'{nb.name} cell {i}: {len(titles)} line(s) start with "# " among {len(headings)} headings, '
                           f'e.g. {titles[-1][:60]!r}')
    assert not bad, "markdown lines starting with '# ' render as titles; only a cell's one heading may:\n" + '\n'.join(bad)


def test_prose_lines_helper():
    assert prose_lines(['# Title', '```python', '# a comment', '```', 'text']) == ['# Title', 'text']
    assert prose_lines(['~~~', '# x', '~~~', '# y']) == ['# y']


def test_no_single_letter_module_aliases():
    bad = []
    for where, tree in parsed(code_sources()):
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                bad += [f'{where}:{node.lineno} import {a.name} as {a.asname}' for a in node.names
                        if a.name.startswith('influence_nb') and a.asname and len(a.asname) == 1]
            elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('influence_nb'):
                bad += [f'{where}:{node.lineno} from {node.module} import {a.name} as {a.asname}' for a in node.names
                        if a.asname and len(a.asname) == 1 and (PKG/node.module.replace('influence_nb', '', 1).lstrip('.').replace('.', '/')
                                                                 / f'{a.name}.py').exists()]
    assert not bad, "modules of the package imported under one-letter names (write the module's name):\n" + '\n'.join(bad)


def test_no_variable_named_l():
    bad = []
    for where, tree in parsed(code_sources()[:len(modules())]):
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id == 'l' and isinstance(node.ctx, ast.Store):
                bad.append(f'{where}:{node.lineno}')
            elif isinstance(node, ast.arg) and node.arg == 'l': bad.append(f'{where}:{node.lineno}')
    assert not bad, "variables named `l` in influence_nb/ (name what it is: `layer`, `line`, `lang`, ...):\n" + '\n'.join(bad)


def imported_modules(node, here:str) -> list[str]:
    "The dotted names of the modules an import statement in module `here` (e.g. 'influence_nb.search') may load."
    if isinstance(node, ast.Import): return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom): return []
    base = node.module or ''
    if node.level:                                   # relative: resolve against the importing module's package
        pkg = here.split('.')[:-node.level] if node.level <= here.count('.') else []
        base = '.'.join(pkg + ([node.module] if node.module else []))
    return [base] + [f'{base}.{a.name}' for a in node.names]


def test_imported_modules_helper():
    tree = ast.parse('from . import viz\nfrom .cli import main\nimport influence_nb.cli as cli\nfrom influence_nb import cli')
    got = [imported_modules(n, 'influence_nb.explorer') for n in tree.body]
    assert got == [['influence_nb', 'influence_nb.viz'], ['influence_nb.cli', 'influence_nb.cli.main'], ['influence_nb.cli'],
                   ['influence_nb', 'influence_nb.cli']]


def test_nothing_imports_the_cli():
    bad = []
    for p in modules():
        if p.name == 'cli.py': continue
        here = '.'.join(p.relative_to(ROOT).with_suffix('').parts)
        for node in ast.walk(ast.parse(p.read_text(encoding='utf-8'))):
            if any(m == 'influence_nb.cli' or m.startswith('influence_nb.cli.') for m in imported_modules(node, here)):
                bad.append(f'{p.relative_to(ROOT)}:{node.lineno}')
    assert not bad, "the CLI is the top of the layering; these modules import it:\n" + '\n'.join(bad)


def test_public_api_is_documented():
    import influence_nb as inf
    missing = [n for n in inf.__all__ if not hasattr(inf, n)]
    assert not missing, f"inf.__all__ names what `import influence_nb` does not define: {missing}"
    prose = '\n'.join('\n'.join(lines) for _, lines in cells(NBS/'99_api.ipynb', 'markdown'))
    undocumented = [n for n in inf.__all__ if not re.search(rf'`(inf\.)?{re.escape(n)}[`(]', prose)]
    assert not undocumented, f"99_api's prose does not present these public names (in backticks): {undocumented}"
    for n in ('tokenize', 'tokenize_pairs', 'fit_factors', 'pairwise_scores', 'self_scores', 'scan', 'load_bundled',
              'load_corpus', 'explorer'):
        assert n in inf.__all__, n


def test_assets_are_package_data():
    cfg = tomllib.loads((ROOT/'pyproject.toml').read_text(encoding='utf-8'))
    patterns = cfg['tool']['setuptools'].get('package-data', {}).get('influence_nb', [])
    files = [str(p.relative_to(PKG)) for p in sorted((PKG/'assets').glob('*')) if p.is_file()]
    assert files, "influence_nb/assets is empty: the explorer's CSS and the corpus datasheet template live there"
    undeclared = [f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in patterns)]
    assert not undeclared, f"not declared in [tool.setuptools.package-data] of pyproject.toml (a wheel would lack them): {undeclared}"


def test_import_leaves_scikit_learn_out():
    "scikit-learn (TF-IDF's transformer) is imported where TF-IDF scores are first needed, not by `import influence_nb`:\n    it was a large share of every command's start-up."
    import subprocess, sys
    code = "import sys, influence_nb, influence_nb.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'sklearn'))"
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == '[]', out
