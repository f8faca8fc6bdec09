"""Session 7 (issue 18, DEDUPE2): the results files and caches that evaluate, train, experiments.harness and
benchmarks/perf.py now write through `influence_nb.artefact` hold exactly the bytes the hand-written versions wrote,
under the same names and cache keys, readable by all (0644), with no temporary file left behind."""
import hashlib, json, os, sys
from pathlib import Path
from types import SimpleNamespace
import numpy as np
import pytest
import influence_nb as inf
from influence_nb import evaluate, train
from influence_nb.experiments import harness

ROOT = Path(__file__).resolve().parent.parent
RES = {'é': [1, 2.5, None], 'nested': {'x': float('inf')}, 'n': 3}   # non-ASCII and a non-finite float


def _only(folder, name, mode=0o644):
    "`folder` holds `name` and nothing else (no temporary file), with permissions `mode`."
    assert sorted(os.listdir(folder)) == [name]
    assert os.stat(Path(folder)/name).st_mode & 0o777 == mode


def test_harness_results_bytes_and_round_trip(tmp_path):
    p = tmp_path/'sub'/'experiments.json'                               # the folder is created
    harness.save_results(RES, p)
    assert p.read_bytes() == (json.dumps(RES, indent=1, ensure_ascii=False) + '\n').encode()
    _only(p.parent, p.name)
    assert harness.load_results(p)['é'] == RES['é']


def test_evaluate_save_json_bytes(tmp_path):
    p = tmp_path/'validation.json'
    evaluate.save_json(RES, p)
    assert p.read_bytes() == json.dumps(RES).encode()
    _only(tmp_path, p.name)


def test_perf_save_results_bytes_and_engine_hash(tmp_path):
    sys.path.insert(0, str(ROOT/'benchmarks'))
    try: import perf
    finally: sys.path.remove(str(ROOT/'benchmarks'))
    p = tmp_path/'perf.json'
    perf.save_results(p, RES)
    assert p.read_bytes() == json.dumps(RES, indent=1).encode()
    _only(tmp_path, p.name)
    eng = perf.snapshot_engine(tmp_path/'wd')                           # the hash the old hand-written loop computed
    h = hashlib.sha256()
    for f in sorted((tmp_path/'wd'/'engine'/'influence_nb').glob('*.py')): h.update(f.name.encode()); h.update(f.read_bytes())
    assert eng['sha256'] == h.hexdigest()[:16]


def test_stage_cache_key_unchanged_and_round_trip(tmp_path):
    """Stage files are named by the config and the factors' label sampling (so runs of one version reuse them, and
    scores of factors whose labels were drawn otherwise are not reused: session 20), and save/load round-trips every array."""
    from influence_nb.kfac import LABEL_SAMPLING
    cfg = dict(harness.CFG)
    run = SimpleNamespace(cfg=cfg, size='gpt2-s', cache=tmp_path,
                          factors=SimpleNamespace(fingerprint='f' * 64, info={'label_sampling': LABEL_SAMPLING}),
                          d=SimpleNamespace(queries={'q0': {'id': 'q0'}, 'q1': {'id': 'q1'}}))
    run.stage_path = lambda stage: harness.Run.stage_path(run, stage)
    for stage in ('pool', 'unfiltered'):
        keyed = {k: cfg[k] for k in harness.STAGE_KEYS[stage]}
        if stage == 'unfiltered': keyed['full'] = run.size in cfg['full_split']
        keyed['labels'] = LABEL_SAMPLING
        key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:10]
        assert run.stage_path(stage).name == f"gpt2-s-{stage}-{'f' * 16}-{key}.npz"
        older = SimpleNamespace(**{**vars(run), 'factors': SimpleNamespace(fingerprint='f' * 64, info={})})
        assert harness.Run.stage_path(older, stage) != run.stage_path(stage)   # factors of an older sampling: other files
    st = dict(queries=[{'id': 'q1'}, {'id': 'q0'}], n_en=1, idx=np.array([4, 2]), total=np.arange(4.).reshape(2, 2),
              modules=['m0', 'm1'], per_layer={'m0': np.ones((2, 2)), 'm1': -np.ones((2, 2))}, in_sample=np.array([True, False]))
    harness.Run.save_stage(run, 'pool', st)
    _only(run.stage_path('pool').parent, run.stage_path('pool').name)
    back = harness.Run.load_stage(run, 'pool')
    assert [q['id'] for q in back['queries']] == ['q1', 'q0'] and back['n_en'] == 1
    for k in ('idx', 'total', 'in_sample'): np.testing.assert_array_equal(back[k], st[k])
    for m in st['modules']: np.testing.assert_array_equal(back['per_layer'][m], st['per_layer'][m])


def test_checkpoint_json_bytes(tmp_path):
    model = inf.tiny_model('gpt2', layers=1)
    hist, metrics = {'loss': [3.5, 2.25], 'steps': 2}, {'recall': 0.5, 'é': None}
    out = train.save_checkpoint(model, tmp_path/'ck', history=hist)    # one at a time: both together also need a
    train.save_checkpoint(model, out, metrics=metrics)                  # full `recall_metrics` dict for the model card
    assert (out/'train_log.json').read_bytes() == (json.dumps(hist, indent=1) + '\n').encode()
    assert (out/'metrics.json').read_bytes() == (json.dumps(metrics, indent=1) + '\n').encode()
    assert not [p.name for p in out.iterdir() if 'tmp' in p.name]


def test_perf_micro_steps_check_every_pair_on_small_shapes():
    "`micro`, split into named steps: each alternative is asserted equal to the current expression (`check`), one row a pair."
    sys.path.insert(0, str(ROOT/'benchmarks'))
    try: import perf
    finally: sys.path.remove(str(ROOT/'benchmarks'))
    rows, md = perf.micro(1, B=2, T=8, q=3, r=2, shapes=((24, 8), (8, 24)))
    whats = [w for w, *_ in rows]
    assert len(whats) == len(set(whats)) == 10 + 9 + 1                 # the wide side adds ssyrk; sampling once
    assert whats[-1] == 'pseudo-label sampling, one batch (2×7 tokens, vocab 2048)'
    assert md.count('\n') == len(rows) + 1                              # header, rule, one line a row
