"""Session 10: what strangers' runs found.

- a text nested in each record (`{"doc": {"body": ...}}`, a Parquet struct column) is read by a dotted
  `--text-field doc.body` / `text_field='doc.body'` in every entry point, with the same scores as a flat field;
- an interrupted `fit-factors --checkpoint DIR` resumes where it stopped and saves the factors an uninterrupted fit saves;
- a scan's texts cut to `max_length` are counted in `ScanResult.n_truncated` (saved with it), across a resume too;
- a scan resumed on a JSONL file whose already-scanned part changed (not only its last chunk) is refused, and on a
  Parquet file that changed at all; records appended after the checkpoint are scanned;
- a resumed scan's `seconds` include the time spent before the stop."""
import json
import pandas as pd
import pytest
import torch

from influence_nb.search import ScanResult
from randdata import cli_run, model_folder

TEXTS = [f'The capital of country {i} is city {i} and its river is river {i % 5} .' for i in range(12)]
run = cli_run


@pytest.fixture(scope='module')
def d(tmp_path_factory):
    "A tiny GPT-2 with the project tokenizer; the corpus flat, nested in JSONL and nested in a Parquet struct column."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    d = tmp_path_factory.mktemp('s10')
    model_folder(d, layers=1, ctx=64)
    (d/'flat.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in TEXTS))
    (d/'nested.jsonl').write_text(''.join(json.dumps({'id': i, 'doc': {'body': t, 'lang': 'en'}}) + '\n' for i, t in enumerate(TEXTS)))
    pd.DataFrame({'doc': [{'body': t, 'lang': 'en'} for t in TEXTS]}).to_parquet(d/'nested.parquet')
    (d/'queries.jsonl').write_text(json.dumps({'id': 'a', 'prompt': 'The capital of country 3 is', 'completion': ' city 3'}) + '\n')
    assert run('fit-factors', '--model', d/'model', '--data', d/'flat.jsonl', '--out', d/'f_flat', '--batch-size', 4)[0] == 0
    yield d
    torch.set_num_threads(n)


def test_nested_text_field_in_every_command(d):
    rc, _, err = run('fit-factors', '--model', d/'model', '--data', d/'nested.jsonl', '--text-field', 'doc.body',
                     '--out', d/'f_nested', '--batch-size', 4)
    assert rc == 0, err
    from influence_nb.ekfac import Factors
    a, b = Factors.load(d/'f_flat'), Factors.load(d/'f_nested')
    for name in a.tensors:
        for k in a.tensors[name]: assert torch.equal(a.tensors[name][k], b.tensors[name][k]), (name, k)
    scores = {}
    for corpus, field in (('flat.jsonl', 'text'), ('nested.jsonl', 'doc.body'), ('nested.parquet', 'doc.body')):
        out = d/f'score_{corpus}.parquet'
        rc, _, err = run('score', '--model', d/'model', '--data', d/corpus, '--text-field', field, '--factors', d/'f_flat',
                         '--queries', d/'queries.jsonl', '--out', out)
        assert rc == 0, err
        scores[corpus] = pd.read_parquet(out)['a'].to_numpy()
        res_out = d/f'scan_{corpus}.parquet'
        rc, _, err = run('scan', '--model', d/'model', '--factors', d/'f_flat', '--queries', d/'queries.jsonl', '--corpus', d/corpus,
                         '--text-field', field, '--k', 3, '--out', res_out, '--quiet')
        assert rc == 0, err
        res = ScanResult.load(res_out)
        assert res.n_scanned == len(TEXTS)
        rc, out, err = run('top', '--result', res_out, '--k', 3)
        assert rc == 0, err
        best = int(res.indices[0, 0])
        assert TEXTS[best] in out                                                 # the text shown is the record's body
    assert (scores['nested.jsonl'] == scores['flat.jsonl']).all() and (scores['nested.parquet'] == scores['flat.jsonl']).all()


def test_misspelt_nested_field_is_refused_at_once(d):
    for corpus in ('nested.jsonl', 'nested.parquet'):
        rc, _, err = run('scan', '--model', d/'model', '--factors', d/'f_flat', '--queries', d/'queries.jsonl',
                         '--corpus', d/corpus, '--text-field', 'doc.bdy', '--k', 3, '--out', d/'x.parquet', '--quiet')
        assert rc == 2 and "no field 'doc.bdy'" in err.replace('column', 'field') and "'doc.body'" in err, err


def _stop_after(monkeypatch, k):
    "Make the k+1-th batch of any fitting pass raise KeyboardInterrupt (a Ctrl-C), counting across passes."
    from influence_nb import ekfac, kfac
    real, n = kfac.layer_passes, [0]
    def passes(*a, **kw):
        for item in real(*a, **kw):
            n[0] += 1
            if n[0] > k: raise KeyboardInterrupt
            yield item
    monkeypatch.setattr(kfac, 'layer_passes', passes); monkeypatch.setattr(ekfac, 'layer_passes', passes)


def test_fit_factors_resumes_after_ctrl_c(d, monkeypatch):
    from influence_nb.ekfac import Factors
    args = ('fit-factors', '--model', d/'model', '--data', d/'flat.jsonl', '--batch-size', 1, '--checkpoint-every', 2)
    assert run(*args, '--out', d/'f_whole', '--checkpoint', d/'ck_whole')[0] == 0
    assert not (d/'ck_whole').exists()                                          # removed once the fit completed
    with monkeypatch.context() as mp:
        _stop_after(mp, 5)
        rc, _, err = run(*args, '--out', d/'f_none')
        assert rc == 130 and 'nothing was kept; pass --checkpoint DIR to make a fit resumable' in err, err
    for k in (5, 10):                                                            # in the covariance pass, then in Λ's (12 a pass)
        with monkeypatch.context() as mp:
            _stop_after(mp, k)
            rc, _, err = run(*args, '--out', d/'f_resumed', '--checkpoint', d/'ck')
            assert rc == 130 and f"the fit resumes from {d/'ck'} when you run the same command again" in err, err
    assert sorted(p.name for p in (d/'ck').iterdir()) == ['eigen.safetensors', 'fit_checkpoint.json', 'lambda.safetensors']
    rc, _, err = run(*args, '--out', d/'f_other', '--checkpoint', d/'ck', '--seed', 1)
    assert rc == 2 and 'another model, data or settings; it differs in seed 0, not 1;' in err, err   # named (a stranger had to guess)
    rc, _, err = run(*args, '--out', d/'f_resumed', '--checkpoint', d/'ck')
    assert rc == 0, err
    a, b = Factors.load(d/'f_whole'), Factors.load(d/'f_resumed')
    for name in a.tensors:
        for key in a.tensors[name]: assert torch.equal(a.tensors[name][key], b.tensors[name][key]), (name, key)
    assert not (d/'ck').exists() and not (d/'f_none').exists()


def _stopped_scan(monkeypatch, chunks:int, *args, pause:float=0., **kw):
    "`scan(*args, **kw)` stopped by a KeyboardInterrupt (a Ctrl-C) once `chunks` chunks were scored, each taking `pause` s more."
    import time
    import influence_nb as inf
    from influence_nb import search
    real, calls = search._score_chunk, [0]
    def stop(*a, **k):
        calls[0] += 1
        if calls[0] > chunks: raise KeyboardInterrupt
        time.sleep(pause); return real(*a, **k)
    with monkeypatch.context() as mp:
        mp.setattr(search, '_score_chunk', stop)
        with pytest.raises(KeyboardInterrupt): inf.scan(*args, **kw)


def test_scan_counts_truncated_texts_across_a_resume(d, monkeypatch, tmp_path):
    import warnings
    import influence_nb as inf
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tok = AutoModelForCausalLM.from_pretrained(d/'model').eval(), AutoTokenizer.from_pretrained(d/'model')
    factors = inf.Factors.load(d/'f_flat')
    texts = [t if i % 3 else 'city 3 .' for i, t in enumerate(TEXTS * 2)]         # 16 short texts, 8 long
    n_long = sum(len(tok(t)["input_ids"]) > 10 for t in texts)
    assert 0 < n_long < len(texts)
    q = inf.tokenize_pairs(tok, [('The capital of country 3 is', ' city 3')])
    kw = dict(k=3, tokenizer=tok, max_length=10, chunk_size=4, checkpoint_every=4, progress=False)
    _stopped_scan(monkeypatch, 3, model, factors, q, texts, checkpoint=tmp_path/'ck', **kw)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        res = inf.scan(model, factors, q, texts, checkpoint=tmp_path/'ck', **kw)
    whole = inf.scan(model, factors, q, texts, **kw)
    assert res.n_truncated == whole.n_truncated == n_long                      # the chunks before the stop are counted too
    assert any(f'{n_long} texts were longer than max_length=10' in str(x.message) for x in w)
    assert torch.equal(res.indices, whole.indices) and f'{n_long} truncated' in repr(res)
    res.save(tmp_path/'r.parquet')
    assert inf.ScanResult.load(tmp_path/'r.parquet').n_truncated == n_long


def test_scan_resume_refuses_a_corpus_changed_before_the_checkpoint(d, monkeypatch, tmp_path):
    "Records swapped in the part already scanned (not only in the last chunk) are caught; records appended after are fine."
    import influence_nb as inf
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tok = AutoModelForCausalLM.from_pretrained(d/'model').eval(), AutoTokenizer.from_pretrained(d/'model')
    factors = inf.Factors.load(d/'f_flat')
    q = inf.tokenize_pairs(tok, [('The capital of country 3 is', ' city 3')])
    lines = [json.dumps({'text': t}) + '\n' for t in TEXTS * 2]                  # 24 records, chunks of 4
    kw = dict(k=3, tokenizer=tok, chunk_size=4, checkpoint_every=4, progress=False)
    stopped_scan = lambda corpus, ck: _stopped_scan(monkeypatch, 3, model, factors, q, corpus, checkpoint=ck, **kw)   # checkpoint at 12
    for name, edit, ok in (('swap', lambda ls: [ls[1], ls[0], *ls[2:]], False),   # records 0 and 1: the first chunk
                           ('append', lambda ls: ls + lines[:2], True)):
        f = tmp_path/f'{name}.jsonl'; f.write_text(''.join(lines))
        stopped_scan(f, tmp_path/f'{name}.ckpt')
        f.write_text(''.join(edit(lines)))
        if ok:
            res = inf.scan(model, factors, q, f, checkpoint=tmp_path/f'{name}.ckpt', **kw)
            assert res.n_scanned == len(lines) + 2
        else:
            with pytest.raises(ValueError, match='changed in the part scanned before the checkpoint'):
                inf.scan(model, factors, q, f, checkpoint=tmp_path/f'{name}.ckpt', **kw)
    pq_path = tmp_path/'c.parquet'
    pd.DataFrame({'text': TEXTS * 2}).to_parquet(pq_path)
    stopped_scan(pq_path, tmp_path/'pq.ckpt')
    pd.DataFrame({'text': TEXTS[::-1] * 2}).to_parquet(pq_path)
    with pytest.raises(ValueError, match='a Parquet file is checked whole'):
        inf.scan(model, factors, q, pq_path, checkpoint=tmp_path/'pq.ckpt', **kw)


def test_command_line_speaks_its_own_words(d, tmp_path):
    """Factors of other weights are refused before any query runs, in the CLI's terms; a too-long query is told to be shorter;
    `top` on another corpus file says so in a note, not a Python warning."""
    other = model_folder(tmp_path, layers=1, ctx=64, seed=1)                      # the same shape, other weights
    rc, out, err = run('score', '--model', other, '--data', d/'flat.jsonl', '--factors', d/'f_flat', '--queries', d/'queries.jsonl',
                       '--out', tmp_path/'s.parquet')
    assert rc == 2 and '--factors' in err and '`influence-nb fit-factors`' in err and '`fit_factors`' not in err, err
    assert 'log p(completion)' not in out                                       # refused before the queries were run
    (tmp_path/'long_q.jsonl').write_text(json.dumps({'prompt': ' '.join(['The capital'] * 60), 'completion': ' city 3'}) + '\n')
    rc, _, err = run('score', '--model', d/'model', '--data', d/'flat.jsonl', '--factors', d/'f_flat', '--queries',
                     tmp_path/'long_q.jsonl', '--out', tmp_path/'s.parquet')
    assert rc == 2 and 'shorten it' in err and 'inf.tokenize' not in err, err
    rc, _, err = run('scan', '--model', d/'model', '--factors', d/'f_flat', '--queries', d/'queries.jsonl', '--corpus',
                     d/'flat.jsonl', '--k', 3, '--out', tmp_path/'r.parquet', '--quiet')
    assert rc == 0, err
    rc, out, err = run('top', '--result', tmp_path/'r.parquet', '--corpus', d/'nested.jsonl', '--text-field', 'doc.body')
    assert rc == 0 and 'note: --corpus nested.jsonl is another file than the one scanned' in err, err
    assert 'UserWarning' not in err and 'warnings.warn' not in err


def test_resumed_scan_counts_the_time_before_the_stop(d, monkeypatch, tmp_path):
    import influence_nb as inf
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tok = AutoModelForCausalLM.from_pretrained(d/'model').eval(), AutoTokenizer.from_pretrained(d/'model')
    q = inf.tokenize_pairs(tok, [('The capital of country 3 is', ' city 3')])
    kw = dict(k=3, tokenizer=tok, chunk_size=4, checkpoint_every=4, progress=False, checkpoint=tmp_path/'c.ckpt')
    _stopped_scan(monkeypatch, 3, model, inf.Factors.load(d/'f_flat'), q, TEXTS * 2, pause=0.3, **kw)   # 3 chunks of 0.3 s, then Ctrl-C
    res = inf.scan(model, inf.Factors.load(d/'f_flat'), q, TEXTS * 2, **kw)
    assert res.seconds >= 0.9                                                   # the 0.9 s slept before the stop are counted


def test_explorer_says_which_texts_its_context_cuts(d):
    """The explorer's note names where texts were cut (the model's context, or the `max_length` given), the record's id, and
    the setting that cuts them shorter."""
    import warnings
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from influence_nb.explorer import ExplorerSession
    from influence_nb.data import TruncatedTextsWarning
    model, tok = AutoModelForCausalLM.from_pretrained(d/'model').eval(), AutoTokenizer.from_pretrained(d/'model')
    corpus = [{'id': f'r{i}', 'text': t} for i, t in enumerate(TEXTS)] + [{'id': 'long', 'text': ' '.join(TEXTS)}]
    msgs, WINDOWS = [], "; `token_windows` (`influence-nb windows`) cuts them into windows instead, so that every token is scored."
    for max_length in (None, 32):
        s = ExplorerSession(model=model, tokenizer=tok, corpus=corpus, queries=[('The capital of country 3 is', ' city 3')],
                            name='m', max_length=max_length)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always')
            s.train('m')
        msgs += [str(x.message) for x in w if issubclass(x.category, TruncatedTextsWarning)]
    assert msgs == [f"1 of {len(corpus)} training texts are longer than m's context (64 tokens; `max_length`, `--max-length` on "
                    "the command line, cuts them shorter, to the length the model was trained at), so only their first 64 "
                    "tokens are scored (the first: id long)" + WINDOWS,
                    f"1 of {len(corpus)} training texts are longer than `max_length` (32 tokens), so only their first 32 tokens "
                    "are scored (the first: id long)" + WINDOWS], msgs


def test_fit_factors_refuses_a_bad_out_before_fitting(d, tmp_path, monkeypatch):
    "A fit is not lost to an --out it cannot write: refused at once, and the checkpoint is removed only once the factors are saved."
    from influence_nb.ekfac import Factors
    (tmp_path/'blocker').write_text('a file')
    args = ('fit-factors', '--model', d/'model', '--data', d/'flat.jsonl', '--checkpoint', tmp_path/'ck')
    rc, out, err = run(*args, '--out', tmp_path/'blocker'/'f')
    assert rc == 2 and 'is not a writable folder' in err and not (tmp_path/'ck').exists(), err
    def full_disk(self, path): raise OSError(28, 'No space left on device')
    with monkeypatch.context() as mp:
        mp.setattr(Factors, 'save', full_disk)
        assert run(*args, '--out', tmp_path/'f')[0] == 1
    assert (tmp_path/'ck'/'eigen.safetensors').exists()                        # the fit is kept: run again to save it
    assert run(*args, '--out', tmp_path/'f')[0] == 0 and not (tmp_path/'ck').exists() and (tmp_path/'f').is_dir()
