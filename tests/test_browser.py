"""The explorer in a real browser: Voilà serves tests/browser/explorer_app.ipynb on localhost and Debian's
headless Chromium, driven by Playwright, uses it as a person would.

Needs Chromium at /usr/bin/chromium (or $INFLUENCE_NB_CHROMIUM) and the `browser` extra (voila, playwright);
`.ci/browser_setup.sh` installs all three. Without them the tests FAIL, saying what is missing (a check whose
input is missing is not a passed check). The second test serves the app on a user's own model: a tiny Llama with
its own tokenizer, trained on its own facts (tests/own_model.py), served by `influence-nb explore --model DIR
--corpus FILE --queries FILE` itself. Screenshots go to tests/artifacts/ (ignored by git).
"""
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT/'tests'/'browser'/'explorer_app.ipynb'
ARTIFACTS = ROOT/'tests'/'artifacts'
CHROMIUM = os.environ.get('INFLUENCE_NB_CHROMIUM', '/usr/bin/chromium')
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']
START_TIMEOUT = 120   # s: Voilà listening
APP_TIMEOUT = 240     # s: kernel started, notebook executed, app drawn
RUN_TIMEOUT = 300     # s: one query (the first one loads the model and the factors)


def _missing() -> list[str]:
    miss = [] if (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)) else [f"Chromium ({CHROMIUM})"]
    return miss + [m for m in ('voila', 'playwright') if importlib.util.find_spec(m) is None]

@pytest.fixture(scope='module', autouse=True)
def _requirements():   # module scope: checked before any other module fixture starts
    if _missing():
        pytest.fail(f"the browser test needs {', '.join(_missing())}: run `bash .ci/browser_setup.sh` "
                    "(apt chromium + pip install '.[browser]')", pytrace=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
    "One factor cache for the test process and the Voilà kernel: the test fits, the app loads."
    return tmp_path_factory.mktemp('influence_nb_cache')


def _serve(argv, tmp, cache_dir, name):
    "Start `argv(port)` (Voilà, or `influence-nb explore`) on a free localhost port; yield its URL; stop its process group."
    port = _free_port()
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', MPLBACKEND='Agg', PYTHONUNBUFFERED='1',
               INFLUENCE_NB_CACHE=str(cache_dir), INFLUENCE_NB_THREADS='1',
               JUPYTER_RUNTIME_DIR=str(tmp/'runtime'), JUPYTER_DATA_DIR=str(tmp/'data'),   # no user kernelspecs
               JUPYTER_CONFIG_DIR=str(tmp/'config'), JUPYTER_PLATFORM_DIRS='1')
    log_path = tmp/'voila.log'
    with open(log_path, 'w') as log:
        proc = subprocess.Popen(argv(port), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.time()
        while True:       # a TCP connect, not a GET: every GET of the page starts a kernel
            if proc.poll() is not None:
                pytest.fail(f"Voilà exited with code {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                socket.create_connection(('127.0.0.1', port), timeout=1).close(); break
            except OSError:
                if time.time() - t0 > START_TIMEOUT:
                    pytest.fail(f"Voilà did not listen on port {port} within {START_TIMEOUT} s:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.3)
        yield f'http://127.0.0.1:{port}/'
    finally:
        import signal
        try: os.killpg(proc.pid, signal.SIGTERM)             # the group: `explore` runs Voilà as its child
        except ProcessLookupError: pass
        try: proc.wait(15)
        except subprocess.TimeoutExpired: os.killpg(proc.pid, signal.SIGKILL); proc.wait(5)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(log_path, ARTIFACTS/f'voila-{name}.log')      # for reading after a CI failure


@pytest.fixture(scope='module')
def voila_url(tmp_path_factory, cache_dir):
    "Voilà serving the bundled-model app."
    voila = lambda port: [sys.executable, '-m', 'voila', str(APP), '--no-browser', f'--port={port}', '--Voila.ip=127.0.0.1']
    yield from _serve(voila, tmp_path_factory.mktemp('voila'), cache_dir, 'bundled')


@pytest.fixture(scope='module')
def expected(cache_dir):
    """What the app must show, computed here with the function the app calls (`run_query`, app defaults).
    This also fits the factors into the shared cache, so the app's first run only loads them."""
    import torch
    from influence_nb import cli
    from influence_nb.explorer import ExplorerSession, run_query
    old_env, old_threads = os.environ.get('INFLUENCE_NB_CACHE'), torch.get_num_threads()
    os.environ['INFLUENCE_NB_CACHE'] = str(cache_dir); torch.set_num_threads(1)
    try:
        assert cli.cache_dir() == cache_dir
        s = ExplorerSession()                                  # the app's defaults: 600-sequence fit, seed 0
        facts = [q for q in s.queries if q['kind'] == 'fact' and q['lang'] == 'en'
                 and {'forward', 'reverse'} <= set(q['orders_in_training'])]
        fact = facts[1]                                        # not the app's opening query: the test must pick it
        passages = sorted((q for q in s.queries if q['kind'] == 'passage'), key=lambda q: q['passage_count'])
        passage = passages[(len(passages) - 1) // 2]          # a mid-frequency passage (8 copies in the corpus)
        out = {}
        for q in (fact, passage):
            r = run_query(s, 'gpt2-s', q['id'], prefilter=True, candidates=300, k=5, strategy='ekfac')
            out[q['kind']] = (q, r)
        return out
    finally:
        torch.set_num_threads(old_threads)
        if old_env is None: os.environ.pop('INFLUENCE_NB_CACHE', None)
        else: os.environ['INFLUENCE_NB_CACHE'] = old_env


def _run(page, timeout_s) -> bool:
    "Press Run and wait for this run's outcome; True when it finished, False when the app showed an error."
    before = page.eval_on_selector('.inb-status', "e => { const s = e.querySelector('[data-run]'); return s ? +s.dataset.run : 0; }")
    page.click('.inb-run')
    n = before + 1
    page.wait_for_selector(f'.inb-status .inb-done[data-run="{n}"], .inb-status .inb-failed[data-run="{n}"]',
                           timeout=timeout_s * 1000)
    page.wait_for_selector('.inb-run:not([disabled])', timeout=30_000)
    return page.locator(f'.inb-status .inb-done[data-run="{n}"]').count() == 1


def _run_ok(page, query_id, timeout_s):
    "Run and require results for `query_id`."
    if not _run(page, timeout_s):
        pytest.fail(f"the app showed an error instead of results: {page.inner_text('.inb-error')}")
    assert page.locator(f'.inb-summary[data-query-id="{query_id}"]').count() == 1


def _pick_query(page, q):
    "Choose `q` as a person would: type a filter, then pick it in the dropdown."
    page.fill('.inb-filter input', q['fact_id'].split('.')[0] if q.get('fact_id') else q['kind'])
    option = page.locator('.inb-query select option', has_text=f"{q['id']} ·")
    option.wait_for(state='attached', timeout=30_000)
    assert page.locator('.inb-query select option').count() > 1, "the filter should leave several queries to pick from"
    page.select_option('.inb-query select', value=option.get_attribute('value'))
    page.wait_for_function("(c) => document.querySelector('.inb-completion input').value === c",
                           arg=q['completion'], timeout=30_000)


def _record_status(page):
    "Collect every text the status line shows (in window.inbStatus), to check the app reports progress."
    page.evaluate("""() => {
        window.inbStatus = [];
        const el = document.querySelector('.inb-status');
        new MutationObserver(() => window.inbStatus.push(el.innerText))
            .observe(el, {childList: true, subtree: true, characterData: true});
    }""")


def _screenshot(page, path):
    "The whole app: Voilà scrolls inside its own container, so grow the viewport to the app's height first."
    height = page.eval_on_selector('.inb-app', 'e => Math.ceil(e.getBoundingClientRect().bottom)') + 40
    page.set_viewport_size({'width': 1500, 'height': max(1000, height)})
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size({'width': 1500, 'height': 1000})


def _top_rows(page) -> list[dict]:
    return page.eval_on_selector_all('.inb-results tr.inb-row', """rows => rows.map(r => ({
        rank: r.dataset.rank, id: r.dataset.trainId, text: r.querySelector('.inb-text').innerText}))""")


def test_explorer_in_browser(voila_url, expected):
    from playwright.sync_api import sync_playwright
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    errors, external = [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={'width': 1500, 'height': 1000})
            page.on('pageerror', lambda e: errors.append(f"pageerror: {e}"))
            page.on('console', lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == 'error' else None)
            # Leaving a Voilà page posts a kernel shutdown that Voilà 0.5 refuses (403: no _xsrf in the beacon, voila#1458);
            # the kernel of a closed page is culled instead (`--MappingKernelManager.cull_idle_timeout`, `cli._serve_app`)
            shutdowns = []
            page.on('response', lambda r: shutdowns.append(r.url) if r.status == 403 and '/voila/api/shutdown/' in r.url else None)
            # This machine has no network. Voilà's page template links Font Awesome from a CDN; answer requests
            # for other hosts with an empty response so that the page (not the sandbox) is what is tested.
            def offsite(route):
                external.append(route.request.url)
                route.fulfill(status=200, body='', content_type='text/css' if route.request.url.endswith('.css') else 'text/plain')
            page.route(lambda url: not url.startswith(voila_url.rstrip('/')) and not url.startswith('data:'), offsite)

            page.goto(voila_url, wait_until='domcontentloaded', timeout=60_000)
            page.wait_for_selector('.inb-run', timeout=APP_TIMEOUT * 1000)
            assert page.locator('.inb-model select').input_value() == 'gpt2-s'

            # bad input is a message in the app, not a traceback
            page.fill('.inb-damping input', '-1')
            assert not _run(page, 60)
            assert 'Damping must be a positive' in page.inner_text('.inb-error')
            assert 'Traceback' not in page.inner_text('body')
            page.fill('.inb-damping input', '')
            page.fill('.inb-k input', '2.5')                                  # a number the box cannot use: said, not cut to 2
            assert not _run(page, 60)
            assert 'Top k must be a whole number from 1 to 50' in page.inner_text('.inb-error')
            assert page.input_value('.inb-k input') == '2.5'                  # what was typed stays, to be fixed
            page.fill('.inb-k input', '5')

            # a fact query: the top sequence is the one run_query ranks first, and it states the fact
            q, res = expected['fact']
            _pick_query(page, q)
            _record_status(page)
            _run_ok(page, q['id'], RUN_TIMEOUT)
            assert page.locator('.inb-error').count() == 0          # the damping message is gone
            rows = _top_rows(page)
            assert [r['id'] for r in rows] == res.top['id'].tolist()
            assert rows[0]['id'] == res.top.iloc[0]['id'] and res.top.iloc[0]['match'] == 'fact'
            assert q['completion'].strip() in rows[0]['text'], (q, rows[0])
            seen = page.evaluate('window.inbStatus')             # the status line moved through the stages
            assert any(t.startswith('Loading gpt2-s') for t in seen) and any(t.startswith('Scoring') for t in seen), seen
            assert 'Done' in page.inner_text('.inb-status')
            assert page.eval_on_selector('.inb-progress .progress-bar', 'e => e.style.width') == '100%'
            assert page.locator('.inb-results .inb-heatmap').count() == len(res.top)
            assert page.locator('.inb-results .inb-tok').count() == sum(len(t) for t in res.tokens)
            for sel in ('.inb-layer-chart', '.inb-tail-plot'):   # the figures arrived as real images
                assert page.eval_on_selector(sel, 'img => img.naturalWidth') > 100, sel
            _screenshot(page, ARTIFACTS/'explorer.png')

            # a memorised passage: the top rows are copies of it
            q, res = expected['passage']
            _pick_query(page, q)
            _run_ok(page, q['id'], RUN_TIMEOUT)
            rows = _top_rows(page)
            assert [r['id'] for r in rows] == res.top['id'].tolist() and res.top.iloc[0]['match'] == 'passage'
            first = page.locator('.inb-results .inb-heatmap').first.inner_text()   # the whole training text
            assert q['completion'].strip() in first.replace('↵', ''), (q, first)
            from influence_nb.explorer import _same_as
            same = _same_as(res.tokens, list(res.top.index))                 # copies of the passage: drawn once, named after
            assert page.locator('.inb-results .inb-heatmaps .inb-same').count() == len(same) > 0, same
            assert page.locator('.inb-results .inb-tok').count() == sum(len(t) for i, t in zip(res.top.index, res.tokens) if i not in same)
            assert page.locator('.inb-results .inb-same-text').count() == len(same)
            _screenshot(page, ARTIFACTS/'explorer_passage.png')

            # the header's link opens the page afresh (a new kernel) on the same query, the address saying which
            link = page.locator('.inb-summary a.inb-link')
            assert link.get_attribute('href') == f"?query={q['id']}&model=gpt2-s" and link.inner_text() == 'link to this query'
            link.click()
            page.wait_for_url(f"**?query={q['id']}&model=gpt2-s", timeout=30_000)
            page.wait_for_selector('.inb-run', timeout=APP_TIMEOUT * 1000)
            page.wait_for_function("(c) => document.querySelector('.inb-completion input').value === c",
                                   arg=q['completion'], timeout=30_000)
            assert page.locator('.inb-query select').input_value().startswith(f"{q['id']} ·")   # (the option's label: id · prompt)
            assert page.locator('.inb-results .inb-row').count() == 0
            assert page.locator('.inb-error').count() == 0 or not page.inner_text('.inb-error').strip()
        finally:
            browser.close()
    refused = 'console.error: Failed to load resource: the server responded with a status of 403 (Forbidden)'
    for _ in shutdowns:                                        # that refusal alone, once per page left
        if refused in errors: errors.remove(refused)
    assert len(shutdowns) <= 1 and not errors, "JavaScript errors in the page:\n" + "\n".join(errors)
    assert all('cdn.jsdelivr.net' in u for u in external), f"unexpected off-machine requests: {external}"


@pytest.fixture(scope='module')
def own(tmp_path_factory):
    "A user's model folder, corpus and queries (tests/own_model.py)."
    sys.path.insert(0, str(ROOT/'tests'))
    import own_model
    return own_model.build(tmp_path_factory.mktemp('own'))


@pytest.fixture(scope='module')
def own_url(tmp_path_factory, cache_dir, own):
    "`influence-nb explore --model DIR --corpus FILE --queries FILE` serving the app on the user's model."
    explore = lambda port: [sys.executable, '-c', 'import sys; from influence_nb.cli import main; sys.exit(main())', 'explore',
                            '--model', str(own['model']), '--corpus', str(own['corpus']), '--queries', str(own['queries']),
                            '--fit-sample', '0', '--port', str(port)]
    yield from _serve(explore, tmp_path_factory.mktemp('voila-own'), cache_dir, 'own')


def _open_app(browser, url, errors):
    "A page on the app at `url`, drawn: JavaScript errors go to `errors`, requests elsewhere (no network here) get an empty answer."
    page = browser.new_page(viewport={'width': 1500, 'height': 1000})
    page.on('pageerror', lambda e: errors.append(f"pageerror: {e}"))
    page.route(lambda u: not u.startswith(url.rstrip('/')) and not u.startswith('data:'), lambda route: route.fulfill(status=200, body=''))
    page.goto(url, wait_until='domcontentloaded', timeout=60_000)
    page.wait_for_selector('.inb-run', timeout=APP_TIMEOUT * 1000)
    return page


def test_explorer_on_own_llama_in_browser(own_url, own):
    "The app on a tiny Llama: opens on the first query, fits factors, and ranks the record stating the fact first."
    from playwright.sync_api import sync_playwright
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    errors = []
    q = own['query_records'][0]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = _open_app(browser, own_url, errors)
            assert page.locator('.inb-model select').input_value() == 'model'       # the folder's name
            assert page.locator('.inb-completion input').input_value() == q['completion']
            _run_ok(page, q['id'], RUN_TIMEOUT)
            rows = _top_rows(page)
            assert rows[0]['id'] == q['record'], rows
            assert 'positive score means' in page.inner_text('.inb-summary summary')  # the units, in one line on screen
            page.locator('.inb-units summary').click()                              # ... and the whole legend a click away
            assert 'exceed |log p|' in page.inner_text('.inb-units')
            assert page.locator('.inb-results .inb-heatmap').count() == len(rows)
            assert page.locator('.inb-heatmaps .inb-legend').count() == 1                # one shared scale
            _screenshot(page, ARTIFACTS/'explorer_llama.png')
            page.locator('.inb-scale button', has_text='A scale per row').click()      # each row its own scale and legend
            page.wait_for_function(f"document.querySelectorAll('.inb-heatmaps .inb-legend').length == {len(rows)}", timeout=30_000)
            assert 'do not compare across rows' in page.inner_text('.inb-heatmaps')
            _screenshot(page, ARTIFACTS/'explorer_llama_rows.png')
            page.locator('.inb-where button', has_text='On the token predicted').click()  # values on the token they predict
            page.wait_for_function("document.querySelector('.inb-heatmaps').innerText.includes('on the token it predicts')", timeout=30_000)
            assert page.locator('.inb-heatmaps .inb-legend').count() == len(rows)     # still a scale per row
        finally:
            browser.close()
    assert not errors, "JavaScript errors in the page:\n" + "\n".join(errors)


@pytest.fixture(scope='module')
def own_groups(own):
    "The user's queries in a file of their own field names, each with a region: four countries a group."
    rows = [{'key': q['id'], 'ask': q['prompt'], 'answer': q['completion'], 'region': 'north' if i < 4 else 'south'}
            for i, q in enumerate(own['query_records'])]
    path = own['corpus'].parent/'regions.jsonl'
    path.write_text(''.join(__import__('json').dumps(r) + '\n' for r in rows))
    return path, rows


@pytest.fixture(scope='module')
def own_group_url(tmp_path_factory, cache_dir, own, own_groups):
    "`influence-nb explore ... --prompt-field ... --group-by region --group north`: the app opening on a group."
    explore = lambda port: [sys.executable, '-c', 'import sys; from influence_nb.cli import main; sys.exit(main())', 'explore',
                            '--model', str(own['model']), '--corpus', str(own['corpus']), '--queries', str(own_groups[0]),
                            '--prompt-field', 'ask', '--completion-field', 'answer', '--query-id-field', 'key',
                            '--group-by', 'region', '--group', 'north', '--fit-sample', '0', '--port', str(port)]
    yield from _serve(explore, tmp_path_factory.mktemp('voila-groups'), cache_dir, 'groups')


def test_explorer_groups_in_browser(own_group_url, own, own_groups):
    """A group of queries picked and run as a person would: the app opens on the group 'north' (Source: 'A group'), lists
    its four queries with their log p, ranks first the four records that state their facts (each query's own record
    carries most of its row, shown under the score), and Source 'From queries file' lists the single queries again."""
    from playwright.sync_api import sync_playwright
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    errors, north = [], [r for r in own_groups[1] if r['region'] == 'north']
    want = {q['record'] for q in own['query_records'] if q['id'] in {r['key'] for r in north}}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = _open_app(browser, own_group_url, errors)
            assert page.locator('.inb-source button.mod-active').inner_text().strip() == 'A group'
            assert page.locator('.inb-prompt textarea').input_value().split('\n')[0] == f"{north[0]['ask']} →{north[0]['answer']}"
            _run_ok(page, 'north', RUN_TIMEOUT)
            assert page.locator('.inb-members li').count() == 4 and 'summed influence on its 4 queries' in page.inner_text('.inb-summary')
            rows = _top_rows(page)
            assert {r['id'] for r in rows[:4]} == want, rows
            assert page.locator('.inb-results .inb-by-query').count() == len(rows)
            _screenshot(page, ARTIFACTS/'explorer_group.png')
            page.locator('.inb-source button', has_text='From queries file').click()
            page.wait_for_function("document.querySelector('.inb-query select').options.length == 8", timeout=30_000)
            first = own['query_records'][0]['completion']      # the list comes before the pick's fields: wait for those too
            page.wait_for_function("v => document.querySelector('.inb-completion input').value === v", arg=first, timeout=30_000)
            assert page.locator('.inb-completion input').input_value() == first
        finally:
            browser.close()
    assert not errors, "JavaScript errors in the page:\n" + "\n".join(errors)
