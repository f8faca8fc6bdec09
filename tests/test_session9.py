"""Session 9: what a stranger's run of the command line found (nats, truncation, empty texts, field names, Ctrl-C).

- `nats` divides by N of the training set: a scan takes the larger of the corpus it scanned and the factors' fit set
  (the CLI used the fit sample, 3x too large on a 100-of-299 fit), `top` prints the N it uses, `--n-train` sets it;
- texts longer than --max-length are cut: `fit-factors`/`score` say how many, naming the first;
- a record with no scored token (an empty text) is a bad record for `scan` too, as it is for `fit-factors`;
- a misspelt --text-field on `scan` is named at once, with the fields the file has;
- Ctrl-C exits with 130 and one line saying what was kept, not a traceback."""
import json
from pathlib import Path
import pytest
import torch

from influence_nb import cli
from influence_nb.search import ScanResult
from randdata import cli_run, model_folder

TEXTS = [f'The capital of country {i} is city {i} and its river is river {i % 5} .' for i in range(30)]


run = cli_run


@pytest.fixture(scope='module')
def d(tmp_path_factory):
    "A tiny GPT-2 with the project tokenizer; factors fitted on the first 10 texts of a 30-text corpus."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    d = tmp_path_factory.mktemp('s9')
    model_folder(d, layers=1, ctx=64)
    (d/'fit.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in TEXTS[:10]))
    (d/'corpus.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in TEXTS))
    (d/'queries.jsonl').write_text(json.dumps({'id': 'a', 'prompt': 'The capital of country 3 is', 'completion': ' city 3'}) + '\n')
    assert run('fit-factors', '--model', d/'model', '--data', d/'fit.jsonl', '--out', d/'factors', '--strategy', 'identity')[0] == 0
    yield d
    torch.set_num_threads(n)


def _scan(d, *extra, corpus='corpus.jsonl', out='r.parquet'):
    return run('scan', '--model', d/'model', '--factors', d/'factors', '--queries', d/'queries.jsonl', '--corpus', d/corpus,
               '--k', 5, '--out', d/out, '--quiet', *extra)


def test_nats_divide_by_the_training_set(d):
    rc, _, err = _scan(d)
    assert rc == 0, err
    res = ScanResult.load(d/'r.parquet')
    assert res.n_scanned == 30 and res.n_train == 30                      # the corpus, not the 10 fitted on
    rc, out, err = run('top', '--result', d/'r.parquet', '--k', 5)
    assert rc == 0, err
    assert 'nats = score / N, N = 30' in out.splitlines()[0]
    table = res.top(0, 5)
    torch.testing.assert_close(torch.tensor(table['nats'].to_numpy()), torch.tensor(table['score'].to_numpy()) / 30)
    rc, out, _ = run('top', '--result', d/'r.parquet', '--k', 5, '--n-train', 3000)
    assert rc == 0 and 'N = 3,000' in out.splitlines()[0]
    assert run('top', '--result', d/'r.parquet', '--n-train', 0)[0] == 2
    rc, _, err = _scan(d, '--n-train', 500, out='r500.parquet')
    assert rc == 0, err
    five = ScanResult.load(d/'r500.parquet')
    assert five.n_train == 500 and torch.equal(five.scores, res.scores)
    (d/'few.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in TEXTS[:4]))
    assert _scan(d, corpus='few.jsonl', out='few.parquet')[0] == 0
    assert ScanResult.load(d/'few.parquet').n_train == 10                 # a candidate subset: the fit set is larger


def test_truncation_is_reported(d):
    long = ' '.join(TEXTS)                                                # far beyond the 64-token context
    (d/'long.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in TEXTS[:3] + [long, long]))
    rc, _, err = run('fit-factors', '--model', d/'model', '--data', d/'long.jsonl', '--out', d/'f-long', '--strategy', 'identity')
    assert rc == 0, err
    assert 'note: 2 of 5 --data long.jsonl records are longer than 64 tokens' in err and '(the first: line 4)' in err
    rc, _, err = run('fit-factors', '--model', d/'model', '--data', d/'fit.jsonl', '--out', d/'f-short', '--strategy', 'identity')
    assert rc == 0 and 'note:' not in err


def test_empty_text_is_a_bad_record_for_scan(d):
    (d/'empty.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in TEXTS[:3] + [''] + TEXTS[3:6]))
    rc, _, err = _scan(d, corpus='empty.jsonl', out='e.parquet')
    assert rc == 2 and 'line 4' in err and 'its text is empty, a blank document' in err, err   # (session 35: was 'no scored token')
    rc, out, err = _scan(d, '--skip-bad-records', corpus='empty.jsonl', out='e.parquet')
    assert rc == 0, err
    res = ScanResult.load(d/'e.parquet')
    assert (res.n_scanned, res.n_skipped) == (6, 1) and 3 not in res.indices.flatten().tolist()
    assert '1 bad records skipped' in out


def test_misspelt_text_field_is_named(d):
    (d/'passage.jsonl').write_text(''.join(json.dumps({'id': i, 'passage': t}) + '\n' for i, t in enumerate(TEXTS[:5])))
    rc, _, err = _scan(d, '--text-field', 'pasage', corpus='passage.jsonl', out='p.parquet')
    assert rc == 2
    assert "has no field 'pasage' or 'input_ids' (fields: ['id', 'passage']); pass --text-field" in err
    assert 'inf.tokenize' not in err                                       # no Python advice on the command line
    assert _scan(d, '--text-field', 'passage', corpus='passage.jsonl', out='p.parquet')[0] == 0


def test_ctrl_c_says_what_was_kept(d, monkeypatch):
    def stop(*a, **k): raise KeyboardInterrupt
    monkeypatch.setattr(cli, '_scan', stop)
    rc, out, err = _scan(d, '--checkpoint', d/'s.ckpt', out='i.parquet')
    assert rc == 130 and 'Traceback' not in err
    assert f'interrupted; nothing was kept: it stopped before its first save to {d/"s.ckpt"}' in err   # (session 10)
    (d/'s.ckpt').write_text('{}')                                           # once a checkpoint exists, it is named
    rc, out, err = _scan(d, '--checkpoint', d/'s.ckpt', out='i.parquet')
    assert f'interrupted; the scan resumes from {d/"s.ckpt"} when you run the same command again' in err
    (d/'s.ckpt').unlink()
    rc, _, err = _scan(d, out='i.parquet')
    assert rc == 130 and 'pass --checkpoint FILE to make a scan resumable' in err


def test_pairwise_nats_use_the_same_n_as_scan():
    "`pairwise_scores` takes N as `scan` does: the larger of the sequences scored and the fit set."
    import influence_nb as inf
    torch.manual_seed(0)
    m = inf.tiny_model('gpt2', layers=1)
    g = torch.Generator().manual_seed(0)
    seqs = inf.as_sequences([torch.randint(1, 32, (8,), generator=g) for _ in range(12)])
    q = inf.as_sequences([{'input_ids': torch.randint(1, 32, (6,), generator=g), 'labels': [-100] * 3 + [4, 5, 6]}])
    f = inf.fit_factors(m, seqs[:5], strategy='identity', progress=False)
    whole, part = (inf.pairwise_scores(m, f, q, t, progress=False) for t in (seqs, seqs[:3]))
    assert (whole.n_train, part.n_train) == (12, 5)
    assert inf.scan(m, f, q, seqs, k=3, progress=False).n_train == 12
    torch.testing.assert_close(whole.nats, whole.total / 12)
    torch.testing.assert_close(torch.tensor(whole.top(0, 3)['nats'].to_numpy()), whole.total[0].topk(3).values.double() / 12)


def test_scan_reports_truncated_texts(d):
    "A scan says how many texts it cut to --max-length (a warning in Python, a note on the command line)."
    long = ' '.join(TEXTS)
    (d/'long_scan.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in TEXTS[:3] + [long, long, long]))
    rc, _, err = _scan(d, corpus='long_scan.jsonl', out='ls.parquet')
    assert rc == 0, err
    assert 'note: 3 texts were longer than max_length=64 tokens' in err and '(the first: line 4' in err
    rc, _, err = _scan(d, corpus='fit.jsonl', out='fs.parquet')
    assert rc == 0 and 'note:' not in err


def test_skip_bad_records_passes_a_bad_first_record(d):
    "With --skip-bad-records a first record without the text field is skipped and counted, not a refusal of the file."
    (d/'header.jsonl').write_text(json.dumps({'meta': 'a header line'}) + '\n' + ''.join(json.dumps({'text': t}) + '\n' for t in TEXTS[:5]))
    assert _scan(d, corpus='header.jsonl', out='h.parquet')[0] == 2
    rc, _, err = _scan(d, '--skip-bad-records', corpus='header.jsonl', out='h.parquet')
    assert rc == 0, err
    res = ScanResult.load(d/'h.parquet')
    assert (res.n_scanned, res.n_skipped) == (5, 1) and 0 not in res.indices.flatten().tolist()


def test_notes_survive_an_interrupted_scan(d, monkeypatch):
    "A note gathered before Ctrl-C is still printed."
    import warnings
    def cut_then_stop(*a, **k):                    # as `scan` warns for its caller in the package, then Ctrl-C
        warnings.warn_explicit("3 texts were longer than max_length=64 tokens", UserWarning,
                               str(Path(cli.__file__)), 1)
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, 'scan', cut_then_stop)
    rc, _, err = _scan(d, out='n.parquet')
    assert rc == 130 and 'note: 3 texts were longer than max_length=64 tokens' in err


def test_gnvp_with_non_finite_logits_at_unscored_positions():
    "A model whose logits are NaN where the attention mask is 0 (padding): products on padded batches equal unpadded ones."
    from influence_nb.pbrf import gnvp
    class NanPad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.head = torch.nn.Embedding(16, 6), torch.nn.Linear(6, 16)
        def forward(self, input_ids, attention_mask=None):
            z = self.head(torch.tanh(self.emb(input_ids)))
            return z if attention_mask is None else torch.where(attention_mask[..., None].bool(), z, float('nan'))
    m = NanPad().double()
    g = torch.Generator().manual_seed(0)
    seqs = [dict(input_ids=torch.randint(1, 16, (n,), generator=g)) for n in (3, 7, 5)]
    V = torch.randn(2, 6 * 16 + 16, dtype=torch.float64, generator=g)
    one = gnvp(m, ['head.weight', 'head.bias'], seqs, V, batch_size=1)        # no padding
    padded = gnvp(m, ['head.weight', 'head.bias'], seqs, V, batch_size=3)     # NaN logits at the padded positions
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded, one, rtol=1e-10, atol=1e-12)
