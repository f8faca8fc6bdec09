"""The docs site: `bash .ci/docs` builds _docs/ from the notebooks' stored outputs and the package's API, and
Debian's headless Chromium, driven by Playwright, reads it from a localhost server with no network at all.

Needs Chromium at /usr/bin/chromium (or $INFLUENCE_NB_CHROMIUM) and playwright (the `browser` extra):
`.ci/browser_setup.sh` installs both. Unlike a skip, a missing one FAILS here: the site is a deliverable.
"""
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
             'import warnings; warnings.filterwarnings("ignore")', 'import warnings\nwarnings.simplefilter("ignore")']
    code = ['import torch\nx = torch.ones(1)', 'torch.set_num_threads(1)\nprint(1)', '', '# just a comment', 'import (']
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
    viz = (SITE/'09_viz.html').read_text(encoding='utf-8')                     # the terminal heatmap in its own colours
    assert '<span style="background:rgb(202,0,32);color:rgb(255,255,255)"> Vel</span>' in viz and '\x1b[' not in viz


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
