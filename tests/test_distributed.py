"""The same `fit_factors`, `pairwise_scores`, `self_scores` and `scan` under `torchrun --nproc_per_node 2`
(gloo, CPU) give a single process's results: each rank works on its strided shard and the sums are all-reduced."""
import json, os, re, subprocess, sys, shutil
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason='torch.distributed with gloo is not available')


# PYTHONFAULTHANDLER: a worker that aborts in C++ (seen once in CI: "terminate called without an active exception")
# prints every thread's Python stack to stderr, which the failure message below shows
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'PYTHONFAULTHANDLER': '1'}


def run(cmd, out):
    env = ENV
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-12000:]}"
    return load_file(str(out/'results.safetensors'))


@pytest.fixture(scope='module')
def results(tmp_path_factory):
    sys.path.insert(0, str(HERE))
    from dist_worker import data, main
    d = tmp_path_factory.mktemp('dist')
    train, _ = data()
    corpus = d/'corpus.jsonl'
    corpus.write_text(''.join(json.dumps({'input_ids': s['input_ids'].tolist(), **({'id': f'd{i}'} if i % 3 == 0 else {})}) + '\n'
                              for i, s in enumerate(train)))                # every third record has its own id
    lines = corpus.read_text().splitlines(keepends=True)
    lines[9], lines[20] = '{"input_ids": [1.5, 2]}\n', '{"no_ids": 1}\n'    # bad records of process 1 (9) and 0 (20) of 2
    (d/'bad.jsonl').write_text(''.join(lines))
    (d/'one').mkdir(); (d/'two').mkdir()
    main(str(d/'one'), str(corpus))                                     # a single process: this one
    one = load_file(str(d/'one'/'results.safetensors'))
    torchrun = [sys.executable, '-m', 'torch.distributed.run']
    two = run(torchrun + ['--standalone', '--nproc_per_node', '2', str(HERE/'dist_worker.py'), str(d/'two'), str(corpus)], d/'two')
    return one, two


def close(a, b, rtol=1e-9):
    return torch.allclose(a, b, rtol=0, atol=rtol * float(a.abs().max()))


def test_factors_equal(results):
    one, two = results
    keys = [k for k in one if '::' in k]
    assert {k.split('::')[1] for k in keys} == {'A', 'S', 'Lambda'}
    for k in keys: assert close(one[k], two[k]), k


def test_self_scores_equal(results):
    one, two = results
    assert close(one['self'], two['self'])


def test_scan_equal(results):
    one, two = results
    assert torch.equal(one['scan_indices'], two['scan_indices']) and close(one['scan_scores'], two['scan_scores'])
    assert torch.equal(one['refined_indices'], two['refined_indices']) and close(one['refined_scores'], two['refined_scores'])
    assert close(one['scan_all_scores'], two['scan_all_scores'])
    assert torch.equal(one['refined_id_indices'], two['refined_id_indices'])      # the same records' ids kept
    assert torch.equal(one['scan_all_ids'], two['scan_all_ids'])                  # and written next to every score
    assert sorted(one['scan_all_ids'][one['scan_all_ids'] >= 0].tolist()) == list(range(0, 37, 3))
    # and the scan agrees with the single process's pairwise scores
    assert close(one['scan_scores'], one['pairwise'].topk(5, dim=1).values)


def test_pairwise_scores_equal(results):
    one, two = results
    assert close(one['pairwise'], two['pairwise'])


def test_grouped_scores_equal(results):
    "Queries summed by group: each process adds its shard of the group's gradients; the rows are the groups' sums."
    one, two = results
    assert close(one['grouped'], two['grouped'])
    p = one['pairwise']
    assert close(one['grouped'], torch.stack([p[0] + p[2], p[1]]))


def test_cli_scan_torchrun_equals_one_process(tmp_path):
    "`torchrun --nproc_per_node 2 influence-nb scan ...` shards the corpus and writes the one-process result."
    sys.path.insert(0, str(HERE))
    import own_model
    import influence_nb as inf
    from influence_nb.data import load_model
    from influence_nb.search import ScanResult
    torch.set_num_threads(1)
    r = own_model.build(tmp_path)
    model, tok = load_model(r['model'])
    inf.fit_factors(model, inf.tokenize(tok, [x['text'] for x in r['records']], 32), 'ekfac', progress=False).save(tmp_path/'factors')
    args = ['scan', '--model', r['model'], '--factors', tmp_path/'factors', '--queries', r['queries'], '--corpus', r['corpus'],
            '--k', 5, '--chunk-size', 4, '--batch-size', 3, '--quiet']
    script = HERE/'cli_main.py'
    env = ENV
    for cmd, out in (([sys.executable, str(script)], 'one.parquet'),
                     ([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(script)], 'two.parquet')):
        p = subprocess.run(cmd + [str(a) for a in args] + ['--out', str(tmp_path/out)], capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-12000:]}"
    assert 'in 2 processes' in p.stdout, p.stdout
    one, two = ScanResult.load(tmp_path/'one.parquet'), ScanResult.load(tmp_path/'two.parquet')
    assert one.n_scanned == two.n_scanned == len(r['records'])
    assert torch.equal(one.indices, two.indices)
    rel = float((one.scores - two.scores).abs().max() / one.scores.abs().max())
    assert rel < 1e-6, rel


def test_cli_fit_and_score_torchrun_equal_one_process(tmp_path):
    "`torchrun --nproc_per_node 2 influence-nb fit-factors|score ...`: each process takes its shard; the one result is written once."
    sys.path.insert(0, str(HERE))
    import own_model
    import pandas as pd
    from influence_nb.ekfac import Factors
    r = own_model.build(tmp_path)
    script, env = HERE/'cli_main.py', ENV
    launch = {'one': [sys.executable, str(script)],
              'two': [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(script)]}
    outs = {}
    for name, cmd in launch.items():
        for args in (['fit-factors', '--model', r['model'], '--data', r['corpus'], '--fisher', 'empirical', '--out', tmp_path/f'f-{name}'],
                     ['score', '--model', r['model'], '--factors', tmp_path/f'f-{name}', '--queries', r['queries'],
                      '--data', r['corpus'], '--out', tmp_path/f's-{name}.parquet']):
            p = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=300)
            assert p.returncode == 0, f"{' '.join(cmd)} {args[0]} failed:\n{p.stdout[-2000:]}\n{p.stderr[-12000:]}"
            outs[name, args[0]] = p.stdout
    assert 'fitted by 2 processes' in outs['two', 'fit-factors'] and outs['two', 'fit-factors'].count('saved ') == 1
    assert '(2 processes)' in outs['two', 'score'] and outs['two', 'score'].count('wrote ') == 1
    one, two = Factors.load(tmp_path/'f-one'), Factors.load(tmp_path/'f-two')
    assert (one.n_sequences, one.n_tokens) == (two.n_sequences, two.n_tokens) == (len(r['records']), one.n_tokens)
    for n in one.tensors:   # empirical Fisher: no sampled labels, which float32 logits of other batches can flip near a boundary
        a, b = one.tensors[n]['Lambda'], two.tensors[n]['Lambda']        # (eigenvectors: compared through the scores below)
        assert torch.allclose(a, b, rtol=0, atol=1e-5 * float(a.abs().max())), n
    s1, s2 = pd.read_parquet(tmp_path/'s-one.parquet'), pd.read_parquet(tmp_path/'s-two.parquet')
    assert s1.index.equals(s2.index) and list(s1.columns) == list(s2.columns)
    rel = float(abs(s1.to_numpy() - s2.to_numpy()).max() / abs(s1.to_numpy()).max())
    assert rel < 1e-4, rel


def test_scan_candidates_each_process_reads_its_share(results):
    "The BM25 pass of `scan(candidates=)` converted the whole corpus in every process; now each its strided share."
    one, two = results
    assert torch.equal(one['cand_indices'], two['cand_indices']) and close(one['cand_scores'], two['cand_scores'])
    assert int(one['cand_n_train']) == int(two['cand_n_train'])
    assert one['bm25_read_0'].tolist() == list(range(37))
    assert two['bm25_read_0'].tolist() == list(range(0, 37, 2)) and two['bm25_read_1'].tolist() == list(range(1, 37, 2))


def text(t): return bytes(t.tolist()).decode()


def test_scan_candidates_bad_records_as_one_process(results):
    "Skipped: counted over the processes, the corpus's first named; raised: by the process holding the first, the others follow."
    one, two = results
    assert torch.equal(one['skip_indices'], two['skip_indices']) and int(one['skip_n_skipped']) == int(two['skip_n_skipped']) == 2
    assert text(one['skip_first']) == text(two['skip_first']) and 'line 10' in text(one['skip_first'])
    assert text(one['raise_0']).startswith('BadRecordError: Bad corpus record at') and 'line 10' in text(one['raise_0'])
    assert text(two['raise_1']) == text(one['raise_0'])
    assert text(two['raise_0']) == ('RuntimeError: Process 1 of 2 stopped at corpus record 9 (its error says why); this process '
                                    'stops too.')


def test_cli_fit_with_a_process_that_gets_no_sequence(tmp_path):
    "Fewer records than processes on a Llama (gate_proj and up_proj read one input): a stranger's run aborted in gloo,\n    since the process with no sequence had seen no sharing and reduced one covariance too many. Now it equals one process."
    sys.path.insert(0, str(HERE))
    import own_model
    from influence_nb.ekfac import Factors
    r = own_model.build(tmp_path)
    (tmp_path/'one.jsonl').write_text(Path(r['corpus']).read_text().splitlines(keepends=True)[0])
    script, env = HERE/'cli_main.py', ENV
    for name, cmd in {'one': [sys.executable, str(script)],
                      'two': [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(script)]}.items():
        args = ['fit-factors', '--model', r['model'], '--data', tmp_path/'one.jsonl', '--out', tmp_path/f'f-{name}', '--quiet']
        p = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, f"{name} failed:\n{p.stdout[-2000:]}\n{p.stderr[-12000:]}"
    one, two = Factors.load(tmp_path/'f-one'), Factors.load(tmp_path/'f-two')
    assert (one.n_sequences, one.n_tokens) == (two.n_sequences, two.n_tokens) and one.n_sequences == 1
    assert any('gate_proj' in n for n in one.tensors)
    assert {n: sorted(t) for n, t in one.tensors.items()} == {n: sorted(t) for n, t in two.tensors.items()}
    for n in one.tensors:
        for k in one.tensors[n]:                                          # (a layer sharing another's input keeps no A of its own)
            a, b = one.tensors[n][k], two.tensors[n][k]
            assert torch.allclose(a, b, rtol=0, atol=1e-6 * float(a.abs().max())), (n, k)


def test_refusal_in_one_process_stops_every_process(tmp_path):
    """3 queries (or sequences) in 2 processes: process 0 has a batch of two rows, process 1 one row. A measurement giving
    each row its batch's total is refused on process 0's batch only; a NaN (a position only process 0's shard reaches), a
    preconditioning or a self-influence that overflows (one query or sequence: process 0's) likewise, and an error raised in
    the caller's loop over a pass (`together` throws it in). Process 1 went on
    into the pass's collective and died there ('Connection closed by peer') or waited. Now every process raises:
    process 0 as one process does, process 1 the same text, naming process 0 (an overflow: each sees it in the sum)."""
    sys.path.insert(0, str(HERE))
    from dist_worker import refusals
    (tmp_path/'one').mkdir(); (tmp_path/'two').mkdir()
    refusals(str(tmp_path/'one'))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(HERE/'dist_worker.py'), '--refusals']
    p = subprocess.Popen(cmd + [str(tmp_path/'two')], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try: out, err = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:                           # workers waiting in a collective: torchrun stops them on SIGTERM
        p.terminate(); out, err = p.communicate(timeout=60)
        raise AssertionError(f"the processes hung:\n{err[-4000:]}") from None
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-2000:]}\n{err[-12000:]}"
    one, r0, r1 = (json.loads((tmp_path/d/f'refusals-{r}.json').read_text()) for d, r in (('one', 0), ('two', 0), ('two', 1)))
    assert set(one) == set(r0) == set(r1) == {'pairwise', 'self', 'scan', 'fit', 'precondition', 'overflow', 'body'}
    assert one['body'] == 'ShardError: refused in the loop over the pass, in process 0 only'   # the loop's body's error
    assert r1['body'].startswith('ValueError: Process 0 of 2 stopped')             # (a ValueError there: its builtin kind)
    assert one['overflow'].startswith('ValueError: Self-influence of train[0] overflows torch.float32')   # summed first: each
    assert r0.pop('overflow') == r1.pop('overflow') == one.pop('overflow')                              # process sees it
    assert one['precondition'].startswith("ValueError: Preconditioning layer 'transformer.h.0.mlp.c_fc' with damping 1e-45 gave NaN/Inf")
    anon = lambda m: re.sub(r'\[[\d, ]+\]', '[…]', m)        # the batch refused holds other sequences in one process than in two
    for name in ('pairwise', 'self', 'scan'):
        assert one[name].startswith('ValueError: `measurement` mixes the sequences of a batch: its value for the sequence(s) [')
        assert one[name].endswith('pass `query_groups` (`--group-by`, `--aggregate`).'), one[name]
    assert one['fit'].startswith("ValueError: Non-finite values (NaN or Inf) in the activations of layer 'transformer.h.0.")
    for name in one:
        assert anon(r0[name]) == anon(one[name]), (name, r0[name])
        assert r1[name] == f'ValueError: Process 0 of 2 stopped, so this process stops too. Its error: {r0[name]}', (name, r1[name])
