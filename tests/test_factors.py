"Issue 17/18 (FACTORS): the exact-expectation Fisher against brute force, float32 factors, strategy 'pcg'."
import itertools, random
import pytest, torch
import influence_nb as inf
from influence_nb.ekfac import Factors, fit_factors, STRATEGIES, ITERATIVE
from influence_nb.modules import find_modules, tiny_model
from influence_nb.scores import ClassifierAsLM, RegressorAsLM
from randdata import tanh_mlp, pearson


def _classifier(seed=0, n=7, d=4, h=5, C=3):
    net = tanh_mlp((d, h, C), seed)
    X = torch.randn(n, d, dtype=torch.float64)                         # the global generator, after the weights
    model = ClassifierAsLM(net, X).eval()
    y = torch.randint(0, C, (n,)).tolist()
    return model, X, ClassifierAsLM.sequences(range(n), y)


def _brute_force(model, layers, cases, Q):
    """S, Λ as the probability-weighted Σ over every labelling of each sequence's scored tokens, averaged over the
    sequences (autograd, float64). `cases`: per sequence, `(input_ids [T], [(labels [T], probability), ...])`;
    `Q`: layer name -> (Q_S, Q_A), the eigenbasis Λ is rotated into."""
    S = {l.name: 0 for l in layers}; Lam = {l.name: 0 for l in layers}
    outs = {}
    def keep(name):
        def hook(mod, inputs, out): out.retain_grad(); outs[name] = out
        return hook
    hooks = [l.module.register_forward_hook(keep(l.name)) for l in layers]
    try:
        for ids, labellings in cases:
            for lab, w in labellings:
                model.zero_grad()
                inf.kfac.summed_loss(model(input_ids=ids[None]).logits, lab[None]).backward()
                for l in layers:
                    g = l.canonical_grad().double()                              # DW̄(y) = Σ_t Ds_t āᵀ_t
                    ds = outs[l.name].grad[0].double()                           # [T, d_out]
                    S[l.name] = S[l.name] + w * ds.T @ ds
                    QS, QA = Q[l.name]
                    Lam[l.name] = Lam[l.name] + w * (QS.T @ g @ QA) ** 2
    finally:
        for h in hooks: h.remove()
    return {n: v / len(cases) for n, v in S.items()}, {n: v / len(cases) for n, v in Lam.items()}


def _assert_exact_fisher(f, model, layers, cases, rel_S, rel_Lam):
    "The fitted S and Λ of `f` equal `_brute_force` (in `f`'s own eigenbasis) to `rel_*` × their largest entry."
    Q = {l.name: (f.tensors[l.name]['QS'], f.tensors[l.name]['QA']) for l in layers}
    S, Lam = _brute_force(model, layers, cases, Q)
    for l in layers:
        t = f.tensors[l.name]
        assert torch.allclose(t['S'], S[l.name], rtol=0, atol=rel_S * float(S[l.name].abs().max()))
        assert torch.allclose(t['Lambda'], Lam[l.name], rtol=0, atol=rel_Lam * float(Lam[l.name].abs().max()))


def test_exact_fisher_classifier_equals_sum_over_labels(one_thread):
    "fisher='exact' on a classifier: S, A and Λ equal the probability-weighted sum over all labels (float64)."
    model, X, seqs = _classifier()
    layers = find_modules(model, 'all', warn=False)
    f = fit_factors(model, seqs, 'ekfac', modules='all', fisher='exact', factor_dtype='float64', progress=False)
    seqs_n = inf.data.check_sequences(model, seqs, 'train')
    with torch.no_grad(): P = [model(input_ids=s['input_ids'][None]).logits[0, 0].softmax(-1) for s in seqs_n]
    def labelled(c): lab = torch.full((2,), -100); lab[1] = c; return lab       # position 1 scored, as class c
    cases = [(s['input_ids'], [(labelled(c), float(p[c])) for c in range(3)]) for s, p in zip(seqs_n, P)]
    _assert_exact_fisher(f, model, layers, cases, rel_S=1e-12, rel_Lam=1e-10)
    # A does not depend on the labels: the mean of ā āᵀ over both positions of every sequence
    a = torch.cat([X, torch.ones(len(X), 1, dtype=torch.float64)], 1)
    A0 = 2 * a.T @ a / (2 * len(X))
    assert torch.allclose(f.tensors[layers[0].name]['A'], A0, rtol=0, atol=1e-12)


def test_exact_fisher_several_tokens_equals_sum_over_labellings(one_thread):
    "Two interacting scored tokens (a tiny GPT-2, 32 outputs): Λ equals the sum over all 32² labellings, weighted."
    m = tiny_model('gpt2', layers=1, seed=2).double()
    layers = find_modules(m, 'mlp')
    seq = {'input_ids': torch.tensor([3, 7, 11, 5]), 'labels': torch.tensor([-100, -100, 11, 5])}   # positions 1, 2 scored
    f = fit_factors(m, [seq], 'ekfac', fisher='exact', factor_dtype='float64', progress=False)
    with torch.no_grad(): p = m(input_ids=seq['input_ids'][None]).logits[0].softmax(-1)    # [T, 32]
    labellings = [(torch.tensor([-100, -100, y1, y2]), float(p[1, y1] * p[2, y2]))
                  for y1, y2 in itertools.product(range(32), range(32))]
    _assert_exact_fisher(f, m, layers, [(seq['input_ids'], labellings)], rel_S=1e-9, rel_Lam=1e-9)


def test_exact_fisher_is_the_limit_of_many_samples(one_thread):
    "The sampled true Fisher converges to fisher='exact' like 1/√k."
    model, X, seqs = _classifier(seed=1, n=6)
    ex = fit_factors(model, seqs, 'ekfac', modules='all', fisher='exact', factor_dtype='float64', progress=False)
    err = {}
    for k in (4, 1600):
        tr = fit_factors(model, seqs, 'kfac', modules='all', fisher='true', fisher_samples=k, factor_dtype='float64', progress=False)
        err[k] = max(float((tr.tensors[n]['S'] - ex.tensors[n]['S']).norm() / ex.tensors[n]['S'].norm()) for n in ex.modules)
    assert err[1600] < 0.05 and err[1600] < err[4] / 8, err                  # √(1600/4) = 20


def test_exact_fisher_regressor_identity_hessian(one_thread):
    "Squared error: the output Hessian is I, so the output layer's S is exactly I (one scored token per example)."
    net = tanh_mlp((3, 4, 2), seed=0)
    X, Y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    model = RegressorAsLM(net, X, Y).eval()
    f = fit_factors(model, RegressorAsLM.sequences(range(5)), 'kfac', modules='all', fisher='exact',
                    factor_dtype='float64', progress=False)
    assert torch.allclose(f.tensors['net.2']['S'], torch.eye(2, dtype=torch.float64), atol=1e-14)


def test_exact_fisher_refuses_large_heads():
    m = tiny_model('gpt2', layers=1, vocab=80)
    with pytest.raises(ValueError, match='80 outputs'):
        fit_factors(m, [{'input_ids': torch.tensor([1, 2, 3])}], 'kfac', fisher='exact', progress=False)
    with pytest.raises(ValueError, match="'true', 'empirical' or 'exact'"):
        fit_factors(m, [{'input_ids': torch.tensor([1, 2, 3])}], 'kfac', fisher='exac', progress=False)



@pytest.mark.parametrize('family', ['mixtral', 'qwen2_moe'])
def test_exact_fisher_for_moe_experts_is_the_weighted_sum_over_labels(one_thread, family):
    """Session 23: fisher='exact' was refused for MoE experts. With one scored token and 32 outputs, each expert's S is the
    probability-weighted sum of the empirical S of the 32 labellings (a path tested on its own), and Λ the weighted sum of
    (Q_Sᵀ G_y Q_A)² with G_y autograd's gradient of the expert's slice."""
    m = tiny_model(family, layers=1).double()
    layers = [l for l in find_modules(m, 'mlp') if l.expert is not None]
    ids = torch.tensor([3, 7, 11, 5, 9])
    seq = lambda y: {'input_ids': ids, 'labels': torch.tensor([-100, -100, -100, -100, y])}
    f = fit_factors(m, [seq(0)], 'ekfac', fisher='exact', factor_dtype='float64', progress=False)
    with torch.no_grad(): p = m(input_ids=ids[None]).logits[0, -2].softmax(-1)
    S, Lam = {l.name: 0 for l in layers}, {l.name: 0 for l in layers}
    for y in range(len(p)):
        e = fit_factors(m, [seq(y)], 'kfac', fisher='empirical', factor_dtype='float64', progress=False)
        m.zero_grad(); inf.kfac.summed_loss(m(input_ids=ids[None]).logits, seq(y)['labels'][None]).backward()
        for l in layers:
            t, te = f.tensors[l.name], e.tensors[l.name]
            S[l.name] = S[l.name] + p[y] * (te['QS'] * te['lS']) @ te['QS'].T
            Lam[l.name] = Lam[l.name] + p[y] * (t['QS'].T @ l.canonical_grad().double() @ t['QA']) ** 2
    routed, tol = 0, 1e-6   # both models take their router's and attention's softmax in float32: two backward paths through
    for l in layers:        # the same float64 model agree to float32 rounding (measured: 5e-8 of the largest entry), not 1e-16
        t = f.tensors[l.name]
        got = (t['QS'] * t['lS']) @ t['QS'].T
        torch.testing.assert_close(got, S[l.name], rtol=0, atol=tol * max(float(S[l.name].abs().max()), 1e-30))
        torch.testing.assert_close(t['Lambda'], Lam[l.name], rtol=0, atol=tol * max(float(Lam[l.name].abs().max()), 1e-30))
        routed += bool(Lam[l.name].abs().max() > 0)
    assert routed >= 2                                                    # experts that saw tokens, not only empty ones


def test_float32_factors_agree_with_float64_bundled(one_thread):
    "The default factor dtype is justified by accuracy: float32 factors give the float64 scores (Pearson ≥ 0.9999)."
    from influence_nb.data import load_bundled
    from influence_nb.corpus import load_corpus, load_queries
    model, tok = load_bundled('gpt2-s')
    recs = load_corpus('train')
    texts = [recs[i]['text'] for i in random.Random(0).sample(range(len(recs)), 48)]
    train = inf.tokenize(tok, texts, max_length=64)
    qs = [q for q in load_queries() if q['kind'] == 'fact' and q['lang'] == 'en'][:4]
    queries = inf.tokenize_pairs(tok, [(q['prompt'], q['completion']) for q in qs])
    got = {}
    for dt in ('float32', 'float64'):
        f = fit_factors(model, train, 'ekfac', batch_size=16, factor_dtype=dt, progress=False)
        assert {t.dtype for d in f.tensors.values() for t in d.values()} == {getattr(torch, dt)}
        got[dt] = inf.pairwise_scores(model, f, queries, train, batch_size=16, progress=False).total
    r = pearson(got['float32'], got['float64'])
    print(f'gpt2-s: Pearson(float32 factors, float64 factors) = {r:.9f}')
    assert r >= 0.9999
    assert inf.ekfac.FACTOR_DTYPE is None                                     # the default: float32 for this float32 model
    f = fit_factors(model, train[:8], 'ekfac', batch_size=8, progress=False)
    assert {t.dtype for d in f.tensors.values() for t in d.values()} == {torch.float32}


def test_float32_factors_half_the_bytes(one_thread):
    m = tiny_model('llama', layers=1, hidden=32)
    seqs = [{'input_ids': torch.randint(1, 32, (12,))} for _ in range(6)]
    size = {dt: sum(t.numel() * t.element_size() for d in fit_factors(m, seqs, 'ekfac', factor_dtype=dt, progress=False).tensors.values()
                    for t in {id(t): t for t in d.values()}.values()) for dt in ('float32', 'float64')}
    assert 2 * size['float32'] == size['float64']


def test_pcg_is_a_solver_whose_preconditioner_is_ekfac_and_saves_as_ekfac(one_thread, tmp_path):
    m = tiny_model('gpt2', layers=2)
    seqs = [{'input_ids': torch.randint(1, 32, (n,))} for n in (9, 12, 7, 10, 11, 8)]
    e = fit_factors(m, seqs, 'ekfac', seed=4, progress=False)
    p = fit_factors(m, seqs, 'pcg', seed=4, progress=False, solver=dict(max_iter=3))
    assert 'pcg' in STRATEGIES and 'pcg' in ITERATIVE and not hasattr(e, 'fit_data')
    pre = p.preconditioner
    assert all(torch.equal(pre.tensors[n][k], e.tensors[n][k]) for n in e.modules for k in e.tensors[n])
    assert len(p.fit_data) == len(seqs) and p.options['max_iter'] == 3 and 'solver' not in pre.info
    n = e.modules[0]
    V = torch.randn(*e.shapes[n])
    assert torch.equal(pre.precondition(n, V, 1e-2), e.precondition(n, V, 1e-2))
    assert torch.equal(pre.eigenvalues(n), e.eigenvalues(n))
    with pytest.raises(ValueError, match=r'solver.preconditioner.save\(path\)'): p.save(tmp_path)
    back = Factors.load(pre.save(tmp_path))
    assert back.strategy == 'ekfac' and not hasattr(back, 'fit_data')
    assert torch.equal(back.precondition(n, V, 1e-2), e.precondition(n, V, 1e-2))


def test_covariances_set_aside_come_back_bit_for_bit_or_stay_in_memory(one_thread, monkeypatch):
    "During the Λ pass A and S wait in a temporary file; with no writable temporary folder they stay in memory. Same factors."
    m = tiny_model('llama', layers=1, hidden=32)                     # gate_proj and up_proj share one A
    seqs = [{'input_ids': torch.randint(1, 32, (n,))} for n in (12, 9, 14, 10, 11, 13)]
    a = fit_factors(m, seqs, 'ekfac', seed=1, progress=False)
    def no_tmp(*args, **kw): raise PermissionError(13, 'Permission denied')
    monkeypatch.setattr(inf.ekfac.tempfile, 'TemporaryDirectory', no_tmp)
    b = fit_factors(m, seqs, 'ekfac', seed=1, progress=False)
    for n in a.modules:
        assert list(a.tensors[n]) == list(b.tensors[n])                 # the same keys, in the same order
        assert all(torch.equal(a.tensors[n][k], b.tensors[n][k]) for k in a.tensors[n])
    gate, up = [n for n in a.modules if n.endswith(('gate_proj', 'up_proj'))]
    assert a.tensors[gate]['A'] is a.tensors[up]['A']                  # still one shared A after coming back
