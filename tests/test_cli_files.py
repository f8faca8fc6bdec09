"""Issue 16, area 9: every file an `influence-nb` command reads is checked, and a bad one exits with 2 and a message
naming the option, the file, the line (or Parquet row) and the field at fault — never a traceback, a bare KeyError,
a JSON, codec, pyarrow or safetensors error. Area 1 (caches): the factor cache is keyed by the data's content.

The table below crosses each kind of bad file with every command that reads that kind of file (run through
`cli.main`, which is what the console script calls; one case also runs as a real subprocess)."""
import json, os, shutil, socket, subprocess, sys
import pandas as pd
import pytest
import torch

from randdata import cli_run, model_folder

GOOD = [f'The capital of country {i} is city {i} .' for i in range(12)]


run = cli_run


@pytest.fixture(scope='module')
def fx(tmp_path_factory):
    "A tiny GPT-2 folder with the project tokenizer, identity factors, good queries and a scan result."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    d = tmp_path_factory.mktemp('clifiles')
    model_folder(d, layers=1)
    (d/'corpus.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in GOOD))
    (d/'queries.jsonl').write_text(json.dumps({'id': 'a', 'prompt': 'The capital of country 1 is', 'completion': ' city 1'}) + '\n')
    assert run('fit-factors', '--model', d/'model', '--data', d/'corpus.jsonl', '--out', d/'factors', '--strategy', 'identity')[0] == 0
    rc, _, err = run('scan', '--model', d/'model', '--factors', d/'factors', '--queries', d/'queries.jsonl',
                     '--corpus', d/'corpus.jsonl', '--k', 12, '--out', d/'result.parquet', '--quiet')
    assert rc == 0, err
    yield d
    torch.set_num_threads(n)


# Bad corpus files: (name, bytes or a callable making the file, where the fault is)
def _parquet(df, cut=None):
    def make(p):
        df.to_parquet(p)
        if cut: p.write_bytes(p.read_bytes()[:cut])
    return make

GOOD_JSONL = ''.join(json.dumps({'text': t}) + '\n' for t in GOOD[:2]).encode()
CORPORA = [('empty', 'c.jsonl', b'', 'holds no records'),
           ('blank lines only', 'c.jsonl', b'\n \n', 'holds no records'),
           ('wrong JSON', 'c.jsonl', GOOD_JSONL + b'\n{"text": \n', 'line 4'),
           ('not an object', 'c.jsonl', GOOD_JSONL + b'["a"]\n', 'line 3'),
           ('missing field', 'c.jsonl', GOOD_JSONL + b'{"body": "x y z"}\n', 'line 3'),
           ('text not a string', 'c.jsonl', GOOD_JSONL + b'{"text": 5}\n', 'line 3'),
           ('input_ids not ints', 'c.jsonl', GOOD_JSONL + b'{"input_ids": "abc"}\n', 'line 3'),
           ('input_ids out of vocabulary', 'c.jsonl', GOOD_JSONL + b'{"input_ids": [1, 99999999]}\n', 'line 3'),
           ('non-UTF-8 JSONL', 'c.jsonl', GOOD_JSONL + b'{"text": "\xff\xfe"}\n', 'line 3'),
           ('non-UTF-8 text', 'c.txt', b'a b c d\n\n\xff\xfe x\n', 'line 3'),
           ('truncated Parquet', 'c.parquet', _parquet(pd.DataFrame({'text': GOOD}), cut=200), 'c.parquet'),
           ('Parquet without the column', 'c.parquet', _parquet(pd.DataFrame({'body': GOOD})), "'text'")]
# fit and score refuse a record with no scored token (scan scores it 0, by design: tests/README.md D6)
CORPORA_TRAIN = [('one-token record', 'c.jsonl', GOOD_JSONL + b'{"input_ids": [5]}\n', 'line 3'),
                 ('empty text', 'c.jsonl', GOOD_JSONL + b'\n{"text": ""}\n', 'line 4')]


def _write(d, name, body):
    p = d/'bad'/name
    p.parent.mkdir(exist_ok=True)
    if p.exists(): p.unlink()
    body(p) if callable(body) else p.write_bytes(body)
    return p


def _corpus_commands(fx, p):
    m, f, q = ['--model', fx/'model'], ['--factors', fx/'factors'], ['--queries', fx/'queries.jsonl']
    return {'fit-factors': ['fit-factors', *m, '--data', p, '--out', fx/'out-f', '--strategy', 'identity'],
            'score': ['score', *m, *f, *q, '--data', p, '--out', fx/'out.parquet'],
            'self-scores': ['self-scores', *m, *f, '--data', p, '--out', fx/'out.parquet', '--quiet'],
            'scan': ['scan', *m, *f, *q, '--corpus', p, '--out', fx/'out.parquet', '--quiet'],
            'explore': ['explore', *m, *f, *q, '--corpus', p, '--no-serve'],
            'top': ['top', '--result', fx/'result.parquet', '--corpus', p, '--k', 12]}


def refused(argv, *fragments):
    rc, out, err = run(*argv)
    assert rc == 2, f"exit {rc}, not 2: {err[-1500:]}"
    assert 'Traceback' not in err and 'failed:' not in err, err
    for frag in fragments: assert frag in err, f"{frag!r} not in: {err}"
    return err


# scan, top and explore accept a record with no scored token (its score is 0); explore and top meet ids outside the
# vocabulary only when scoring (scan names their line then) — those pairs are left out of the table, not skipped.
CORPUS_PAIRS = [(c, cmd) for c in CORPORA + CORPORA_TRAIN for cmd in ('fit-factors', 'score', 'self-scores', 'scan', 'explore', 'top')
                if (c not in CORPORA_TRAIN or cmd in ('fit-factors', 'score', 'self-scores'))
                and not (cmd in ('explore', 'top') and c[0] == 'input_ids out of vocabulary')]


@pytest.mark.parametrize('case, command', CORPUS_PAIRS, ids=[f'{c[0]}-{cmd}' for c, cmd in CORPUS_PAIRS])
def test_bad_corpus_file(fx, case, command):
    what, name, body, where = case
    p = _write(fx, name, body)
    refused(_corpus_commands(fx, p)[command], name, where)


QUERIES = [('empty', b'', 'holds no queries', None),
           ('wrong JSON', b'{"prompt": "a", "completion": " b"}\n{"prompt": \n', 'not valid JSON', 'line 2'),
           ('not an object', b'{"prompt": "a", "completion": " b"}\n3\n', 'must be a (prompt, completion) pair', 'line 2'),
           ('missing field', b'{"prompt": "a", "completion": " b"}\n{"prompt": "a"}\n', "no 'completion' field", 'line 2'),
           ('wrong type of field', b'{"prompt": "a", "completion": " b"}\n\n{"prompt": 5, "completion": " b"}\n', "field 'prompt' is a int", 'line 3'),
           ('wrong type of id', b'{"id": {"x": 1}, "prompt": "a", "completion": " b"}\n', "field 'id' is a dict", 'line 1'),
           ('empty completion', b'{"prompt": "a", "completion": " b"}\n{"prompt": "a", "completion": ""}\n', "field 'completion' is empty", 'line 2'),
           ('non-UTF-8', b'{"prompt": "a", "completion": " b"}\n{"prompt": "\xff", "completion": " b"}\n', 'not UTF-8', 'line 2'),
           ('longer than the context', b'{"prompt": "' + b'word ' * 80 + b'", "completion": " b"}\n', "context is 32", 'line 1'),
           ('ids without a scored token', b'{"input_ids": [1, 2, 3], "labels": [-100, -100, -100]}\n', 'no scored token', 'line 1'),
           ('ids not ints', b'{"input_ids": [1.5, 2.5]}\n', "field 'input_ids' has dtype", 'line 1'),
           ('duplicate ids', b'{"id": "a", "prompt": "a", "completion": " b"}\n{"id": "a", "prompt": "c", "completion": " d"}\n', 'more than once', None)]


# the explorer's queries are prompt/completion texts: token-id queries and their length are checked when one is run
QUERY_PAIRS = [(c, cmd) for c in QUERIES for cmd in ('score', 'scan', 'explore')
               if not (cmd == 'explore' and c[0] in ('longer than the context', 'ids without a scored token', 'ids not ints'))]


@pytest.mark.parametrize('case, command', QUERY_PAIRS, ids=[f'{c[0]}-{cmd}' for c, cmd in QUERY_PAIRS])
def test_bad_queries_file(fx, case, command):
    what, body, msg, where = case
    p = _write(fx, 'q.jsonl', body)
    m, f = ['--model', fx/'model'], ['--factors', fx/'factors']
    argv = {'score': ['score', *m, *f, '--queries', p, '--data', fx/'corpus.jsonl', '--out', fx/'out.parquet'],
            'scan': ['scan', *m, *f, '--queries', p, '--corpus', fx/'corpus.jsonl', '--out', fx/'out.parquet', '--quiet'],
            'explore': ['explore', *m, *f, '--queries', p, '--corpus', fx/'corpus.jsonl', '--no-serve']}[command]
    err = refused(argv, '--queries', 'q.jsonl', msg, *([where] if where else []))
    assert 'pairs[' not in err and 'record[' not in err, err                 # the file's line, not an internal index


def _factors_cases(fx):
    bad = fx/'bad'; bad.mkdir(exist_ok=True)
    out = {}
    out['missing folder'] = (bad/'nofactors', 'nofactors')
    (bad/'emptyfactors').mkdir(exist_ok=True); out['missing file'] = (bad/'emptyfactors', 'emptyfactors')
    for what, name, damage in [('corrupted JSON', 'factors.json', lambda b: b[:20]),
                               ('JSON not UTF-8', 'factors.json', lambda b: b'\xff\xfe' + b[2:]),
                               ('truncated tensors', 'factors.safetensors', lambda b: b[:60])]:
        d = bad/what.replace(' ', '_'); shutil.rmtree(d, ignore_errors=True); shutil.copytree(fx/'factors', d)
        (d/name).write_bytes(damage((d/name).read_bytes()))
        out[what] = (d, name)
    return out


@pytest.mark.parametrize('command', ['score', 'scan', 'explore'])
@pytest.mark.parametrize('what', ['missing folder', 'missing file', 'corrupted JSON', 'JSON not UTF-8', 'truncated tensors'])
def test_bad_factors_folder(fx, what, command):
    folder, name = _factors_cases(fx)[what]
    m, q = ['--model', fx/'model'], ['--queries', fx/'queries.jsonl']
    argv = {'score': ['score', *m, *q, '--factors', folder, '--data', fx/'corpus.jsonl', '--out', fx/'out.parquet'],
            'scan': ['scan', *m, *q, '--factors', folder, '--corpus', fx/'corpus.jsonl', '--out', fx/'out.parquet', '--quiet'],
            'explore': ['explore', *m, *q, '--factors', folder, '--corpus', fx/'corpus.jsonl', '--no-serve']}[command]
    refused(argv, '--factors', name)


@pytest.mark.parametrize('what', ['empty', 'truncated', 'not a scan result', 'missing'])
def test_bad_scan_result(fx, what):
    p = fx/'bad'/f'result-{what.replace(" ", "_")}.parquet'; p.parent.mkdir(exist_ok=True)
    if what == 'empty': p.write_bytes(b'')
    elif what == 'truncated': p.write_bytes((fx/'result.parquet').read_bytes()[:300])
    elif what == 'not a scan result': pd.DataFrame({'text': GOOD}).to_parquet(p)
    refused(['top', '--result', p], p.name)


@pytest.mark.parametrize('command', ['experiment', 'validate'])
@pytest.mark.parametrize('body, where', [(b'{"a": 1,\n "b": \n', 'line 3'), (b'[1, 2]\n', 'JSON list'), (b'\xff{}', 'not UTF-8')])
def test_results_file_of_experiment_and_validate(fx, command, body, where):
    "Both merge into their --out JSON file: a damaged one is refused before any work, naming it and the line."
    p = fx/'bad'/'results.json'; p.parent.mkdir(exist_ok=True); p.write_bytes(body)
    refused([command, '--out', p], 'results.json', where)


def test_subprocess_exit_code_and_no_traceback(fx):
    "The console script itself: exit status 2, the file and line on stderr, nothing on stdout, no traceback."
    p = _write(fx, 'q.jsonl', b'{"prompt": "a", "completion": " b"}\n{"prompt": "a", "completion": ""}\n')
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1'}
    r = subprocess.run([sys.executable, '-c', 'import sys; from influence_nb.cli import main; sys.exit(main())', 'scan',
                        '--model', fx/'model', '--factors', fx/'factors', '--queries', p, '--corpus', fx/'corpus.jsonl',
                        '--out', fx/'out.parquet', '--quiet'], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and 'q.jsonl, line 2' in r.stderr and "'completion' is empty" in r.stderr, r.stderr
    assert 'Traceback' not in r.stderr


def test_good_files_still_work(fx):
    "The same commands on good files succeed (the checks refuse only what is wrong)."
    pd.DataFrame({'text': GOOD}).to_parquet(fx/'good.parquet')
    (fx/'good.txt').write_text('\n\n'.join(GOOD) + '\n')                     # blank lines are skipped
    for p in (fx/'corpus.jsonl', fx/'good.parquet', fx/'good.txt'):
        for cmd, argv in _corpus_commands(fx, p).items():
            if cmd == 'explore': continue                                    # runs a query on the app: slower, covered elsewhere
            rc, out, err = run(*argv)
            assert rc == 0, (cmd, p.name, err[-2000:])


def test_factor_cache_key_follows_the_data(fx, tmp_path, monkeypatch):
    "Area 1: change one training record's text, keep the count and the file name: the cached factors are not reused."
    from influence_nb.explorer import ExplorerSession
    monkeypatch.setenv('INFLUENCE_NB_CACHE', str(tmp_path/'cache'))
    corpus = tmp_path/'train.jsonl'
    fit = lambda: ExplorerSession(fit_sample=0, model=fx/'model', corpus=corpus).factors('model', 'diagonal')
    corpus.write_text(''.join(json.dumps({'text': t}) + '\n' for t in GOOD))
    (f1, s1), (f2, s2) = fit(), fit()
    assert (s1, s2) == ('fitted', 'disk')
    corpus.write_text(''.join(json.dumps({'text': t.replace('city 7', 'town 7')}) + '\n' for t in GOOD))
    f3, s3 = fit()
    assert s3 == 'fitted'
    assert any(not torch.equal(f1.tensors[m]['diag'], f3.tensors[m]['diag']) for m in f1.modules)
    assert len(list((tmp_path/'cache'/'factors').iterdir())) == 2                # two keys: one per content


def test_factor_cache_tag_binds_data_and_every_weight(fx):
    "The tag `demo` and the explorer cache under: one token, or a weight outside the tracked layers, changes it."
    from influence_nb.explorer import factor_cache_tag
    from influence_nb.data import load_model, tokenize
    model, tok = load_model(fx/'model')
    seqs = tokenize(tok, GOOD, max_length=32)
    tag = factor_cache_tag('m', model, seqs)
    assert tag == factor_cache_tag('m', model, tokenize(tok, list(GOOD), max_length=32))         # deterministic
    edited = tokenize(tok, GOOD[:7] + [GOOD[7].replace('city', 'town')] + GOOD[8:], max_length=32)
    assert len(edited) == len(seqs) and factor_cache_tag('m', model, edited) != tag
    attn = model.transformer.h[0].attn.c_attn.weight                              # not a tracked (MLP) layer
    with torch.no_grad(): attn[0, 0] += 1.0
    try: assert factor_cache_tag('m', model, seqs) != tag
    finally:
        with torch.no_grad(): attn[0, 0] -= 1.0


def test_explore_serves_with_culling_and_stops_voila_on_sigterm(monkeypatch):
    """`explore` runs Voilà with kernel culling (a closed page's kernel holds the model and factors), and a SIGTERM to
    `influence-nb explore` stops Voilà too: a stranger found Voilà still serving, and every kernel alive, after both."""
    import signal
    from influence_nb import cli

    class FakeVoila:
        def __init__(self, argv): self.argv, self.returncode, self.calls = argv, None, []
        def wait(self, timeout=None):
            if self.returncode is None: signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)   # `kill` of explore's pid
            return self.returncode
        def poll(self): return self.returncode
        def terminate(self): self.calls.append('terminate'); self.returncode = -15

    made, before = [], signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli.subprocess, 'Popen', lambda argv, **kw: made.append(FakeVoila(argv)) or made[-1])
    assert cli._serve_app('app.ipynb', 8899) == -15 and made[0].calls == ['terminate']   # Voilà stopped, once
    assert f'--MappingKernelManager.cull_idle_timeout={cli.CULL_IDLE_S}' in made[0].argv and '--port=8899' in made[0].argv
    assert signal.getsignal(signal.SIGTERM) == before                  # this process's own handling is back


def test_score_scan_and_top_read_records_alike(fx):
    """From a reviewer: a Parquet int id column with nulls came out as '10.0' in `score` (pandas) and '10' in `top`
    (pyarrow); a JSON string line was a text to `scan` but a bad record to `score`; a null text field was called
    missing. One reader now: the same ids, the same records kept, and the field named as it is."""
    import pyarrow as pa, pyarrow.parquet as pq
    pq.write_table(pa.table({'id': pa.array([10, None, 12, 13], pa.int64()), 'text': GOOD[:4]}), fx/'ids.parquet')
    rc, _, err = run('score', '--model', fx/'model', '--factors', fx/'factors', '--queries', fx/'queries.jsonl',
                     '--data', fx/'ids.parquet', '--out', fx/'ids_scores.parquet')
    assert rc == 0, err
    assert pd.read_parquet(fx/'ids_scores.parquet').index.get_level_values('id').tolist() == ['10', '', '12', '13']
    (fx/'mixed.jsonl').write_text(json.dumps({'text': GOOD[0]}) + '\n' + json.dumps(GOOD[1]) + '\n' + json.dumps({'text': None}) + '\n')
    rc, _, err = run('score', '--model', fx/'model', '--factors', fx/'factors', '--queries', fx/'queries.jsonl',
                     '--data', fx/'mixed.jsonl', '--out', fx/'mixed_scores.parquet', '--skip-bad-records')
    assert rc == 0 and "line 3: 'text' is null, not a string" in err, err
    assert pd.read_parquet(fx/'mixed_scores.parquet').index.tolist() == [0, 1]          # the JSON string is a text, as in scan
    rc, out, err = run('scan', '--model', fx/'model', '--factors', fx/'factors', '--queries', fx/'queries.jsonl',
                       '--corpus', fx/'mixed.jsonl', '--out', fx/'mixed_scan.parquet', '--skip-bad-records', '--quiet')
    assert rc == 0 and "scanned 2 sequences (1 bad records skipped; the first, line 3 of mixed.jsonl: 'text' is null" in out, out + err


def test_a_bare_array_is_token_ids_to_every_command(fx):
    "From a stranger: `scan` scored a JSONL line `[1, 2, 3]` as token ids (as documented for `scan`), `score` refused it and `top`\n    could not show it. Now every command reads it as a sequence's token ids."
    ids = [464, 286, 1499, 11]
    (fx/'arr.jsonl').write_text(json.dumps({'text': GOOD[0]}) + '\n' + json.dumps(ids) + '\n')
    (fx/'arr_ids.jsonl').write_text(json.dumps({'text': GOOD[0]}) + '\n' + json.dumps({'input_ids': ids}) + '\n')
    common = ('--model', fx/'model', '--factors', fx/'factors', '--queries', fx/'queries.jsonl')
    for f in ('arr', 'arr_ids'):
        rc, _, err = run('score', *common, '--data', fx/f'{f}.jsonl', '--out', fx/f'{f}_s.parquet'); assert rc == 0, err
        rc, _, err = run('scan', *common, '--corpus', fx/f'{f}.jsonl', '--out', fx/f'{f}_r.parquet', '--quiet'); assert rc == 0, err
    assert pd.read_parquet(fx/'arr_s.parquet').equals(pd.read_parquet(fx/'arr_ids_s.parquet'))
    rc, out, err = run('top', '--result', fx/'arr_r.parquet', '--query', 'a', '--tokenizer', fx/'model')
    assert rc == 0 and 'The capital of country' in out, err
    (fx/'arr_txt.jsonl').write_text(json.dumps({'text': GOOD[0]}) + '\n' + json.dumps(['The capital', ' city']) + '\n')
    for cmd, flag in (('score', '--data'), ('scan', '--corpus')):              # an array of strings: said so, by every reader
        rc, _, err = run(cmd, *common, flag, fx/'arr_txt.jsonl', '--out', fx/'arr_txt.parquet')
        assert rc == 2 and 'line 2' in err and 'a JSON array, but not of token ids (integers)' in err, err


def test_query_ids_name_the_score_columns_everywhere(fx, tmp_path):
    "`score` names its columns by the query ids; `scan --scores-dir` now does too (through `read_scores`); an id that would\n    collide with the index is refused, and a duplicate made by a default id is explained."
    from influence_nb import read_scores
    q = [{'id': 'capital', 'prompt': 'The capital of country 1 is', 'completion': ' city 1'}, {'prompt': 'The capital of', 'completion': ' country 2'}]
    (tmp_path/'q.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in q))
    common = ('--model', fx/'model', '--factors', fx/'factors', '--queries', tmp_path/'q.jsonl')
    rc, _, err = run('score', *common, '--data', fx/'corpus.jsonl', '--out', tmp_path/'s.parquet'); assert rc == 0, err
    rc, _, err = run('scan', *common, '--corpus', fx/'corpus.jsonl', '--out', tmp_path/'r.parquet', '--scores-dir', tmp_path/'sd', '--quiet')
    assert rc == 0, err
    s, sd = pd.read_parquet(tmp_path/'s.parquet'), read_scores(tmp_path/'sd')
    assert list(s.columns) == list(sd.columns) == ['capital', 'q1']
    assert (s.to_numpy() == sd.to_numpy()).all()
    for bad, msg in (({**q[0], 'id': 'id'}, "the id 'id'"), ({**q[0], 'id': 'q1'}, 'a query without one is named q<its position>')):
        (tmp_path/'bad.jsonl').write_text(json.dumps(bad) + '\n' + json.dumps(q[1]) + '\n')
        rc, _, err = run('score', *common[:4], '--queries', tmp_path/'bad.jsonl', '--data', fx/'corpus.jsonl', '--out', tmp_path/'b.parquet')
        assert rc == 2 and msg in err, err
    (tmp_path/'bad.jsonl').write_text(json.dumps({**q[0], 'id': 'index'}) + '\n')
    rc, _, err = run('scan', *common[:4], '--queries', tmp_path/'bad.jsonl', '--corpus', fx/'corpus.jsonl', '--out', tmp_path/'b.parquet',
                     '--scores-dir', tmp_path/'bsd')
    assert rc == 2 and "--queries: a query has the id 'index', the name of the --scores-dir table's index" in err, err


def test_explore_removes_its_notebook_when_it_stops(monkeypatch):
    "The app's notebook lives in a temporary folder while `explore` serves it, and goes with it (50 were left in /tmp)."
    from pathlib import Path
    from influence_nb import cli
    seen = []
    def serve(nb, port, host):
        seen.append((Path(nb), Path(nb).is_file(), port)); return 0
    monkeypatch.setattr(cli, '_serve_app', serve)
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]           # a port that was free a moment ago
    assert run('explore', '--port', port)[0] == 0
    nb, existed, served = seen[0]
    assert existed and served == port and nb.name == 'explorer.ipynb' and not nb.parent.exists()


def test_explore_port_taken(monkeypatch):
    "A stranger's explorer printed port 8881 while Voilà, finding it taken, served on 8882 (the printed URL showed another app).\n    A port given and taken is refused by name; without --port the first free one from the default is served and printed."
    from influence_nb import cli
    seen = []
    monkeypatch.setattr(cli, '_serve_app', lambda nb, port, host: seen.append((port, host)) or 0)
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); s.listen(); busy = s.getsockname()[1]
        rc, out, err = run('explore', '--port', busy)
        assert rc == 2 and f'--port {busy} cannot be used on 127.0.0.1' in err and not seen, err
        monkeypatch.setattr(cli, 'DEFAULT_PORT', busy)
        rc, out, err = run('explore')
        assert rc == 0 and seen[-1][0] > busy and f'on http://127.0.0.1:{seen[-1][0]}/' in out, (out, err)
    n = len(seen)
    for args, msg in ((('--port', 70000), '--port must be 1 to 65535, got 70000'),
                      (('--host', 'no-such-host.invalid'), '--host no-such-host.invalid cannot be served on'),
                      (('--host', '192.0.2.1'), '--host 192.0.2.1 cannot be served on')):   # (an address of no machine here)
        rc, out, err = run('explore', *args)
        assert rc == 2 and msg in err and len(seen) == n, (args, err)


def test_score_candidates_are_the_bm25_union_with_unchanged_scores(fx, tmp_path):
    "`score --candidates K` (the paper's TF-IDF filter, from a stranger: the command line had none) keeps the rows of the union of\n    each query's K best BM25 matches, in file order, and their scores are the full table's."
    import influence_nb as inf
    from influence_nb.tfidf import top_candidates
    q = [{'id': 'a', 'prompt': 'The capital of country 1 is', 'completion': ' city 1'},
         {'id': 'b', 'prompt': 'The capital of country 7 is', 'completion': ' city 7'}]
    (tmp_path/'q.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in q))
    common = ('score', '--model', fx/'model', '--factors', fx/'factors', '--queries', tmp_path/'q.jsonl', '--data', fx/'corpus.jsonl',
              '--batch-size', 1)                                      # one record per batch: the same arithmetic, bit for bit
    rc, _, err = run(*common, '--out', tmp_path/'all.parquet'); assert rc == 0, err
    rc, out, err = run(*common, '--out', tmp_path/'c.parquet', '--candidates', 2); assert rc == 0, err
    tok = inf.load_model(fx/'model')[1]
    idx = top_candidates(inf.tokenize_pairs(tok, [(r['prompt'], r['completion']) for r in q]), inf.tokenize(tok, GOOD), 2,
                         ignore_ids=(tok.bos_token_id, tok.pad_token_id))[0]
    want = sorted(set(idx.flatten().tolist()))
    full, cand = pd.read_parquet(tmp_path/'all.parquet'), pd.read_parquet(tmp_path/'c.parquet')
    assert cand.index.tolist() == want and 2 <= len(want) <= 4 and 1 in want and 7 in want
    assert cand.equals(full.loc[want]), (cand, full.loc[want])
    assert f'scoring {len(want)} of 12 records' in out
    rc, out, err = run(*common, '--out', tmp_path/'c100.parquet', '--candidates', 100); assert rc == 0, err
    assert 'scoring all 12 records (--candidates 100 covers them)' in out and pd.read_parquet(tmp_path/'c100.parquet').equals(full)
    rc, _, err = run(*common, '--out', tmp_path/'n.parquet', '--candidates', -1)
    assert rc == 2 and '--candidates must be 0 (every record) or more' in err
    scan = ('scan', *common[1:7], '--corpus', fx/'corpus.jsonl', '--batch-size', 1, '--k', 2, '--quiet')
    rc, out, err = run(*scan, '--out', tmp_path/'s.parquet', '--scores-dir', tmp_path/'sd', '--candidates', 2); assert rc == 0, err
    assert f"scanned {len(want)} sequences (the union of each query's 2 best BM25 matches)" in out, out
    sd = inf.read_scores(tmp_path/'sd')                             # the scan's rows: the same records, the same scores
    assert sd.index.tolist() == want and (sd.to_numpy() == cand.to_numpy()).all(), (sd, cand)
    res = inf.ScanResult.load(tmp_path/'s.parquet')
    own = [sorted(idx[j].tolist()) for j in range(2)]                # each query's top k among its own matches, not the union
    assert res.candidates == 2 and res.n_train == 12
    assert [res.indices[j].tolist() for j in range(2)] == [cand.loc[own[j], c].sort_values(ascending=False, kind='stable').index.tolist()
                                                           for j, c in enumerate(('a', 'b'))]
    rc, _, err = run(*scan[:-3], '--k', 3, '--quiet', '--out', tmp_path/'k.parquet', '--candidates', 2)
    assert rc == 2 and '--k 3 exceeds --candidates 2' in err, err
    rc, _, err = run(*scan, '--out', tmp_path/'n.parquet', '--candidates', -1)
    assert rc == 2 and '--candidates must be 0 (every record) or more' in err


def test_candidates_that_match_nothing_are_named(fx, tmp_path):
    "A query that shares no token with the corpus gets its K candidates by corpus order (BM25 scores them all 0): `score` and\n    `scan` with `--candidates` say which queries that happened to, and how many of their candidates did match."
    q = [{'id': 'a', 'prompt': 'The capital of country 1 is', 'completion': ' city 1'},
         {'id': 'z', 'prompt': 'Xylophones', 'completion': ' Zebras'}]
    (tmp_path/'q.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in q))
    common = ('--model', fx/'model', '--factors', fx/'factors', '--queries', tmp_path/'q.jsonl', '--batch-size', 4)
    note = "note: 1 of 2 queries share a token with fewer documents than their 3 candidates: 'z' (0)."
    rc, out, err = run('score', *common, '--data', fx/'corpus.jsonl', '--out', tmp_path/'c.parquet', '--candidates', 3)
    assert rc == 0 and note in err, err
    rc, out, err = run('scan', *common, '--corpus', fx/'corpus.jsonl', '--out', tmp_path/'s.parquet', '--k', 2, '--quiet', '--candidates', 3)
    assert rc == 0 and note in err, err
    import influence_nb as inf
    assert set(inf.ScanResult.load(tmp_path/'s.parquet').indices[1].tolist()) <= {0, 1, 2}   # among the first records: what the note warns of
    rc, out, err = run('score', *common[:4], '--queries', fx/'queries.jsonl', '--data', fx/'corpus.jsonl', '--out', tmp_path/'a.parquet',
                       '--candidates', 3)
    assert rc == 0 and 'share a token' not in err, err                 # every candidate of query 'a' matches


def test_sigterm_stops_a_command_as_ctrl_c_does(fx, tmp_path, monkeypatch):
    "A SIGTERM (a scheduler's pre-emption) killed `fit-factors` outright: no message, and its temporary copy of the covariances\n    was left behind. Every command now stops on it as on Ctrl-C (exit 130, what was kept said), and the handler is put back."
    import signal, time
    from influence_nb import cli
    def fit(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM); time.sleep(10); raise AssertionError('the SIGTERM did not stop the fit')
    monkeypatch.setattr(cli, 'fit_factors', fit)
    before = signal.getsignal(signal.SIGTERM)
    rc, out, err = run('fit-factors', '--model', fx/'model', '--data', fx/'corpus.jsonl', '--out', tmp_path/'f', '--quiet')
    assert rc == 130 and 'influence-nb fit-factors: interrupted; nothing was kept; pass --checkpoint DIR' in err, err
    assert signal.getsignal(signal.SIGTERM) is before and not (tmp_path/'f').exists()
