"""Issue 17 (items 4, 5, 8, 1): the fast scoring paths compute the same numbers as the plain definitions.

Self-scores by one rotation and a sum equal the diagonal of pairwise scores for every strategy; scoring computes no
parameter gradients and restores the model's flags even when it fails; a bf16 model gives float32 scores close to
its float32 twin; 'pcg' is CG with an EK-FAC preconditioner (converged: CG's answer; no step: EK-FAC's)."""
import copy
import pytest, torch
from torch import nn
import influence_nb as inf
from influence_nb.modules import find_modules
from influence_nb.scores import canonical_to_flat, flat_to_canonical
from randdata import rand_seqs, rand_queries


@pytest.fixture(scope='module')
def llama():
    torch.manual_seed(0)
    return inf.tiny_model('llama', layers=2, hidden=16)


@pytest.mark.parametrize('strategy', ['identity', 'diagonal', 'kfac', 'ekfac'])
@pytest.mark.parametrize('lengths', [(4, 12), (24, 32)])   # short: tokens rotated; long: the gradient rotated
def test_self_scores_are_the_diagonal_of_pairwise(llama, strategy, lengths, one_thread):
    train = rand_seqs(10, lo=lengths[0], hi=lengths[1])
    f = inf.fit_factors(llama, train, strategy, batch_size=4, progress=False)
    for damping in (None, 1e-3):
        pp = inf.pairwise_scores(llama, f, train, train, damping=damping, progress=False).total
        ss = inf.self_scores(llama, f, train, damping=damping, batch_size=3, progress=False)
        assert ss.dtype == torch.float32
        rel = float(((ss - torch.diagonal(pp)).abs() / torch.diagonal(pp).abs()).max())
        assert rel < 1e-4, (strategy, lengths, damping, rel)


def test_ekfac_scores_are_the_preconditioned_autograd_dot(one_thread):
    "The fast contraction changes no score: the definition, with autograd's gradients and `Factors.precondition`."
    m = inf.tiny_model('gpt2', layers=2).double()
    train, queries = rand_seqs(7), rand_queries(3)
    f = inf.fit_factors(m, train, 'ekfac', batch_size=3, progress=False)
    layers = find_modules(m, 'mlp')
    def grads(seqs):   # {name: [n, d_out, d_in+1]} from autograd
        out = {l.name: [] for l in layers}
        for s in seqs:
            m.zero_grad()
            logits = m(input_ids=s['input_ids'][None]).logits[0]
            nn.functional.cross_entropy(logits[:-1], s['labels'][1:], ignore_index=-100, reduction='sum').backward()
            for l in layers: out[l.name].append(l.canonical_grad().clone())
        m.zero_grad(set_to_none=True)
        return {n: torch.stack(v) for n, v in out.items()}
    gq, gt = grads(queries), grads(train)
    want = sum(torch.einsum('qoi,noi->qn', f.precondition(l.name, gq[l.name]), gt[l.name]) for l in layers)
    got = inf.pairwise_scores(m, f, queries, train, batch_size=4, progress=False).total
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))


@pytest.mark.parametrize('family', ['gpt2', 'opt', 'llama'])
def test_flat_layout_is_autograds(family):
    "`canonical_to_flat` lays gradients out as `TrackedLayer.params()` holds them; `flat_to_canonical` inverts it."
    m = inf.tiny_model(family, layers=1).double()
    layers = find_modules(m, 'mlp')
    x = torch.randint(1, 32, (1, 6))
    nn.functional.cross_entropy(m(input_ids=x).logits[0, :-1], x[0, 1:], reduction='sum').backward()
    want = torch.cat([p.grad.reshape(-1) for l in layers for _, p in l.params()])[None]
    flat = canonical_to_flat(layers, {l.name: l.canonical_grad()[None] for l in layers})
    assert torch.equal(flat, want)
    back = flat_to_canonical(layers, flat)
    assert all(torch.equal(back[l.name][0], l.canonical_grad()) for l in layers)
    with pytest.raises(ValueError, match='parameter count'): flat_to_canonical(layers, flat[:, 1:])


def test_scoring_computes_no_parameter_gradients_and_restores_flags(llama, one_thread):
    m = copy.deepcopy(llama)
    train, queries = rand_seqs(6), rand_queries(2)
    f = inf.fit_factors(m, train, 'ekfac', progress=False)
    flags = {n: i % 2 == 0 for i, (n, _) in enumerate(m.named_parameters())}   # a mixed state, as a caller may leave it
    for n, p in m.named_parameters(): p.requires_grad_(flags[n])
    inf.pairwise_scores(m, f, queries, train, progress=False); inf.self_scores(m, f, train, progress=False)
    assert all(p.grad is None for p in m.parameters())                 # activation gradients only
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    calls = []
    def boom(mod, inp, out):                                           # fail in the middle of the scoring pass
        calls.append(1)
        if len(calls) == 3: raise RuntimeError('interrupted')
    h = find_modules(m, 'mlp')[-1].module.register_forward_hook(boom)
    try:
        for call in (lambda: inf.pairwise_scores(m, f, queries, train, batch_size=2, progress=False),
                     lambda: inf.self_scores(m, f, train, batch_size=2, progress=False)):
            calls.clear()
            with pytest.raises(RuntimeError, match='interrupted'): call()
            assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
            assert all(p.grad is None for p in m.parameters())
    finally: h.remove()


@pytest.mark.parametrize('dtype,tol', [(torch.bfloat16, 0.03), (torch.float16, 0.005)])
def test_half_model_gives_float32_scores_close_to_float32(dtype, tol, one_thread):
    """A bf16/fp16 model scored with float32 factors: float32 scores. The half-precision forward rounds every
    activation (bf16 keeps 8 significant bits, relative 2⁻⁹ ≈ 2e-3 per operation; fp16 11 bits, 2.4e-4) and the
    rounding accumulates through the blocks. Measured on this model over 3 seeds: bf16 Pearson ≥ 0.99996 and the
    largest difference ≤ 0.9 % of the largest score; fp16 ≥ 0.9999994 and ≤ 0.08 %. The test allows ~3-6× that."""
    torch.manual_seed(0)
    half = inf.tiny_model('llama', layers=2, hidden=32).to(dtype)
    full = copy.deepcopy(half).float()            # the same (half-representable) weights: the factors fit both
    train, queries = rand_seqs(16, lo=8, hi=16), rand_queries(4)
    f = inf.fit_factors(full, train, 'ekfac', progress=False)
    a = inf.pairwise_scores(half, f, queries, train, progress=False).total
    b = inf.pairwise_scores(full, f, queries, train, progress=False).total
    sa, sb = inf.self_scores(half, f, train, progress=False), inf.self_scores(full, f, train, progress=False)
    assert a.dtype == sa.dtype == torch.float32
    for x, y in ((a, b), (sa, sb)):
        r = float(torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1])
        err = float((x - y).abs().max() / y.abs().max())
        assert r > 1 - tol / 50 and err < tol, (r, err)


def test_pcg_converged_is_cg_and_without_steps_is_ekfac(one_thread):
    m = inf.tiny_model('gpt2', layers=2).double()
    train, queries = rand_seqs(8), rand_queries(3)
    damping = 0.05
    cg = inf.pairwise_scores(m, inf.fit_factors(m, train, 'cg', solver={'tol': 1e-10}, progress=False),
                             queries, train, damping=damping, progress=False).total
    pcg = inf.pairwise_scores(m, inf.fit_factors(m, train, 'pcg', solver={'tol': 1e-10, 'max_iter': 500}, progress=False),
                              queries, train, damping=damping, progress=False).total
    assert torch.allclose(pcg, cg, rtol=0, atol=1e-6 * float(cg.abs().max()))
    ek = inf.pairwise_scores(m, inf.fit_factors(m, train, 'ekfac', progress=False), queries, train, damping=damping,
                             progress=False).total
    pcg0 = inf.pairwise_scores(m, inf.fit_factors(m, train, 'pcg', solver={'max_iter': 0}, progress=False),
                               queries, train, damping=damping, progress=False).total
    assert torch.allclose(pcg0, ek, rtol=0, atol=1e-9 * float(ek.abs().max()))
    with pytest.raises(ValueError, match='absolute `damping`'):
        inf.pairwise_scores(m, inf.fit_factors(m, train, 'pcg', progress=False), queries, train, progress=False)
