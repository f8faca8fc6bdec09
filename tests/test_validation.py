"""The iterative strategies ('cg', 'lissa') through `pairwise_scores` against exact influence, the regressor adapter's
PBRF derivative, and nbs/results/validation.json (written by `influence_nb.evaluate.main`, e.g. through
`python benchmarks/validation.py`; read by nbs/20_validation and nbs/22_lds): its schema, that its summaries are its
data's, and that the claims the notebooks state (`influence_nb.evaluate.STATED`) hold on it. A missing file, task or
entry is a failure, never a skip."""
import json
from pathlib import Path
import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
import influence_nb as inf
from influence_nb.theory import exact_influence
from influence_nb.pbrf import pbrf_response, pbrf_influence
from randdata import param_names, tanh_mlp

f64 = torch.float64
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / 'nbs' / 'results' / 'validation.json'


pytestmark = pytest.mark.usefixtures('one_thread')   # tests/conftest.py


def _trained(net, X, loss_fn, steps=60, lr=0.03):
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):                                             # briefly trained: θ_s is not an optimum
        opt.zero_grad(); loss_fn(net(X)).backward(); opt.step()
    return net


@pytest.fixture(scope='module')
def classifier():
    X = torch.randn(28, 4, dtype=f64, generator=torch.Generator().manual_seed(0))
    y = (X[:, 0] > 0).long() + (X[:, 1] + X[:, 2] > 0.5).long()      # 3 classes
    net = tanh_mlp((4, 6, 3), seed=0)
    _trained(net, X[:24], lambda out: torch.nn.functional.cross_entropy(out, y[:24]))
    clf = inf.ClassifierAsLM(net, X)
    fit = inf.ClassifierAsLM.sequences(range(24), y[:24])
    queries = inf.ClassifierAsLM.sequences(range(24, 28), y[24:])
    return clf, fit, queries


@pytest.fixture(scope='module')
def regressor():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(24, 3, dtype=f64, generator=g)
    Y = torch.stack([X[:, 0] * X[:, 1], torch.sin(X[:, 2])], 1) + 0.1 * torch.randn(24, 2, dtype=f64, generator=g)
    net = tanh_mlp((3, 6, 2), seed=1)
    _trained(net, X[:20], lambda out: 0.5 * (out - Y[:20]).pow(2).sum(1).mean())
    reg = inf.RegressorAsLM(net, X, Y)
    return reg, net, X, Y, inf.RegressorAsLM.sequences(range(20)), inf.RegressorAsLM.sequences(range(20, 24))


def _dense_regression(net, X, Y, fit_idx):
    "Per-example Jacobians [n, d_out, P] of the net at its parameters, and the GGN (mean JᵀJ over `fit_idx`)."
    names = [n for n, _ in net.named_parameters()]
    sizes = [p.numel() for p in net.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    at = lambda th: torch.func.functional_call(net, {n: t.view(p.shape) for n, t, p in
                                                     zip(names, th.split(sizes), net.parameters())}, (X,))
    J = torch.func.jacrev(at)(theta)                                   # [n, d_out, P]
    G = torch.einsum('nop,noq->pq', J[fit_idx], J[fit_idx]) / len(fit_idx)
    grads = torch.einsum('nop,no->np', J, (net(X) - Y).detach())       # ∇ ½‖h − y‖² per example
    return G, grads


def _cg_equals_exact(model, fit, queries, modules, lam, rel):
    "CG at tolerance 1e-10 through `pairwise_scores` equals the dense float64 solve of 01_theory to `rel` × the largest score."
    f = inf.fit_factors(model, fit, 'cg', modules=modules, progress=False, solver={'tol': 1e-10})
    sc = inf.pairwise_scores(model, f, queries, fit, damping=lam, progress=False).total.double()
    ex = exact_influence(model, param_names(model, modules), queries, fit, lam)
    torch.testing.assert_close(sc, ex, rtol=0, atol=rel * ex.abs().max().item())


def test_cg_pairwise_equals_exact_classifier(classifier):
    clf, fit, queries = classifier
    _cg_equals_exact(clf, fit, queries, 'all', lam=0.03, rel=1e-7)


def test_cg_pairwise_equals_exact_regressor(regressor):
    reg, net, X, Y, fit, queries = regressor
    lam = 0.02
    G, grads = _dense_regression(net, X, Y, torch.arange(20))
    # score = ∇(−L_q)ᵀ (G + λI)⁻¹ ∇(−L_n) = ∇L_qᵀ (G + λI)⁻¹ ∇L_n
    exact = grads[20:] @ torch.linalg.solve(G + lam * torch.eye(len(G), dtype=f64), grads[:20].T)   # [4, 20]
    f = inf.fit_factors(reg, fit, 'cg', modules='all', progress=False, solver={'tol': 1e-10})
    sc = inf.pairwise_scores(reg, f, queries, fit, damping=lam, progress=False).total.double()
    torch.testing.assert_close(sc, exact, rtol=0, atol=1e-7 * exact.abs().max().item())
    # the identity strategy is the plain dot product of the same gradients (sign conventions agree)
    fi = inf.fit_factors(reg, fit, 'identity', modules='all', progress=False)
    dot = inf.pairwise_scores(reg, fi, queries, fit, progress=False).total.double()
    torch.testing.assert_close(dot, grads[20:] @ grads[:20].T, rtol=1e-10, atol=1e-12)


def test_lissa_pairwise_close_to_exact(classifier, regressor):
    "LiSSA (full-batch recursion, 150 steps) lands within a few % of exact influence, on cross-entropy and squared error."
    clf, fit, queries = classifier
    lam = 0.1
    ex = exact_influence(clf, param_names(clf, 'all'), queries, fit, lam)
    f = inf.fit_factors(clf, fit, 'lissa', modules='all', progress=False, solver={'depth': 150})
    sc = inf.pairwise_scores(clf, f, queries, fit, damping=lam, progress=False).total.double()
    assert ((sc - ex).norm() / ex.norm()).item() < 0.03
    reg, net, X, Y, rfit, rq = regressor
    G, grads = _dense_regression(net, X, Y, torch.arange(20))
    rex = grads[20:] @ torch.linalg.solve(G + lam * torch.eye(len(G), dtype=f64), grads[:20].T)
    f = inf.fit_factors(reg, rfit, 'lissa', modules='all', progress=False, solver={'depth': 150})
    rsc = inf.pairwise_scores(reg, f, rq, rfit, damping=lam, progress=False).total.double()
    assert ((rsc - rex).norm() / rex.norm()).item() < 0.03
    # and it is an approximation, not the exact answer: a short recursion is visibly worse
    f = inf.fit_factors(reg, rfit, 'lissa', modules='all', progress=False, solver={'depth': 5})
    short = inf.pairwise_scores(reg, f, rq, rfit, damping=lam, progress=False).total.double()
    assert ((short - rex).norm() / rex.norm()).item() > 0.05


def test_cg_pairwise_equals_exact_tiny_lm():
    torch.manual_seed(0)
    lm = inf.tiny_model('gpt2', vocab=24, hidden=8, layers=1, ctx=16, seed=0).double()
    g = torch.Generator().manual_seed(0)
    train = inf.as_sequences([torch.randint(1, 24, (int(n),), generator=g) for n in torch.randint(4, 9, (10,), generator=g)])
    q = torch.randint(1, 24, (7,), generator=g)
    queries = inf.as_sequences([{'input_ids': q, 'labels': [-100] * 4 + q[4:].tolist()}])
    _cg_equals_exact(lm, train, queries, 'mlp', lam=0.01, rel=1e-6)


def test_regressor_pbrf_derivative(regressor):
    "d θ(ε)/dε at 0 = −(G + λI)⁻¹ ∇L(z_m) through the adapter (sequences, loss='mse'), and f's derivative likewise."
    reg, net, X, Y, fit, queries = regressor
    lam, m, eps = 0.05, 4, 1e-6
    names = ['net.' + n for n, _ in net.named_parameters()]
    G, grads = _dense_regression(net, X, Y, torch.arange(20))
    A = G + lam * torch.eye(len(G), dtype=f64)
    deriv = -torch.linalg.solve(A, grads[m])
    plus, minus = (pbrf_response(reg, names, fit, fit[m], e, lam, loss='mse') for e in (eps, -eps))
    assert plus.converged and minus.converged
    torch.testing.assert_close((plus.delta - minus.delta) / (2 * eps), deriv, rtol=0, atol=1e-6 * deriv.abs().max().item())
    res = pbrf_influence(reg, names, fit, fit[m], queries, lam, loss='mse')
    expected = grads[20:] @ torch.linalg.solve(A, grads[m])            # = −∇f_qᵀ dθ/dε with f = −½‖h − y‖²
    torch.testing.assert_close(res.influence, expected, rtol=0, atol=1e-6 * expected.abs().max().item())


def test_mse_sequences_need_targets(regressor):
    reg, net, X, Y, fit, queries = regressor
    from influence_nb.pbrf import gnvp
    names = ['net.' + n for n, _ in net.named_parameters()]
    v = torch.zeros(sum(p.numel() for p in net.parameters()), dtype=f64)
    with pytest.raises(ValueError, match='turns a scored label into its target'):
        gnvp(inf.ClassifierAsLM(net, X), names, fit, v, loss='mse')   # no `Y`: the squared error has no target
    with pytest.raises(ValueError, match='not a row of the model'):
        gnvp(reg, names, [{'input_ids': [0, 99], 'labels': [-100, 99]}], v, loss='mse')


# ---- nbs/results/validation.json ----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def results():
    assert RESULTS.exists(), f'{RESULTS} is missing: run `python benchmarks/validation.py`'
    return json.loads(RESULTS.read_text())


@pytest.fixture(scope='module')
def V():
    import influence_nb.evaluate
    return influence_nb.evaluate


METHOD_KEYS = {'strategy', 'solver', 'seconds', 'pearson', 'spearman', 'pearson_pooled', 'spearman_pooled'}


def test_results_schema(results, V):
    assert results['schema_version'] == V.SCHEMA_VERSION
    for k in ('updated', 'torch', 'python', 'threads', 'command', 'problems'): assert k in results, k
    assert set(results['problems']) == set(V.PROBLEMS)
    for name, p in results['problems'].items():
        for k in ('written', 'torch', 'config', 'truth', 'model', 'n_params', 'damping', 'damping_rule', 'train_idx',
                  'query_idx', 'n_points', 'n_queries', 'methods', 'pbrf', 'scores'):
            assert k in p, (name, k)
        assert p['n_points'] >= 100 and p['n_queries'] >= 5, name
        assert len(p['train_idx']) == p['n_points'] and len(p['query_idx']) == p['n_queries']
        assert p['damping'] > 0
        want = {'ekfac', 'kfac', 'diagonal', 'identity', 'cg'}
        assert want <= set(p['methods']) and any(m['strategy'] == 'lissa' for m in p['methods'].values()), name
        for m, row in p['methods'].items():
            assert METHOD_KEYS <= set(row), (name, m)
            assert row['seconds'] >= 0 and -1 <= row['pearson'] <= 1 and -1 <= row['spearman'] <= 1
            assert np.array(p['scores'][m]).shape == (p['n_queries'], p['n_points']), (name, m)
        assert p['pbrf']['solver']['solves'] > 0
    for name in ('regression', 'classification'):
        p = results['problems'][name]
        assert p['truth'] == 'pbrf' and p['pbrf']['solver']['solves'] == 2 * p['n_points']
        assert [r['damping_rel'] for r in p['damping_sweep']] == p['config']['sweep_rel']
        assert p['exact']['rebuilt_identity_max_rel_dev'] < 1e-6 and p['exact']['exact_full']['pearson'] > 0.999
    for task in V.LDS_TASKS:
        L = results[task]
        cfg = L['config']
        assert cfg['n_subsets'] >= 50
        actual = np.array(L['actual'])                                 # [seeds, J, Q]
        assert actual.shape == (len(cfg['seeds']), cfg['n_subsets'], cfg['n_queries'])
        assert {'ekfac', 'kfac', 'diagonal', 'identity'} <= set(L['methods'])
        for name, m in L['methods'].items():
            assert {'lds', 'sem', 'per_query', 'seconds'} <= set(m), name
            assert len(m['per_query']) == cfg['n_queries']
            assert np.array(L['predicted'][name]).shape == actual.shape[1:], name
        masks = np.array([[int(b) for b in bin(int(h, 16))[2:].zfill(cfg['n_sample'])] for h in L['subsets_hex']])
        assert masks.shape == (cfg['n_subsets'], cfg['n_sample'])
        assert (masks.sum(1) == int(cfg['alpha'] * cfg['n_sample'])).all()


def test_results_summaries_are_the_data(results, V):
    "Every stored correlation and LDS is recomputed from the stored scores and retraining outcomes."
    for name, p in results['problems'].items():
        truth = np.array(p['scores']['pbrf' if p['truth'] == 'pbrf' else 'cg'])
        for m, row in p['methods'].items():
            s = np.array(p['scores'][m])
            per_q = np.mean([pearsonr(s[q], truth[q])[0] for q in range(len(truth))])
            assert abs(per_q - row['pearson']) < 1e-6, (name, m)
            per_q = np.mean([spearmanr(s[q], truth[q])[0] for q in range(len(truth))])
            assert abs(per_q - row['spearman']) < 1e-6, (name, m)
            assert abs(pearsonr(s.ravel(), truth.ravel())[0] - row['pearson_pooled']) < 1e-6, (name, m)
    for task in V.LDS_TASKS:
        L = results[task]
        actual = np.array(L['actual']).mean(0)
        for name, m in L['methods'].items():
            per_q = [spearmanr(actual[:, q], np.array(L['predicted'][name])[:, q])[0] for q in range(actual.shape[1])]
            np.testing.assert_allclose(per_q, m['per_query'], atol=1e-6)
            assert abs(np.mean(per_q) - m['lds']) < 1e-6, (task, name)


def test_results_complete(results, V):
    "Every problem, the exact references and both LDS tasks are in the file: a missing one fails, naming the command."
    missing = [k for k in V.PROBLEMS if k not in results['problems']] + [t for t in V.LDS_TASKS if t not in results]
    missing += ['exact'] if not all('exact' in results['problems'].get(k, {}) for k in ('regression', 'classification')) else []
    assert not missing, f"not in {RESULTS}: {missing}; run python benchmarks/validation.py --tasks {','.join(missing)}"


def test_results_claims_match_notebooks(results, V):
    "The notebooks assert `claims(file) == STATED`; so does CI, and every claim they discuss is stated."
    cl = V.claims(results)
    assert set(cl) == set(V.STATED), set(cl) ^ set(V.STATED)          # every stated claim is evaluated: none missing
    wrong = {k: v['detail'] for k, v in cl.items() if v['holds'] != V.STATED[k]}
    assert not wrong, wrong


def test_notebooks_define_the_method_and_read_the_file():
    "20 and 22 export the evaluation API, read results/validation.json next to them, and never load from benchmarks/."
    for nb, module in (('20_validation.ipynb', 'evaluate'), ('22_lds.ipynb', 'lds'), ('21_exact.ipynb', 'exact')):
        text = (ROOT / 'nbs' / nb).read_text()
        assert f'#| default_exp {module}' in text, nb
        assert '../benchmarks' not in text and 'sys.path' not in text and 'importlib' not in text, nb
        if module != 'exact':
            assert "Path('results/validation.json')" in text and 'claims(res)' in text and 'STATED[k]' in text, nb


def test_wrapper_is_thin_and_defaults_to_the_notebooks_file(tmp_path):
    "benchmarks/validation.py is a short command line over `influence_nb.evaluate.main`, writing nbs/results/ by default."
    import importlib.util
    path = ROOT / 'benchmarks' / 'validation.py'
    assert len(path.read_text().splitlines()) <= 100
    spec = importlib.util.spec_from_file_location('validation_wrapper', path)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    assert mod.RESULTS == RESULTS
    assert mod.main(['--tasks', 'no-such-task']) == 2                 # refused before anything runs
    assert not (tmp_path / 'v.json').exists()


def test_claims_function_on_planted_results(V):
    "`claims` reads targets correctly: a planted file where EK-FAC matches LiSSA at 100x less time meets that target."
    m = lambda p, s, strat='x', solver=None: dict(pearson=p, spearman=p, seconds=s, strategy=strat, solver=solver)
    methods = {'ekfac': m(0.95, 1.0, 'ekfac'), 'kfac': m(0.9, 1.0, 'kfac'), 'diagonal': m(0.5, 1.0, 'diagonal'),
               'identity': m(0.3, 0.5, 'identity'), 'cg': m(1.0, 50., 'cg'),
               'lissa-10': m(0.5, 10., 'lissa', {'depth': 10}), 'lissa-1000': m(0.97, 100., 'lissa', {'depth': 1000})}
    prob = dict(methods=methods, pbrf=dict(max_rel_dev_from_cg=1e-6, solver=dict(failed=0, solves=200)), damping_sweep=[])
    cl = V.claims({'problems': {'regression': prob}})
    assert cl['target_ekfac_pearson_0.9_regression']['holds'] and cl['target_ekfac_near_lissa_regression']['holds']
    methods['lissa-1000']['seconds'] = 5.                              # only 5x slower than EK-FAC: missed
    assert not V.claims({'problems': {'regression': prob}})['target_ekfac_near_lissa_regression']['holds']
    methods['lissa-1000'].update(seconds=100., pearson=0.99); methods['ekfac']['pearson'] = 0.9   # gap 0.09: missed
    assert not V.claims({'problems': {'regression': prob}})['target_ekfac_near_lissa_regression']['holds']


def test_pbrf_scores_resume(regressor, V, tmp_path):
    """The harness's PBRF runs resume from their cache (`pbrf.pbrf_scores`): finished points are read back, a line cut
    by the interruption is skipped, the answer is the same; another damping shares nothing."""
    reg, net, X, Y, fit, queries = regressor
    names = ['net.' + n for n, _ in net.named_parameters()]
    cache = tmp_path / 'pbrf.jsonl'
    args = (reg, names, fit, [0, 3, 5, 8], queries, 0.05, 1e-5, 1e-8, 20)
    full, _, rec = V.pbrf_truth(*args, cache=cache)
    assert rec['resumed_points'] == 0 and rec['solves'] == 8 and rec['warm_starts'] == 4 and rec['failed'] == 0
    lines = cache.read_text().splitlines()
    assert len(lines) == 4
    cache.write_text('\n'.join(lines[:2]) + '\n' + lines[2][:25])  # two points done, the third cut mid-line
    again, _, rec = V.pbrf_truth(*args, cache=cache)
    assert rec['resumed_points'] == 2
    torch.testing.assert_close(again, full, rtol=0, atol=0)         # the cached values are the computed ones, exactly
    assert V.pbrf_truth(*args, cache=cache)[2]['resumed_points'] == 4
    other, _, rec = V.pbrf_truth(reg, names, fit, [0, 3], queries, 0.06, 1e-5, 1e-8, 20, cache=cache)
    assert rec['resumed_points'] == 0
