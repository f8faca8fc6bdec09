"""A new user's path, end to end: their own non-GPT-2 model folder (a tiny Llama with its own trained tokenizer,
tests/own_model.py), their own JSONL corpus of facts, and every `influence-nb` command run as a subprocess.
The record that states a fact must rank first for that fact's query; bad input must be refused with exit code 2."""
import json, os, shutil, subprocess, sys
from pathlib import Path
import pandas as pd
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import own_model

CLI = [sys.executable, '-c', 'import sys; from influence_nb.cli import main; sys.exit(main())']


def cli(*args, code=0):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'TRANSFORMERS_OFFLINE': '1'}
    p = subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == code, f"influence-nb {' '.join(map(str, args))} exited {p.returncode}, not {code}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p.stdout, p.stderr


@pytest.fixture(scope='module')
def own(tmp_path_factory):
    import torch
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp('own')
    r = own_model.build(d)
    r['dir'] = d
    cli('fit-factors', '--model', r['model'], '--data', r['corpus'], '--out', d/'factors')
    return r


def _fact_index(r, q): return [x['id'] for x in r['records']].index(q['record'])


def test_score_ranks_the_stating_record_first(own):
    d = own['dir']
    (d/'corpus.txt').write_text(''.join(x['text'] + '\n' for x in own['records']))       # plain text is accepted
    out, _ = cli('score', '--model', own['model'], '--factors', d/'factors', '--queries', own['queries'],
                 '--data', d/'corpus.txt', '--out', d/'scores.parquet')
    df = pd.read_parquet(d/'scores.parquet')
    assert list(df.columns) == [q['id'] for q in own['query_records']]                 # columns named by query id
    for q in own['query_records']:
        assert int(df[q['id']].idxmax()) == _fact_index(own, q), q['id']
        assert f"query {q['id']}: log p(completion) = " in out
    assert 'legend: ' in out and 'exceed |log p|' in out


def test_scan_and_top(own):
    d = own['dir']
    pd.DataFrame({'body': [x['text'] for x in own['records']]}).to_parquet(d/'corpus.parquet')   # Parquet too
    results = {}
    for name, extra in (('jsonl', ['--corpus', own['corpus']]), ('parquet', ['--corpus', d/'corpus.parquet', '--text-field', 'body'])):
        cli('scan', '--model', own['model'], '--factors', d/'factors', '--queries', own['queries'], '--k', 3,
            '--out', d/f'{name}.parquet', '--quiet', *extra)
        from influence_nb.search import ScanResult
        results[name] = ScanResult.load(d/f'{name}.parquet')
    assert results['jsonl'].indices.tolist() == results['parquet'].indices.tolist()
    for i, q in enumerate(own['query_records']):
        assert int(results['jsonl'].indices[i, 0]) == _fact_index(own, q), q['id']
    q = own['query_records'][3]
    out, _ = cli('top', '--result', d/'jsonl.parquet', '--query', q['id'], '--k', 2)
    assert out.startswith(q['id']) and 'log p(completion)' in out
    first = [l for l in out.splitlines() if l.strip().startswith('1 ')][0]
    assert own['records'][_fact_index(own, q)]['text'] in first, out
    assert first.split()[1:3] == [str(_fact_index(own, q)), own['records'][_fact_index(own, q)]['id']], out   # index, then the record's id


def test_explore_headless(own):
    d = own['dir']
    out, _ = cli('explore', '--model', own['model'], '--corpus', own['corpus'], '--queries', own['queries'],
                 '--factors', d/'factors', '--no-serve')
    q = own['query_records'][0]                                      # the app opens on the first query
    assert f"query {q['id']}: log p(completion)" in out
    first = [l for l in out.splitlines() if l.strip().startswith('1 ')][0]
    assert q['record'] in first, out



def test_explore_query_and_what_was_scored(own):
    "`explore --query ID` opens on that query (headless, only the first could be run), and says what it scored: a stranger's\n    --no-serve top differed from scan's, since it scored the BM25 candidates only, and the printout did not say so."
    d, q, n = own['dir'], own['query_records'][2], len(own['records'])
    common = ('explore', '--model', own['model'], '--corpus', own['corpus'], '--queries', own['queries'], '--factors', d/'factors')
    out, _ = cli(*common, '--query', q['id'], '--candidates', 3, '--no-serve')
    assert f"query {q['id']}: log p(completion)" in out, out
    said = [line for line in out.splitlines() if line.startswith('ekfac: scored ')]
    assert len(said) == 1 and f" of {n:,} training sequences (--candidates 0 scores every one)" in said[0], out
    assert said[0].startswith(('ekfac: scored the 3 best BM25 matches', 'ekfac: scored 3 candidates')), out
    out, _ = cli(*common, '--query', q['id'], '--candidates', 0, '--no-serve')
    assert f"ekfac: scored all {n:,} of {n:,} training sequences\n" in out, out
    _, err = cli(*common, '--query', q['id'] + 'x', '--no-serve', code=2)
    assert f"--query {q['id'] + 'x'!r} is not an id of --queries; did you mean {q['id']}" in err, err

def test_explore_max_length(own):
    "`explore --max-length` cuts the corpus where `score --max-length` does: the same top sequences, the same scores."
    d, q = own['dir'], own['query_records'][0]
    cli('score', '--model', own['model'], '--factors', d/'factors', '--queries', own['queries'], '--data', own['corpus'],
        '--max-length', 6, '--out', d/'s6.parquet')
    want = pd.read_parquet(d/'s6.parquet')[q['id']].droplevel('train_index').sort_values(ascending=False)[:5]
    out, err = cli('explore', '--model', own['model'], '--corpus', own['corpus'], '--queries', own['queries'],
                   '--factors', d/'factors', '--max-length', 6, '--candidates', 0, '--no-serve')
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in ([str(r)] for r in range(1, 6))]
    assert [r[2] for r in rows] == want.index.tolist(), (out, want)          # rank, train_index, id, score, ...
    assert all(abs(float(r[3]) - v) <= 5e-4 * abs(v) for r, v in zip(rows, want)), (out, want)
    full, _ = cli('explore', '--model', own['model'], '--corpus', own['corpus'], '--queries', own['queries'],
                  '--factors', d/'factors', '--candidates', 0, '--no-serve')
    assert full != out                                                # the cut changed what is scored
    _, err = cli('explore', '--model', own['model'], '--corpus', own['corpus'], '--queries', own['queries'],
                 '--max-length', 100000, '--no-serve', code=2)
    assert 'reads at most' in err, err


def test_refusals(own):
    d = own['dir']
    bare = d/'bare'; bare.mkdir(exist_ok=True)
    for f in own['model'].iterdir():
        if f.name in ('config.json', 'generation_config.json') or f.suffix == '.safetensors': shutil.copy(f, bare/f.name)
    _, err = cli('fit-factors', '--model', bare, '--data', own['corpus'], '--out', d/'f2', code=2)
    assert 'has no tokenizer' in err and '--tokenizer' in err
    lines = own['corpus'].read_text().splitlines()
    (d/'bad.jsonl').write_text('\n'.join(lines[:2] + ['{"text": "The capital of'] + lines[2:]) + '\n')
    _, err = cli('fit-factors', '--model', own['model'], '--data', d/'bad.jsonl', '--out', d/'f3', code=2)
    assert 'bad.jsonl, line 3: not valid JSON' in err and 'plain text (.txt' in err and 'Parquet' in err
    _, err = cli('scan', '--model', own['model'], '--factors', d/'factors', '--queries', own['queries'],
                 '--corpus', d/'bad.jsonl', '--out', d/'r.parquet', '--quiet', code=2)
    assert 'line 3 of bad.jsonl' in err and 'Accepted formats' in err


@pytest.mark.parametrize('command, module, option', [('experiment', 'influence_nb.experiments.harness', '--only'),
                                                     ('validate', 'influence_nb.evaluate', '--tasks')])
def test_experiment_and_validate_dispatch(command, module, option):
    "`influence-nb experiment|validate ARGS` hands ARGS to the module's own `main`, named as the command: its --help, exit 0."
    out, _ = cli(command, '--help')
    assert out.startswith(f'usage: influence-nb {command}') and option in out, out
    if command == 'validate': assert 'not a model of yours' in ' '.join(out.split()), out   # what it runs, said
    _, err = cli(command, '--no-such-option', code=2)            # the module's parser saw the arguments
    assert f'influence-nb {command}: error' in err and module not in err, err
