"""Session 7, SEARCH-CLI: what the stranger tests S4, S5 and S8 do not cover.

- a scan of a half-precision model keeps float32 scores through its checkpoint and a resume, and refuses a checkpoint
  whose scores are in another dtype (older versions kept a bfloat16 model's top-k in bfloat16);
- `BadRecordError` carries where and why, so the command line words its own advice (`--skip-bad-records`);
- `scan`/`score --out` refuse a suffix that names a format that is not written (the file is always Parquet);
- the command-line checks that need no model run before the model loads (`load_model` is replaced by one that fails)."""
import contextlib, io, json
from pathlib import Path
import pytest
import torch

import influence_nb as inf
from influence_nb import cli, search
from influence_nb.search import scan, BadRecordError


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def _seqs(n, vocab=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return inf.as_sequences([torch.randint(1, vocab, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g)
                             for _ in range(n)])


def _queries(vocab=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return inf.as_sequences([{'input_ids': torch.randint(1, vocab, (8,), generator=g),
                              'labels': [-100] * 5 + torch.randint(1, vocab, (3,), generator=g).tolist()} for _ in range(2)])


def test_bf16_scan_checkpoint_resume_stays_float32(tmp_path, one_thread):
    m = inf.tiny_model('llama', layers=1).to(torch.bfloat16)
    train, q = _seqs(24), _queries()
    f = inf.fit_factors(m, train, progress=False)
    full = inf.pairwise_scores(m, f, q, train, progress=False).total
    kw = dict(k=5, chunk_size=8, checkpoint=tmp_path/'c.ckpt', checkpoint_every=8, progress=False)
    first = scan(m, f, q, train[:16], **kw)                   # as if stopped after 2 chunks: float32 in the checkpoint
    assert search._load_checkpoint(tmp_path/'c.ckpt')[1].dtype == torch.float32
    resumed = scan(m, f, q, train, **kw)                        # resumes at record 16
    assert first.scores.dtype == resumed.scores.dtype == torch.float32
    vals, idx = full.topk(5, dim=1)
    assert torch.equal(resumed.indices, idx)
    torch.testing.assert_close(resumed.scores, vals, rtol=1e-5, atol=0)
    state, v, i = search._load_checkpoint(tmp_path/'c.ckpt')
    search._save_checkpoint(tmp_path/'c.ckpt', state, v.bfloat16(), i)          # what an older version wrote
    with pytest.raises(ValueError, match='holds torch.bfloat16 scores but this scan keeps torch.float32'):
        scan(m, f, q, train[:16], **kw)


def test_bad_record_error_carries_where_and_why(tmp_path, one_thread):
    m, train, q = inf.tiny_model('gpt2', layers=1), _seqs(3), _queries()
    f = inf.fit_factors(m, train, strategy='identity', progress=False)
    p = tmp_path/'c.jsonl'
    p.write_text(''.join(json.dumps({'input_ids': s['input_ids'].tolist()}) + '\n' for s in train) + '[1, 2\n')
    with pytest.raises(BadRecordError) as e: scan(m, f, q, p, k=2, progress=False)
    assert isinstance(e.value, ValueError) and e.value.where == 'line 4 of c.jsonl' and e.value.why.startswith('not valid JSON')
    assert "on_bad_record='skip'" in str(e.value)                     # the Python API's advice is unchanged


@pytest.fixture
def files(tmp_path, monkeypatch):
    "Inputs that exist (a corpus, queries, a factors folder) and a `load_model` that fails the test if it is reached."
    (tmp_path/'corpus.jsonl').write_text('{"text": "a b c"}\n')
    (tmp_path/'q.jsonl').write_text('{"prompt": "a", "completion": " b"}\n')
    (tmp_path/'factors').mkdir()
    def no_model(*a, **kw): raise AssertionError('the model was loaded before the options were checked')
    monkeypatch.setattr(cli, 'load_model', no_model)
    return tmp_path


def _scan_argv(d, **kw):
    a = {'--model': d/'model', '--factors': d/'factors', '--queries': d/'q.jsonl', '--corpus': d/'corpus.jsonl',
         '--out': d/'r.parquet', **kw}
    return ['scan', *[x for k, v in a.items() for x in (k, v)], '--quiet']


@pytest.mark.parametrize('option, value, message', [
    ('--out', 'r.txt', "the suffix '.txt' names a format that is not written; the file is Parquet, so accepted suffixes are: .parquet"),
    ('--out', 'r.csv', "accepted suffixes are: .parquet"),
    ('--out', 'result', 'no suffix'),
    ('--k', 0, '--k must be at least 1, got 0'),
    ('--batch-size', -1, '--batch-size must be at least 1, got -1'),
    ('--chunk-size', 0, '--chunk-size must be at least 1'),
    ('--checkpoint-every', 0, '--checkpoint-every must be at least 1'),
    ('--query-rank', 0, '--query-rank must be at least 1'),
    ('--max-length', 0, '--max-length must be at least 1'),
    ('--damping', -0.5, '--damping must be a positive number, got -0.5'),
    ('--damping', 'inf', '--damping must be a positive number'),
    ('--factors', 'nofactors', 'nofactors does not exist'),
    ('--queries', 'none.jsonl', '--queries'),
    ('--checkpoint', '.', 'is a folder'),
])
def test_scan_options_refused_before_the_model_loads(files, option, value, message):
    value = files/value if option in ('--out', '--factors', '--queries', '--checkpoint') else value
    rc, out, err = run(*_scan_argv(files, **{option: value}))
    assert rc == 2 and message in err and 'Traceback' not in err, err
    assert not (files/'r.txt').exists() and not (files/'r.csv').exists()


def test_score_and_fit_options_refused_before_the_model_loads(files):
    d = files
    rc, _, err = run('score', '--model', d/'model', '--factors', d/'factors', '--queries', d/'q.jsonl',
                     '--data', d/'corpus.jsonl', '--out', d/'s.txt')
    assert rc == 2 and 'accepted suffixes are: .parquet' in err, err
    rc, _, err = run('fit-factors', '--model', d/'model', '--data', d/'missing.jsonl', '--out', d/'f')
    assert rc == 2 and '--data' in err and 'missing.jsonl' in err, err
    rc, _, err = run('fit-factors', '--model', d/'model', '--data', d/'corpus.jsonl', '--out', d/'f', '--batch-size', 0)
    assert rc == 2 and '--batch-size must be at least 1' in err, err


def test_good_options_reach_the_model(files):
    "The checks refuse nothing valid: a good command line gets as far as loading the model (here: the failing stand-in)."
    rc, _, err = run(*_scan_argv(files, **{'--out': files/'R.PARQUET', '--k': 1, '--damping': 1e-3, '--query-rank': 2}))
    assert rc == 1 and 'the model was loaded before the options were checked' in err, err
