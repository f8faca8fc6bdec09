"""Build the docs site: the notebooks' stored outputs plus the API of every exported module, rendered by Sphinx.

    python docs/build.py [--nbs nbs] [--out _docs] [--keep-src DIR]

Nothing is executed: each notebook page shows the outputs committed with it. The notebooks are first copied
into a temporary Sphinx source folder with nbdev's directive lines removed (`#| hide` cells dropped whole),
the index notebook becomes the home page with the navigation in reading order, and one API page per module
of `influence_nb` is written for `sphinx.ext.autodoc`. See docs/README.md for why Sphinx + MyST-NB.
"""
from __future__ import annotations
import argparse, ast, html, importlib, importlib.util, json, pkgutil, re, shutil, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT/'docs'
PKG = 'influence_nb'
DIRECTIVE = re.compile(r'^\s*#\s*\|\s*([\w-]+)\s*:?\s*(.*?)\s*$')
WIDGET_MIMES = ('application/vnd.jupyter.widget-view+json', 'application/vnd.jupyter.widget-state+json')


def directives(src: str) -> tuple[dict, str]:
    "nbdev/Quarto directives at the top of a code cell (`#| name [value]`), and the source without them."
    lines, found = src.splitlines(), {}
    i = 0
    while i < len(lines) and (not lines[i].strip() or DIRECTIVE.match(lines[i])):
        if m := DIRECTIVE.match(lines[i]): found[m.group(1).lower()] = m.group(2).lower()
        i += 1
    return found, '\n'.join(lines[i:]).strip('\n')


def clean_code_cell(cell: dict) -> dict | None:
    "The cell as the docs show it, or None when it is not shown at all."
    found, src = directives(''.join(cell['source']))
    if 'hide' in found or found.get('include') == 'false': return None
    tags = set(cell.get('metadata', {}).get('tags', []))
    if found.get('echo') == 'false' or 'hide_input' in found: tags.add('remove-input')
    if ('code-fold' in found and found['code-fold'] != 'false') or is_setup(src): tags.add('hide-input')
    outputs = [] if found.get('output') == 'false' else [clean_output(o) for o in cell.get('outputs', [])]
    outputs = [o for o in outputs if o is not None]
    if not src.strip() and not outputs: return None
    meta = {'tags': sorted(tags)} if tags else {}
    return dict(cell, source=src, outputs=outputs, metadata=meta)


SETTINGS = ('set_num_threads', 'filterwarnings', 'simplefilter', 'set_verbosity_error', 'set_verbosity_warning')

def is_setup(src: str) -> bool:
    """Only imports, thread/warning/log-level settings and module dunders (`__all__`, `__version__`): folded behind
    "Show code cell source", so that a page opens with its prose, not with the nbdev preamble of imports (99_api's
    re-exports and `__all__`; `transformers.logging.set_verbosity_error()` in 01_theory and 03_modules)."""
    try: body = ast.parse(src).body
    except SyntaxError: return False
    setting = lambda n: (isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
                         and ast.unparse(n.value.func).endswith(SETTINGS))
    dunder = lambda n: (isinstance(n, ast.Assign) and all(isinstance(t, ast.Name) and re.fullmatch(r'__\w+__', t.id)
                                                            for t in n.targets))
    return bool(body) and all(isinstance(n, (ast.Import, ast.ImportFrom)) or setting(n) or dunder(n) for n in body)


def clean_output(out: dict) -> dict | None:
    """Widget views are dropped: their JavaScript would come from a CDN, and their text fallback is a snapshot
    (`HBox(...)`, a progress bar at 0%) that means nothing on a static page. Printed text with colour codes becomes
    HTML (`ansi_html`)."""
    if 'data' in out and any(k in WIDGET_MIMES for k in out['data']): return None
    if out.get('output_type') == 'stream' and out.get('name') == 'stdout' and SGR.search(text := ''.join(out.get('text', ''))):
        return {'output_type': 'display_data', 'metadata': {},
                'data': {'text/html': ansi_html(text), 'text/plain': CSI.sub('', text)}}
    return out


SGR = re.compile(r'\x1b\[([0-9;]*)m')
CSI = re.compile(r'\x1b\[[0-9;?]*[A-Za-z]')      # every control sequence: colours, and cursor moves the page cannot show
BASIC = ('0,0,0', '205,49,49', '13,188,121', '229,229,16', '36,114,200', '188,63,188', '17,168,205', '229,229,229')


def ansi_html(text: str) -> str:
    """Text with ANSI colour codes (24-bit `38;2;r;g;b` and `48;2;r;g;b`, the eight basic colours, bold, resets) as
    a `<pre>` of styled spans. MyST-NB's own converter reads a 24-bit code as a basic colour (the `32m` ending
    `48;2;202;0;32m` as green), so `token_heatmap_ansi`'s heatmap would show the wrong colours on the site."""
    out, style, pos = [], {}, 0
    def emit(chunk):
        if not chunk: return
        css = ';'.join(f'{k}:{v}' for k, v in style.items())
        out.append(f'<span style="{css}">{html.escape(chunk)}</span>' if css else html.escape(chunk))
    text = CSI.sub(lambda m: m.group(0) if m.group(0).endswith('m') else '', text)   # only colours are drawn
    for m in SGR.finditer(text):
        emit(text[pos:m.start()]); pos = m.end()
        codes, i = [int(c) for c in m.group(1).split(';') if c] or [0], 0
        while i < len(codes):
            c, key = codes[i], 'color' if codes[i] in (38, 39) or 30 <= codes[i] <= 37 else 'background'
            if c == 0: style.clear()
            elif c == 1: style['font-weight'] = 'bold'
            elif c == 22: style.pop('font-weight', None)
            elif c in (39, 49): style.pop(key, None)
            elif 30 <= c <= 37 or 40 <= c <= 47: style[key] = f'rgb({BASIC[c % 10]})'
            elif c in (38, 48) and codes[i + 1:i + 2] == [2] and len(codes) >= i + 5:
                style[key] = 'rgb({},{},{})'.format(*codes[i + 2:i + 5]); i += 4
            elif c in (38, 48) and codes[i + 1:i + 2] == [5]: i += 2              # 256-colour codes: not used here, skipped
            i += 1
    emit(text[pos:])
    return '<pre class="inb-ansi">' + ''.join(out) + '</pre>'


def is_check(cell: dict) -> bool:
    "A code cell that only asserts (its source opens with `assert`): README.md (`.ci/readme.py`) and the home page leave it out."
    return cell['cell_type'] == 'code' and ''.join(cell['source']).lstrip().startswith('assert')


def clean_notebook(nb: dict, home: bool = False) -> dict:
    """Directive lines removed, hidden cells dropped, widget state removed, a Python kernelspec guaranteed; on the
    `home` page (index.ipynb, which README.md mirrors) the checks are left out too, as README.md leaves them out."""
    cells = []
    for c in nb['cells']:
        if home and is_check(c): c = None
        elif c['cell_type'] == 'code': c = clean_code_cell(c)
        elif c['cell_type'] == 'raw': c = None
        else: c = dict(c, metadata={k: v for k, v in c.get('metadata', {}).items() if k == 'tags'})
        if c is not None: cells.append(c)
    cells = title_first(cells)
    meta = {k: v for k, v in nb.get('metadata', {}).items() if k not in ('widgets',)}
    meta.setdefault('kernelspec', {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'})
    meta.setdefault('language_info', {'name': 'python'})
    return dict(nb, cells=cells, metadata=meta)


def title_first(cells: list[dict]) -> list[dict]:
    """The page opens with the notebook's title: cells above the first `# ` heading (nbdev's exported imports)
    move just below it, and any later `# ` heading becomes `## ` so that a page has one title in the navigation."""
    is_h1 = lambda line: re.match(r'#(?:[ \t]|$)', line) is not None
    t = next((i for i, c in enumerate(cells) if c['cell_type'] == 'markdown'
              and any(is_h1(l) for l in ''.join(c['source']).splitlines())), None)
    if t is None: return cells
    cells = [cells[t]] + cells[:t] + cells[t + 1:]
    out, seen = [], False
    for c in cells:
        if c['cell_type'] == 'markdown':
            lines, fenced = ''.join(c['source']).splitlines(keepends=True), False
            for j, line in enumerate(lines):
                if FENCE.match(line): fenced = not fenced
                if not fenced and is_h1(line):
                    if seen: lines[j] = '#' + line
                    seen = True
            c = dict(c, source=''.join(lines))
        out.append(c)
    return out


def title_of(nb: dict, default: str) -> str:
    "The notebook's first `# ` heading (its page title)."
    for c in nb['cells']:
        if c['cell_type'] == 'markdown':
            for line in ''.join(c['source']).splitlines():
                if line.startswith('# '): return line[2:].strip()
    return default


def nav_label(stem: str, title: str) -> str:
    "The navigation's label of a notebook page: its file name, which the prose uses (`26_scale`), then its title as text."
    return f"{stem} · {title.replace('`', '')}"


def md_cell(text: str, cell_id: str = 'docs-nav') -> dict:
    return {'cell_type': 'markdown', 'id': cell_id, 'metadata': {}, 'source': text}


def exported_module(nb: dict) -> str | None:
    "`influence_nb.<name>` of a notebook's `#| default_exp <name>` (None: it exports nothing)."
    for c in nb['cells']:
        if c['cell_type'] == 'code' and (m := re.search(r'^\s*#\s*\|\s*default_exp\s+([\w.]+)', ''.join(c['source']), re.M)):
            return f'{PKG}.{m.group(1)}'
    return None


def module_line(mod: str) -> str:
    "The line under a page's title that says where its names come from (the import cells are folded away)."
    if mod == f'{PKG}.__init__':   # 99_api writes the package's own __init__: what `import influence_nb as inf` gives
        return f"*The code on this page is `{PKG}` itself, `import {PKG} as inf` ({{doc}}`the API reference <api/index>`).*"
    return (f"*The code on this page is the module `{mod}` ({{doc}}`its API page <api/{mod}>`): `from {mod} import ...` "
            f"for any name defined here; `import influence_nb as inf` holds the main ones.*")


# ---- links: `06_scores` -> that notebook's page, `fit_factors` -> its API entry (as nbdev's docs do) ----------
CODE_SPAN = re.compile(r'(?<![\[`\w])`(\w[\w.]*)`(?![`\]])')
FENCE = re.compile(r'^\s*(```|~~~)')

def symbol_index() -> dict[str, str]:
    "Short names (`fit_factors`, `Scores.top`, `inf.fit_factors`) -> full dotted names, where unambiguous."
    from influence_nb._modidx import d
    seen: dict[str, set] = {}
    for mod, syms in d['syms'].items():
        for full in syms:
            short = full[len(mod) + 1:]
            if short.split('.')[0].startswith('_'): continue
            for key in (short, f'{mod}.{short}', full, f'inf.{short}'):
                seen.setdefault(key, set()).add(full)
    return {k: next(iter(v)) for k, v in seen.items() if len(v) == 1}


REPO_PATH = re.compile(r'(?<![\[`\w])`((?:benchmarks|tests|docs|data|nbs|\.ci)/[\w./-]*\w)`(?![`\]])')

def repository_url() -> str:
    "The repository's address (pyproject's `[project.urls] Repository`): a file of it that the prose names links there."
    import tomllib
    return tomllib.loads((ROOT/'pyproject.toml').read_text())['project']['urls']['Repository'].rstrip('/')

def link_markdown(text: str, pages: set[str], syms: dict[str, str], prefix: str = '', repo: str | None = None) -> str:
    """Backticked notebook names and exported symbols become links, and so do files of the repository (`benchmarks/README.md`)
    when `repo` is its address; fenced code blocks are left alone."""
    out, fenced = [], False
    for line in text.splitlines(keepends=True):
        if FENCE.match(line): fenced = not fenced
        if not fenced:
            def sub(m):
                name = m.group(1)
                if name in pages: return f'[`{name}`]({prefix}{name}.ipynb)'
                if name in syms: return f'{{py:obj}}`{name} <{syms[name]}>`'
                return m.group(0)
            line = CODE_SPAN.sub(sub, line)
            if repo: line = REPO_PATH.sub(lambda m: f'[`{m.group(1)}`]({repo}/blob/main/{m.group(1)})'
                                          if (ROOT/m.group(1)).exists() else m.group(0), line)
        out.append(line)
    return ''.join(out)


def link_notebook(nb: dict, pages: set[str], syms: dict[str, str]) -> dict:
    repo = repository_url()
    cells = [dict(c, source=link_markdown(''.join(c['source']), pages, syms, repo=repo)) if c['cell_type'] == 'markdown' else c
             for c in nb['cells']]
    return dict(nb, cells=cells)


# ---- API pages: one per module, rendered by sphinx.ext.autodoc (+ docments, see conf.py) -------------------
def modules() -> list[str]:
    "Every exported module of the package (private ones such as `_modidx` excluded), in name order."
    pkg = importlib.import_module(PKG)   # only the package itself: its submodules are imported by Sphinx
    names = [m.name for m in pkgutil.walk_packages(pkg.__path__, PKG + '.')
             if not any(p.startswith('_') for p in m.name.split('.')[1:])
             and not (m.ispkg and not Path(importlib.util.find_spec(m.name).origin).read_text(encoding='utf-8').strip())]
    return sorted(names)   # an empty subpackage __init__ (a bare folder of modules) gets no page of its own


def source_notebook(module: str) -> str | None:
    "The notebook a module is exported from, read from nbdev's header line in the module file."
    spec = importlib.util.find_spec(module)
    m = re.search(r'File to edit: \S*?nbs/([\w.-]+)\.ipynb', Path(spec.origin).read_text(encoding='utf-8'))
    return m.group(1) if m else None


def package_names() -> list[tuple[str, str]]:
    "(name, defining module) for each name `import influence_nb as inf` re-exports, read from __init__.py."
    import ast
    tree = ast.parse((ROOT/PKG/'__init__.py').read_text(encoding='utf-8'))
    return [(a.asname or a.name, f'{PKG}.{n.module}') for n in tree.body
            if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module for a in n.names]


def summary(module: str, name: str) -> str:
    "The first line of a public name's docstring (a constant: its value), escaped for a Markdown table cell."
    import inspect
    obj = getattr(importlib.import_module(module), name)
    text = (inspect.getdoc(obj) or '').split('\n')[0] if callable(obj) else f'`{repr(obj)[:70]}`'
    return text.replace('|', '\\|')


def api_pages(src: Path, mods: list[str]) -> list[str]:
    "Write api/index.md and api/<module>.md; return the page names in order."
    (src/'api').mkdir()
    pages, top = [], package_names()
    for mod in mods:
        nb = source_notebook(mod)
        origin = f'Defined, explained and tested in [`{nb}`](../{nb}.ipynb).\n\n' if nb else ''
        if mine := [n for n, m in top if m == mod]:   # the names most readers came for, before the module's entries in source order
            origin += ('Through `import influence_nb as inf`: ' + ', '.join(f'{{py:obj}}`inf.{n} <{mod}.{n}>`' for n in mine) +
                       '. Every name of the module follows, in the order of its notebook.\n\n')
        (src/'api'/f'{mod}.md').write_text(
            f'# `{mod}`\n\n{origin}```{{eval-rst}}\n.. automodule:: {mod}\n   :members:\n   :undoc-members:\n'
            '   :show-inheritance:\n```\n',
            encoding='utf-8')
        pages.append(f'api/{mod}')
    rows = '\n'.join(f'| {{py:obj}}`{n} <{m}.{n}>` | {{doc}}`{m} <{m}>` | {summary(m, n)} |' for n, m in package_names() if m in mods)
    toc = '\n'.join(p.split('/', 1)[1] for p in pages)
    (src/'api'/'index.md').write_text(
        '# API reference\n\nOne page per module of `influence_nb`, generated from the code the notebooks export: '
        'signatures, docstrings and the comment documenting each argument.\n\n'
        '## `import influence_nb as inf`\n\n| name | module | what it is |\n|---|---|---|\n' + rows +
        f'\n\n## Modules\n\n```{{toctree}}\n:maxdepth: 1\n\n{toc}\n```\n', encoding='utf-8')
    return ['api/index'] + pages


# ---- assembling the Sphinx source and building -------------------------------------------------------------
def copy_mathjax(static: Path):
    "MathJax 2 with its STIX web fonts, from the jupyter-server-mathjax wheel, so that pages need no CDN."
    import jupyter_server_mathjax
    def unused(folder, names):                 # SVG fonts (HTML-CSS output is used) and other languages' strings
        folder = Path(folder).as_posix()
        if folder.endswith('jax/output'): return ['SVG']
        if folder.endswith('static/localization'):
            return [n for n in names if n != 'en']
        return []
    shutil.copytree(Path(jupyter_server_mathjax.__file__).parent/'static', static/'mathjax', ignore=unused)


LOCAL_REF = re.compile(r'!\[[^\]]*\]\(\s*<?([^)\s>]+)|<img[^>]*\ssrc=["\']([^"\']+)')

def copy_local_files(nb: dict, nbs: Path, src: Path):
    "Images that markdown cells show from files beside the notebooks (e.g. `images/explorer.png`) go along."
    for c in nb['cells']:
        if c['cell_type'] != 'markdown': continue
        for m in LOCAL_REF.finditer(''.join(c['source'])):
            ref = m.group(1) or m.group(2)
            if re.match(r'^[a-z]+:', ref) or ref.startswith('/'): continue      # URLs, data:, attachment:
            f = (nbs/ref).resolve()
            if f.is_file() and f.is_relative_to(nbs):
                (src/ref).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, src/ref)


READ_FIRST = '99_api'   # the home page's reading order starts with the public API at a glance, then 00, 01, ...

def reading_order(stems: list[str]) -> list[str]:
    "The notebooks after the home page, in the order the navigation lists them: `READ_FIRST`, then by number."
    rest = sorted(s for s in stems if s not in ('index', READ_FIRST))
    return ([READ_FIRST] if READ_FIRST in stems else []) + rest


PACKAGE_CSS = ('explorer.css',)   # the package's own styles (influence_nb/assets), which conf.py's html_css_files names

def write_source(nbs: Path, src: Path) -> list[str]:
    "Fill `src` with conf.py, static files, the cleaned notebooks and the API pages; return all page names."
    shutil.copy2(DOCS/'conf.py', src/'conf.py')
    shutil.copytree(DOCS/'_static', src/'_static')
    for css in PACKAGE_CSS:   # explorer/viz HTML outputs (`inb-…` classes: badges, score bars, the top table) are styled by
        shutil.copy2(ROOT/PKG/'assets'/css, src/'_static'/css)   # the app's <style>, which lives in a dropped widget view
    copy_mathjax(src/'_static')
    paths = sorted(nbs.glob('*.ipynb'))
    if not any(p.stem == 'index' for p in paths): raise ValueError(f"--nbs {nbs}: no index.ipynb (the home page)")
    chapters = reading_order([p.stem for p in paths])
    labels = {p.stem: nav_label(p.stem, title_of(json.loads(p.read_text(encoding='utf-8')), p.stem)) for p in paths}
    pages, syms = {p.stem for p in paths}, symbol_index()
    api = api_pages(src, modules())
    for p in paths:
        raw = json.loads(p.read_text(encoding='utf-8'))
        nb = link_notebook(clean_notebook(raw, home=p.stem == 'index'), pages, syms)
        if (mod := exported_module(raw)) and nb['cells']:   # where this page's names are imported from, under its title
            nb['cells'].insert(1, md_cell(module_line(mod), 'docs-module'))
        if p.stem == 'index':   # the home page carries the navigation: notebooks in reading order, then the API
            nb['cells'].append(md_cell('```{toctree}\n:hidden:\n:caption: Notebooks\n\n' + '\n'.join(f'{labels[c]} <{c}>' for c in chapters) +
                                       '\n```\n\n```{toctree}\n:hidden:\n:caption: Reference\n\napi/index\n```\n'))
        (src/p.name).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')
        copy_local_files(nb, nbs, src)
    return ['index'] + chapters + api


def build(nbs: Path, out: Path, keep_src: Path | None = None) -> dict:
    "Build the site into `out` (replaced whole); return what was built."
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix='influence_nb_docs_') as tmp:
        src = keep_src or Path(tmp)/'src'
        if src.exists(): shutil.rmtree(src)
        src.mkdir(parents=True)
        pages = write_source(nbs, src)
        built = Path(tmp)/'build'/'html'     # MyST-NB writes its jupyter_execute/ beside the output folder
        warn = Path(tmp)/'warnings.txt'
        cmd = [sys.executable, '-m', 'sphinx', '-b', 'html', '-q', '-j', '1', '-E', '-d', str(Path(tmp)/'doctrees'),
               '-w', str(warn), str(src), str(built)]
        r = subprocess.run(cmd, cwd=ROOT)
        warnings = warn.read_text(encoding='utf-8') if warn.exists() else ''
        if r.returncode: raise SystemExit(f"sphinx-build failed (exit {r.returncode}):\n{warnings[-5000:]}")
        if failed := [l for l in warnings.splitlines() if 'failed to import' in l]:   # an API page would be empty
            raise SystemExit("the API pages need influence_nb and its dependencies importable by this Python "
                             "(pip install -c constraints.txt -e .):\n" + '\n'.join(failed[:5]))
        if out.exists(): shutil.rmtree(out)
        shutil.move(built, out)
    (out/'.nojekyll').touch()
    (out/'build_warnings.txt').write_text(warnings, encoding='utf-8')
    info = {'pages': pages, 'seconds': round(time.time() - t0, 1), 'warnings': len(re.findall(r': (?:WARNING|ERROR|SEVERE):', warnings))}
    (out/'build.json').write_text(json.dumps(info, indent=1) + '\n', encoding='utf-8')
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--nbs', type=Path, default=ROOT/'nbs', help='folder of the notebooks to render (stored outputs)')
    ap.add_argument('--out', type=Path, default=ROOT/'_docs', help='where the site goes (replaced)')
    ap.add_argument('--keep-src', type=Path, default=None, help='also keep the generated Sphinx source here')
    a = ap.parse_args(argv)
    if not a.nbs.is_dir(): ap.error(f"--nbs {a.nbs} is not a folder")
    info = build(a.nbs.resolve(), a.out.resolve(), a.keep_src and a.keep_src.resolve())
    print(f"docs: {len(info['pages'])} pages in {a.out} ({info['seconds']} s, {info['warnings']} Sphinx warnings: "
          f"{a.out}/build_warnings.txt)")


if __name__ == '__main__': main()
