"""The docs site: `bash .ci/docs` builds _docs/ from the notebooks' stored outputs and the package's API, and
Debian's headless Chromium, driven by Playwright, reads it from a localhost server with no network at all.

Needs Chromium at /usr/bin/chromium (or $INFLUENCE_NB_CHROMIUM) and playwright (the `browser` extra):
`.ci/browser_setup.sh` installs both. Unlike a skip, a missing one FAILS here: the site is a deliverable.
"""
import html as html_lib
import functools
import http.server
import importlib.util
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urldefrag, urljoin

import pytest

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT/'_docs'
CHROMIUM = os.environ.get('INFLUENCE_NB_CHROMIUM', '/usr/bin/chromium')
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']
PAGES = ['index', '06_scores', '09_viz', '20_validation', '23_word_order']   # issue 14: each has a title + a figure
_spec = importlib.util.spec_from_file_location('influence_nb_docs_build', ROOT/'docs'/'build.py')
docs_build = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(docs_build)   # docs/build.py


@pytest.fixture(scope='module')
def site() -> dict:
    "A fresh build of _docs/ by the CI entry point itself."
    env = dict(os.environ, PYTHON=sys.executable)
    r = subprocess.run(['bash', str(ROOT/'.ci'/'docs')], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"bash .ci/docs failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    print(r.stdout.strip())
    return json.loads((SITE/'build.json').read_text())


def notebook(name: str) -> dict:
    return json.loads((ROOT/'nbs'/f'{name}.ipynb').read_text(encoding='utf-8'))


def expected_title(name: str) -> str:
    "The page title a reader must see: the notebook's first `# ` heading, without Markdown marks."
    title = docs_build.title_of(notebook(name), None)
    assert title, f"nbs/{name}.ipynb has no `# ` title heading"
    return re.sub(r'[`*]', '', title).strip()


# ---- the preprocessing, on a notebook made here (exact expectations) ------------------------------------------
def _code(src, outputs=()): return {'cell_type': 'code', 'source': src, 'metadata': {}, 'outputs': list(outputs),
                                    'execution_count': None}
def _md(src): return {'cell_type': 'markdown', 'source': src, 'metadata': {}}

def test_clean_notebook_hides_directives_and_keeps_outputs():
    png = {'output_type': 'display_data', 'data': {'image/png': 'iVBORw0KGgo=', 'text/plain': '<Figure>'}, 'metadata': {}}
    widget = {'output_type': 'display_data', 'metadata': {},
              'data': {'application/vnd.jupyter.widget-view+json': {'model_id': 'x'}, 'text/plain': 'HBox()'}}
    nb = {'cells': [_code('#| default_exp scores'), _code('#| export\nimport torch'), _md('# Scores\n\n> summary'),
                    _code('#| hide\nsecret = 1'), _code('#|  slow\n#| notest\nfig = plot()\nfig', [png]),
                    _code('w = slider()', [widget]), _md('# Second title\n#\ntext'), _code('#| echo: false\nx', [png]),
                    _code('#| output: false\nprint(1)', [png])],
          'metadata': {'widgets': {'state': {}}}, 'nbformat': 4, 'nbformat_minor': 5}
    out = docs_build.clean_notebook(nb)
    srcs = [c['source'] for c in out['cells']]
    assert srcs == ['# Scores\n\n> summary', 'import torch', 'fig = plot()\nfig', 'w = slider()', '## Second title\n##\ntext',
                    'x', 'print(1)']
    assert out['cells'][2]['outputs'] == [png]
    assert out['cells'][3]['outputs'] == []                                       # widget view: dropped
    assert out['cells'][5]['metadata'] == {'tags': ['remove-input']} and out['cells'][5]['outputs'] == [png]
    assert out['cells'][6]['outputs'] == []
    assert 'widgets' not in out['metadata'] and out['metadata']['kernelspec']['language'] == 'python'
    assert out['cells'][1]['metadata'] == {'tags': ['hide-input']}                # imports only: folded
    assert all(c.get('metadata', {}).get('tags') != ['hide-input'] for i, c in enumerate(out['cells']) if i != 1)


def test_only_setup_cells_are_folded():
    setup = ['import torch', 'from a import (b,\n    c)\nimport os', 'import torch\ntorch.set_num_threads(1)',
             'import warnings; warnings.filterwarnings("ignore")', 'import warnings\nwarnings.simplefilter("ignore")',
             'import transformers\ntransformers.logging.set_verbosity_error()',            # 03_modules' preamble
             '__version__ = "0.1"\nfrom a import b\n__all__ = [\'b\']']                   # 99_api: the re-exports
    code = ['import torch\nx = torch.ones(1)', 'torch.set_num_threads(1)\nprint(1)', '', '# just a comment', 'import (',
            '__all__ = [1]\nall_ = 2', 'x.__all__ = []', 'transformers.logging.set_verbosity_info()\nprint(1)']
    assert [docs_build.is_setup(s) for s in setup] == [True] * len(setup)
    assert [docs_build.is_setup(s) for s in code] == [False] * len(code)


def test_links_to_notebooks_and_symbols():
    syms = docs_build.symbol_index()
    assert syms['fit_factors'] == 'influence_nb.ekfac.fit_factors' == syms['inf.fit_factors']
    md = "See `06_scores`, `fit_factors` and `not_a_name`.\n```python\nfit_factors(m)  # `fit_factors`\n```\n"
    got = docs_build.link_markdown(md, {'06_scores'}, syms)
    assert got.splitlines()[0] == ("See [`06_scores`](06_scores.ipynb), {py:obj}`fit_factors <influence_nb.ekfac.fit_factors>`"
                                   " and `not_a_name`.")
    assert got.splitlines()[1:] == md.splitlines()[1:]                            # fenced code untouched
    # a file of the repository named in prose links to it there; a path that is no file of it stays as written
    md = "Numbers in `benchmarks/README.md`, not in `benchmarks/nowhere.md`.\n```\n`benchmarks/README.md`\n```\n"
    got = docs_build.link_markdown(md, set(), syms, repo='https://example.org/r')
    assert got.splitlines()[0] == ("Numbers in [`benchmarks/README.md`](https://example.org/r/blob/main/benchmarks/README.md),"
                                   " not in `benchmarks/nowhere.md`.")
    assert got.splitlines()[1:] == md.splitlines()[1:]
    assert docs_build.repository_url().startswith('https://')


# ---- the built site -------------------------------------------------------------------------------------------
def exported_modules() -> list[str]:
    "Every public module with code; a subpackage whose __init__ is empty (a folder of modules) has no page, its modules do."
    import influence_nb, importlib.util
    empty = lambda m: m.ispkg and not Path(importlib.util.find_spec(m.name).origin).read_text(encoding='utf-8').strip()
    return sorted(m.name for m in pkgutil.walk_packages(influence_nb.__path__, 'influence_nb.')
                  if not any(p.startswith('_') for p in m.name.split('.')[1:]) and not empty(m))


def test_site_has_every_notebook_and_module(site):
    nbs = sorted(p.stem for p in (ROOT/'nbs').glob('*.ipynb'))
    mods = exported_modules()
    assert len(site['pages']) >= 20 and len(site['pages']) == len(nbs) + len(mods) + 1
    for name in nbs: assert (SITE/f'{name}.html').is_file(), name
    for mod in mods:
        html = (SITE/'api'/f'{mod}.html').read_text(encoding='utf-8')
        for name in [n for n, m in docs_build.package_names() if m == mod]:   # `inf.*` names first, linked, above the entries
            assert html.index(f'inf.{name}') < html.index('<dl class="py'), f"api/{mod}.html does not open with inf.{name}"
        m = importlib.import_module(mod)
        for name in getattr(m, '__all__', []):                                    # every exported name documented
            assert f'id="{mod}.{name}"' in html, f"{mod}.{name} has no entry on api/{mod}.html"
    warnings = (SITE/'build_warnings.txt').read_text(encoding='utf-8')
    bad = [l for l in warnings.splitlines() if re.search(r'not readable|xref_missing|toc\.not_included|\[ref\.|'
                                                       r'failed to import|Unknown directive', l)]
    assert not bad, "the build lost content (a missing image, link target, page in no toctree or module):\n" + '\n'.join(bad[:10])
    home = (SITE/'index.html').read_text(encoding='utf-8')
    nav = re.findall(r'<a class="reference internal" href="([^"#]+)\.html">', home.split('sidebar-tree', 1)[1])
    order = ['99_api'] + [n for n in nbs if n not in ('index', '99_api')]        # README's "Start with `99_api`", then 00, 01, ...
    assert nav[:len(nbs)] == order + ['api/index'], "navigation is not in reading order"
    labels = dict(re.findall(r'<a class="reference internal" href="([^"#]+)\.html">([^<]*)</a>', home.split('sidebar-tree', 1)[1]))
    for name in order:                                                          # named as the prose names them: `26_scale`
        assert labels[name].startswith(f'{name} · ') and '`' not in labels[name], (name, labels[name])
    assert labels['13_cli'] == '13_cli · The influence-nb command', labels['13_cli']
    index = json.loads((ROOT/'nbs'/'index.ipynb').read_text(encoding='utf-8'))          # the home page shows what README.md shows:
    checks = [c for c in index['cells'] if docs_build.is_check(c)]                      # its checks stay in the notebook
    text = html_lib.unescape(re.sub(r'<[^>]+>', '', home))
    for c in checks: assert ''.join(c['source']).strip().splitlines()[0] not in text, f"check cell {c['id']} is on the home page"
    assert checks
    css = (SITE/'_static'/'influence_nb.css').read_text(encoding='utf-8')             # code wraps instead of running off the page
    assert re.search(r'\.highlight pre[^{]*\{[^}]*white-space:\s*pre-wrap', css)
    viz = (SITE/'09_viz.html').read_text(encoding='utf-8')                     # the terminal heatmap in its own colours
    assert '<span style="background:rgb(202,0,32);color:rgb(255,255,255)"> Vel</span>' in viz and '\x1b[' not in viz


def test_pages_open_with_prose(site):
    """Between a notebook page's title (and its `>` summary) and its first prose, every code cell is folded behind
    "Show code cell source": the nbdev preamble (imports, log levels, 99_api's re-exports and `__all__`) never
    stands between the reader and the page's first sentence. Read from the HTML, no browser needed."""
    from html.parser import HTMLParser
    class Opening(HTMLParser):
        "Classes of the article section's top-level children up to its first <p> or subsection."
        def __init__(self):
            super().__init__(); self.depth, self.sec, self.kids, self.done = 0, None, [], False
        def handle_starttag(self, tag, attrs):
            if tag in ('br', 'img', 'hr', 'input', 'meta', 'link'): return
            self.depth += 1
            cls = dict(attrs).get('class') or ''
            if self.sec is None and tag == 'section': self.sec = self.depth; return
            if self.sec is not None and not self.done and self.depth == self.sec + 1:
                if tag in ('p', 'section', 'ul', 'ol', 'table'): self.done = True
                else: self.kids.append((tag, cls))
        def handle_endtag(self, tag):
            if tag not in ('br', 'img', 'hr', 'input', 'meta', 'link'): self.depth -= 1
    unfolded = {}
    for name in sorted(p.stem for p in (ROOT/'nbs').glob('*.ipynb')):
        html = (SITE/f'{name}.html').read_text(encoding='utf-8')
        o = Opening(); o.feed(html.split('<article', 1)[1])
        cells = [c for t, c in o.kids if 'cell' in c.split()]
        if bad := [c for c in cells if 'tag_hide-input' not in c.split()]: unfolded[name] = bad
    assert not unfolded, f"pages whose opening code is not folded: {unfolded}"
    from bs4 import BeautifulSoup                                                 # furo's own dependency
    api = BeautifulSoup((SITE/'99_api.html').read_text(encoding='utf-8'), 'html.parser')
    reexports = [c for c in api.select('article div.cell') if '__all__ = [' in c.get_text()]
    assert reexports and all('tag_hide-input' in c['class'] for c in reexports), "99_api's re-exports are not folded"


def test_output_classes_are_styled(site):
    """The explorer's and viz's HTML outputs (top table, "states the fact" badges, score bars, token heatmaps) carry
    `inb-…` classes whose rules live in the package's influence_nb/assets/explorer.css. In a notebook the app's
    <style> is on the page; on the site that widget is dropped, so each page that uses such a class must link a
    stylesheet defining it (else the badge reads as plain text and the score bars vanish)."""
    asset = (ROOT/'influence_nb'/'assets'/'explorer.css').read_text(encoding='utf-8')
    defined = set(re.findall(r'\.(inb-[\w-]+)', asset))
    assert {'inb-badge', 'inb-bar', 'inb-top'} <= defined
    unstyled = {}
    for page in sorted(SITE.glob('*.html')):
        html = page.read_text(encoding='utf-8')
        used = {c for cls in re.findall(r'class="([^"]*)"', html) for c in cls.split() if c in defined}
        if not used: continue
        linked = ''.join((SITE/href.split('?')[0]).read_text(encoding='utf-8')
                         for href in re.findall(r'<link rel="stylesheet"[^>]*href="([^"]+\.css[^"]*)"', html)
                         if (SITE/href.split('?')[0]).is_file())
        if missing := sorted(c for c in used if f'.{c}' not in linked): unstyled[page.stem] = missing
    assert unstyled == {}, f"HTML outputs whose classes no linked stylesheet defines: {unstyled}"
    assert (SITE/'_static'/'explorer.css').read_text(encoding='utf-8') == asset


def test_dataclass_fields_documented(site):
    """A dataclass's fields (Scores.total, ScanResult.indices, Factors.tensors, ...) are listed by autodoc one entry
    each; each field's docment (its shape, its meaning) is on that entry rather than on an empty one below a
    parameter list that repeats it."""
    import dataclasses
    from bs4 import BeautifulSoup                                                 # furo's own dependency
    from fastcore.docments import docments
    def field_docs(cls):
        docs = docments(cls, full=True)
        return {f.name: docs[f.name]['docment'] for f in dataclasses.fields(cls) if docs.get(f.name, {}).get('docment')}
    empty, repeated, n = [], [], 0
    for mod in exported_modules():
        m = importlib.import_module(mod)
        classes = [getattr(m, c) for c in getattr(m, '__all__', []) if isinstance(getattr(m, c, None), type)]
        classes = [c for c in classes if dataclasses.is_dataclass(c) and c.__module__ == mod and field_docs(c)]
        if not classes: continue
        page = BeautifulSoup((SITE/'api'/f'{mod}.html').read_text(encoding='utf-8'), 'html.parser')
        for cls in classes:
            for field, doc in field_docs(cls).items():
                dt = page.find('dt', id=f'{mod}.{cls.__name__}.{field}'); n += 1
                if dt is None or not dt.find_next_sibling('dd').get_text(strip=True): empty.append(f'{cls.__name__}.{field}')
            params = page.find('dt', id=f'{mod}.{cls.__name__}').find_next_sibling('dd').find('dl', class_='field-list', recursive=False)
            names = {st.get_text() for st in params.find_all('strong')} if params else set()
            repeated += [f'{cls.__name__}.{f}' for f in names & set(field_docs(cls))]
    assert n >= 50 and not empty, f"dataclass fields shown without their docment: {empty[:10]}"
    assert not repeated, f"fields documented twice (parameter list and own entry): {repeated[:10]}"


# ---- in a browser ---------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def server(site):
    "Serve _docs/ on a free localhost port."
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a): pass
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(SITE)))
    t = threading.Thread(target=httpd.serve_forever, daemon=True); t.start()
    try: yield f'http://127.0.0.1:{httpd.server_address[1]}/'
    finally: httpd.shutdown(); httpd.server_close()


@pytest.fixture(scope='module')
def browser():
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.fail(f"Chromium not found at {CHROMIUM}: run `bash .ci/browser_setup.sh`")
    if importlib.util.find_spec('playwright') is None:
        pytest.fail("playwright is not installed: run `bash .ci/browser_setup.sh` (pip install '.[browser]')")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try: yield b
        finally: b.close()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r: return r.status, r.read().decode('utf-8', 'replace')
    except urllib.error.HTTPError as e: return e.code, ''


@pytest.mark.parametrize('name', PAGES)
def test_page_in_browser(name, server, browser):
    page = browser.new_page(viewport={'width': 1400, 'height': 1000})
    errors, external = [], []
    page.on('pageerror', lambda e: errors.append(str(e)))
    page.route(lambda url: not url.startswith(server) and not url.startswith('data:'),
               lambda route: (external.append(route.request.url), route.abort()))
    try:
        url = urljoin(server, f'{name}.html')
        assert page.goto(url, wait_until='load', timeout=60_000).status == 200
        title = expected_title(name)
        assert title in page.inner_text('article h1'), (title, page.inner_text('article h1'))
        assert title in page.title()

        # figures: every <img> decoded, and at least one of them a stored output
        imgs = page.eval_on_selector_all('article img', 'es => es.map(e => [e.currentSrc, e.complete, e.naturalWidth, e.naturalHeight])')
        broken = [i for i in imgs if not (i[1] and i[2] > 0 and i[3] > 0)]
        assert not broken, f"{name}: images that did not decode: {broken}"
        assert len(imgs) >= 1, f"{name}.html shows no figure: nbs/{name}.ipynb stores no image output"

        # nbdev directive lines never reach the page
        code = page.eval_on_selector_all('.cell_input pre', 'es => es.map(e => e.innerText)')
        assert not [l for c in code for l in c.splitlines() if re.match(r'\s*#\s*\|', l)]

        # math typeset by the MathJax copy in _static (no CDN)
        n_math = page.locator('article .math.notranslate').count()          # Sphinx's math nodes
        if n_math:
            page.wait_for_function("() => window.MathJax && MathJax.Hub && MathJax.Hub.queue.pending === 0 "
                                   "&& document.querySelector('article .math.notranslate .MathJax, article .math.notranslate .MathJax_Display')",
                                   timeout=60_000)
            typeset = page.eval_on_selector_all('article .math.notranslate', 'es => es.filter(e => e.querySelector(".MathJax, .MathJax_Display")).length')
            assert typeset == n_math and page.locator('article .MathJax_Error, article merror').count() == 0, (typeset, n_math)
        assert not external, f"{name}.html asked for off-site resources: {external[:5]}"
        assert not errors, errors

        # internal links resolve: the page exists (HTTP 200) and so does the #anchor
        hrefs = page.eval_on_selector_all('a[href]', 'es => es.map(e => e.href)')
        targets = {}
        for h in hrefs:
            if h.startswith(server): targets.setdefault(urldefrag(h)[0], set()).add(urldefrag(h)[1])
        assert len(targets) >= 10, targets                                       # navigation at least
        bad = []
        for target, frags in sorted(targets.items()):
            status, html = _get(target)
            if status != 200: bad.append((target, status)); continue
            bad += [(f'{target}#{f}', 'no such anchor') for f in frags if f and f'id="{f}"' not in html]
        assert not bad, f"{name}.html has broken internal links: {bad[:10]}"
    finally:
        page.close()


def test_colour_codes_become_html():
    "24-bit ANSI colours (the terminal heatmap) are styled spans on the site, text escaped; resets end a span."
    text = '\x1b[48;2;202;0;32m\x1b[38;2;255;255;255m Vel\x1b[0m<b>\x1b[1;31mx\x1b[22;39m y\x1b[0m\n'
    assert docs_build.ansi_html(text) == ('<pre class="inb-ansi"><span style="background:rgb(202,0,32);color:rgb(255,255,255)">'
                                          ' Vel</span>&lt;b&gt;<span style="font-weight:bold;color:rgb(205,49,49)">x</span> y\n</pre>')
    out = docs_build.clean_output({'output_type': 'stream', 'name': 'stdout', 'text': [text]})
    assert out['data']['text/plain'] == ' Vel<b>x y\n' and out['data']['text/html'] == docs_build.ansi_html(text)
    plain = {'output_type': 'stream', 'name': 'stdout', 'text': ['no colour\n']}
    assert docs_build.clean_output(plain) is plain
    assert docs_build.ansi_html('\x1b[2Ka\x1b[31mb\x1b[0m\x1b[K') == '<pre class="inb-ansi">a<span style="color:rgb(205,49,49)">b</span></pre>'
    err = {'output_type': 'stream', 'name': 'stderr', 'text': ['\x1b[31mwarning\x1b[0m\n']}
    assert docs_build.clean_output(err) is err                           # stderr keeps its own styling


def test_constants_say_what_they_hold(site):
    """An exported constant's comment on its line (`NAME = value   # what it holds`) is the text of its entry on the
    API page (autodoc reads only `#:` comments, so the docs build hands it these)."""
    from bs4 import BeautifulSoup
    page = BeautifulSoup((SITE/'api'/'influence_nb.data.html').read_text(encoding='utf-8'), 'html.parser')
    for name, words in (('IGNORE_INDEX', 'marks a token as not scored'), ('SCORE_LEGEND', 'printed under every table')):
        dt = page.find('dt', id=f'influence_nb.data.{name}')
        assert dt is not None and words in dt.find_next_sibling('dd').get_text(), name


def test_each_page_says_where_its_names_come_from(site):
    """The import cells are folded away, and most names a page defines are not in `influence_nb` itself: under its title,
    a page that exports a module names it and links its API page; the index (which exports nothing) does not."""
    from bs4 import BeautifulSoup
    page = BeautifulSoup((SITE/'07_tfidf.html').read_text(encoding='utf-8'), 'html.parser')
    line = next(p for p in page.find_all('p') if 'The code on this page is the module' in p.get_text())
    assert 'influence_nb.tfidf' in line.get_text() and line.find('a')['href'].endswith('api/influence_nb.tfidf.html')
    assert 'The code on this page is the module' not in (SITE/'index.html').read_text(encoding='utf-8')


def test_api_pages_list_each_constant_once(site):
    "A documented constant is listed once per API page (under 'Constants'), not again among the members above."
    page = (SITE/'api'/'influence_nb.data.html').read_text(encoding='utf-8')
    assert page.count('id="influence_nb.data.IGNORE_INDEX"') == 1
