"Streaming scans (`influence_nb.search`): agreement with pairwise scores, chunking invariance, kill -9 and resume."
import functools, json, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch
from hypothesis import given, settings, strategies as st
import influence_nb as inf
from influence_nb.ekfac import Factors
from influence_nb.search import scan, merge_topk, read_scores, ScanResult, _empty_topk
import randdata

torch.set_num_threads(1)


rand_seqs = functools.partial(randdata.rand_seqs, lo=3, hi=20, top=randdata.VOCAB)                # ids from the whole vocabulary
rand_queries = functools.partial(randdata.rand_queries, length=8, completion=3, top=randdata.VOCAB)


@pytest.fixture(scope='module')
def setup():
    model = inf.tiny_model('gpt2', layers=2).double()
    corpus, queries = rand_seqs(64), rand_queries(3)
    factors = inf.fit_factors(model, corpus[:32], batch_size=8, progress=False)
    full = inf.pairwise_scores(model, factors, queries, corpus, batch_size=8, progress=False).total
    return model, factors, queries, corpus, full


def write_jsonl(path, seqs):
    path.write_text(''.join(json.dumps({'input_ids': s['input_ids'].tolist()}) + '\n' for s in seqs))
    return path


def test_scan_equals_pairwise_topk(setup, tmp_path):
    model, factors, queries, corpus, full = setup
    v, i = full.topk(8, dim=1)
    r = scan(model, factors, queries, corpus, k=8, chunk_size=64, progress=False)
    assert torch.equal(r.indices, i) and torch.equal(r.scores, v)            # same batches: bit for bit
    for cs, bs in ((5, 2), (17, 8)):
        r = scan(model, factors, queries, write_jsonl(tmp_path/'c.jsonl', corpus), k=8, chunk_size=cs, batch_size=bs,
                 scores_path=tmp_path/f's{cs}', progress=False)
        assert torch.equal(r.indices, i)
        assert torch.allclose(r.scores, v, rtol=0, atol=1e-10 * float(v.abs().max()))
        df = read_scores(tmp_path/f's{cs}')
        assert torch.allclose(torch.tensor(df.to_numpy().T), full, rtol=0, atol=1e-10 * float(full.abs().max()))


def test_result_roundtrip_and_table(setup, tmp_path):
    model, factors, queries, corpus, full = setup
    r = scan(model, factors, queries, corpus, k=4, progress=False)
    r2 = ScanResult.load(r.save(tmp_path/'r.parquet'))
    assert torch.equal(r2.indices, r.indices) and torch.equal(r2.scores, r.scores) and r2.n_scanned == 64
    top = r.top(1, 3, corpus=corpus)
    assert top['index'].tolist() == full[1].topk(3).indices.tolist()
    assert top['text'].tolist() == [' '.join(map(str, corpus[j]['input_ids'].tolist())) for j in top['index']]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=40), st.integers(1, 10), st.integers(1, 12), st.randoms())
def test_merge_topk_is_order_free(vals, k, chunk, rnd):
    "Any arrival order and chunking gives the brute-force top-k by (score desc, index asc) — ties included."
    s = torch.tensor(vals, dtype=torch.float64)[None]
    want = sorted(range(len(vals)), key=lambda j: (-vals[j], j))[:k]
    order = list(range(len(vals))); rnd.shuffle(order)
    v, i = _empty_topk(1, k, torch.float64)
    for a in range(0, len(order), chunk):
        part = torch.tensor(order[a:a + chunk])
        v, i = merge_topk(v, i, s[:, part], part, k)
    assert i[0, :len(want)].tolist() == want


def test_bad_line_named_or_skipped(setup, tmp_path):
    model, factors, queries, corpus, full = setup
    p = write_jsonl(tmp_path/'c.jsonl', corpus[:10])
    lines = p.read_text().splitlines(); lines[4] = '{"input_ids": [1, 2'
    p.write_text('\n'.join(lines) + '\n')
    with pytest.raises(ValueError, match='line 5 of c.jsonl'): scan(model, factors, queries, p, progress=False)
    r = scan(model, factors, queries, p, k=3, on_bad_record='skip', progress=False)
    assert (r.n_scanned, r.n_skipped) == (9, 1) and 4 not in r.indices.tolist()
    assert r.first_skipped.startswith('line 5 of c.jsonl: not valid JSON')              # said by the command line's summary
    assert 'line 1 column' in r.first_skipped            # json's own position, within the record's line (it said 'line 2')
    assert ScanResult.load(r.save(tmp_path/'r.parquet')).first_skipped == r.first_skipped
    lines[4] = json.dumps(corpus[4]['input_ids'].tolist())                               # a bare array: the record's token ids
    p.write_text('\n'.join(lines) + '\n')
    r = scan(model, factors, queries, p, k=10, progress=False)
    assert (r.n_scanned, r.n_skipped, r.first_skipped) == (10, 0, None)
    assert torch.equal(r.indices, full[:, :10].topk(10).indices)


CHILD = '''
import sys, time, torch
torch.set_num_threads(1)
from influence_nb.modules import tiny_model
from influence_nb.ekfac import Factors
from influence_nb.search import scan
model = tiny_model('gpt2', layers=2).double()
fwd = model.forward
def slow(*a, **kw): time.sleep(0.03); return fwd(*a, **kw)
model.forward = slow
d = sys.argv[1]
queries = [{'input_ids': q[0], 'labels': q[1]} for q in torch.load(d + '/queries.pt', weights_only=True)]
scan(model, Factors.load(d + '/factors'), queries, d + '/corpus.jsonl', k=6, chunk_size=8, batch_size=4,
     checkpoint=d + '/scan.ckpt', checkpoint_every=8, scores_path=d + '/scores', progress=False)
'''


def test_kill9_then_resume_is_identical(setup, tmp_path):
    model, factors, queries, corpus, full = setup
    factors.save(tmp_path/'factors'); factors = Factors.load(tmp_path/'factors')      # as a fresh process sees them
    torch.save([(q['input_ids'], q['labels']) for q in queries], tmp_path/'queries.pt')
    src = write_jsonl(tmp_path/'corpus.jsonl', corpus)
    kw = dict(k=6, chunk_size=8, batch_size=4, progress=False)
    clean = scan(model, factors, queries, src, scores_path=tmp_path/'clean', **kw)
    proc = subprocess.Popen([sys.executable, '-c', CHILD, str(tmp_path)], stderr=subprocess.PIPE)
    ck, t0, done = tmp_path/'scan.ckpt', time.time(), 0
    while done < 16 and time.time() - t0 < 120:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        try: done = json.loads(ck.read_text())['n_records']
        except (OSError, ValueError, KeyError): pass
        time.sleep(0.02)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL); proc.wait()
    at = json.loads(ck.read_text())['n_records']
    assert 16 <= at < 64, at
    names = ['a', 'b', 'c']                                            # names given on resuming: they name every column
    resumed = scan(model, factors, queries, src, checkpoint=ck, checkpoint_every=8, scores_path=tmp_path/'scores',
                   query_names=names, **kw)
    assert torch.equal(resumed.indices, clean.indices) and torch.equal(resumed.scores, clean.scores)
    got, want = read_scores(tmp_path/'scores'), read_scores(tmp_path/'clean')
    assert list(got.columns) == names and list(want.columns) == ['q0', 'q1', 'q2']
    assert got.set_axis(want.columns, axis=1).equals(want)


def test_corrupt_or_foreign_checkpoint_refused(setup, tmp_path):
    model, factors, queries, corpus, full = setup
    ck = tmp_path/'scan.ckpt'
    scan(model, factors, queries, corpus, k=4, chunk_size=16, checkpoint=ck, progress=False)
    with pytest.raises(ValueError, match='different scan'):
        scan(model, factors, queries, corpus, k=4, chunk_size=32, checkpoint=ck, progress=False)
    meta = json.loads(ck.read_text())
    (tmp_path/meta['tensors']).write_bytes(b'\0' * 10)
    with pytest.raises(ValueError, match='damaged'):
        scan(model, factors, queries, corpus, k=4, chunk_size=16, checkpoint=ck, progress=False)


def test_first_skipped_survives_a_resume_and_is_unknown_after_an_old_checkpoint(setup, tmp_path, monkeypatch):
    "From a reviewer: a checkpoint written before `first_skipped` existed made a later skip claim to be the first."
    import influence_nb.search as search
    model, factors, queries, corpus, full = setup
    p = write_jsonl(tmp_path/'c.jsonl', corpus[:12])
    lines = p.read_text().splitlines(); lines[2], lines[9] = '{"input_ids": ', '{"body": "x"}'     # bad: lines 3 and 10
    p.write_text('\n'.join(lines) + '\n')
    kw = dict(k=3, chunk_size=2, checkpoint_every=2, on_bad_record='skip', progress=False)
    clean = scan(model, factors, queries, p, **kw)
    assert clean.n_skipped == 2 and clean.first_skipped.startswith('line 3 of c.jsonl: not valid JSON')
    orig, calls = search._score_chunk, [0]
    def stop_on_fourth(*a, **k):
        calls[0] += 1
        if calls[0] == 4: raise KeyboardInterrupt
        return orig(*a, **k)
    for old in (False, True):
        ck = tmp_path/f'ck{old}.json'; calls[0] = 0
        monkeypatch.setattr(search, '_score_chunk', stop_on_fourth)
        with pytest.raises(KeyboardInterrupt): scan(model, factors, queries, p, checkpoint=ck, **kw)
        monkeypatch.setattr(search, '_score_chunk', orig)
        st = json.loads(ck.read_text()); assert st['n_skipped'] == 1 and st['n_records'] < 10
        if old: st.pop('bad'); ck.write_text(json.dumps(st))                   # as the previous version wrote it
        r = scan(model, factors, queries, p, checkpoint=ck, **kw)
        assert torch.equal(r.indices, clean.indices) and r.n_skipped == 2
        assert r.first_skipped == (None if old else clean.first_skipped)


def test_a_pair_cut_before_its_completion_says_so(tmp_path):
    "A prompt-completion record whose prompt fills `max_length`: no completion token is left, and the reason says why."
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(inf.data_dir()/'tokenizer')                    # the project's own
    model = inf.tiny_model('llama', layers=1, vocab=len(tok)).double()
    f = inf.fit_factors(model, inf.tokenize(tok, ['a b c d e f g h'] * 4), 'identity', progress=False)
    q = inf.tokenize_pairs(tok, [('a b', ' c')])
    recs = [{'text': 'a b c d'}, {'prompt': ' '.join(['a b c d'] * 20), 'completion': ' e f'}]
    r = scan(model, f, q, recs, k=1, tokenizer=tok, max_length=8, on_bad_record='skip', progress=False)
    assert r.n_skipped == 1 and 'its completion lies beyond the first 8 tokens it is cut to' in r.first_skipped
    with pytest.raises(ValueError, match='before its completion or assistant reply has none left'):
        inf.pairwise_scores(model, f, q, inf.tokenize(tok, recs[1:], max_length=8), progress=False)
