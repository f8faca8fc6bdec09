"""Session 10: what strangers' runs found.

- a text nested in each record (`{"doc": {"body": ...}}`, a Parquet struct column) is read by a dotted
  `--text-field doc.body` / `text_field='doc.body'` in every entry point, with the same scores as a flat field."""
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
