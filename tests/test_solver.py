"Batched Gauss–Newton products and the preconditioned CG solver (nbs/02_pbrf.ipynb) against float64 dense solves."
import warnings
import pytest
import torch
from torch.func import jvp, vjp
from influence_nb.pbrf import cg_ihvp, lissa_ihvp, FlatProblem, _Linearised, _gnvp, _out_hvp
from influence_nb.theory import exact_ggn
from influence_nb.modules import layer_param_names

f64 = torch.float64
pytestmark = pytest.mark.usefixtures('one_thread')   # tests/conftest.py


@pytest.fixture(scope='module')
def tiny_lm():
    "A one-block GPT-2 with two tracked MLP parameters, padded sequences of different lengths, and G + λI dense."
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=12, n_embd=8, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)).double().eval()
    g = torch.Generator().manual_seed(0)
    seqs = [dict(input_ids=torch.randint(1, 20, (n,), generator=g)) for n in (4, 9, 6, 7, 5)]
    names = ['transformer.h.0.mlp.c_proj.weight', 'transformer.h.0.mlp.c_proj.bias']
    lam = 1e-2
    G = exact_ggn(gpt, names, seqs)                                      # 01_theory's exact GGN, another code path
    A = G + lam * torch.eye(len(G), dtype=f64)
    return gpt, names, seqs, lam, A, g


def _spd(P, g, shift=0.1):
    W = torch.randn(P, P, dtype=f64, generator=g)
    return W @ W.T / P + shift * torch.eye(P, dtype=f64)


def test_pcg_random_spd_preconditioner_is_dense_solve(tiny_lm):
    gpt, names, seqs, lam, A, g = tiny_lm
    V = torch.randn(5, len(A), dtype=f64, generator=g)
    M = _spd(len(A), g)
    X = cg_ihvp(gpt, names, seqs, V, lam, tol=1e-12, max_iter=500, batch_size=2, preconditioner=lambda R: R @ M)
    direct = torch.linalg.solve(A, V.T).T
    assert (X - direct).norm() <= 1e-8 * direct.norm()


def test_exact_inverse_preconditioner_converges_in_one_step(tiny_lm):
    gpt, names, seqs, lam, A, g = tiny_lm
    V = torch.randn(3, len(A), dtype=f64, generator=g)
    A_inv, direct = torch.linalg.inv(A), torch.linalg.solve(A, V.T).T
    X1 = cg_ihvp(gpt, names, seqs, V, lam, max_iter=1, preconditioner=lambda R: R @ A_inv)
    assert (X1 - direct).norm() <= 1e-9 * direct.norm()
    X0 = cg_ihvp(gpt, names, seqs, V, lam, max_iter=0, preconditioner=lambda R: R @ A_inv)   # 0 steps: M v
    assert torch.equal(X0, V @ A_inv)


def test_columns_together_equal_one_at_a_time(tiny_lm):
    "block=False: each column runs its own CG, whatever else is solved with it."
    gpt, names, seqs, lam, A, g = tiny_lm
    V = torch.randn(4, len(A), dtype=f64, generator=g)
    M = _spd(len(A), g)
    pcg = dict(max_iter=3, preconditioner=lambda R: R @ M, block=False)
    with warnings.catch_warnings():
        warnings.simplefilter('error')               # a truncated preconditioned solve is what was asked for: no warning
        together = cg_ihvp(gpt, names, seqs, V, lam, **pcg)
        alone = torch.stack([cg_ihvp(gpt, names, seqs, v, lam, **pcg) for v in V])
    assert (together - alone).norm() <= 1e-10 * alone.norm()
    with pytest.warns(UserWarning, match='raise `max_iter`'):   # plain CG cut short says so
        together = cg_ihvp(gpt, names, seqs, V, lam, max_iter=4, block=False)
    with pytest.warns(UserWarning, match='raise `max_iter`'):
        alone = torch.stack([cg_ihvp(gpt, names, seqs, v, lam, max_iter=4, block=False) for v in V])
    assert (together - alone).norm() <= 1e-10 * alone.norm()


@pytest.mark.parametrize('precondition', [False, True])
def test_block_cg_is_never_worse_per_column_and_converges_to_the_same(tiny_lm, precondition):
    """Block CG's k-step space contains each column's own k-step Krylov space, and each column minimises its own A-norm
    error over it: after the same number of steps every column is at least as close (in A-norm) as its own CG."""
    gpt, names, seqs, lam, A, g = tiny_lm
    V = torch.randn(6, len(A), dtype=f64, generator=g)
    M = _spd(len(A), g)
    kw = dict(preconditioner=(lambda R: R @ M) if precondition else None)
    direct = torch.linalg.solve(A, V.T).T
    a_err = lambda X: ((X - direct) @ A * (X - direct)).sum(1).sqrt()      # per column ‖x − x*‖_A
    for k in (1, 2, 3):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')          # plain CG cut short warns; that is the point here
            blk = cg_ihvp(gpt, names, seqs, V, lam, max_iter=k, **kw)
            own = cg_ihvp(gpt, names, seqs, V, lam, max_iter=k, block=False, **kw)
        assert (a_err(blk) <= a_err(own) * (1 + 1e-9)).all(), (k, a_err(blk), a_err(own))
        assert a_err(blk).sum() < a_err(own).sum()                          # and strictly better: the space is larger
    blk = cg_ihvp(gpt, names, seqs, V, lam, tol=1e-12, max_iter=500, **kw)
    assert (blk - direct).norm() <= 1e-8 * direct.norm()


def _per_column(prob, V):
    "The Gauss–Newton product before batching: one jvp (re-running the forward) and one vjp per column and batch."
    out = torch.zeros_like(V)
    for b in prob.data.batches():
        f = lambda th: prob.rows(th, b)
        h, vjp_fn = vjp(f, prob.theta_s)
        for k in range(len(V)):
            out[k] += vjp_fn(_out_hvp(h.detach(), jvp(f, (prob.theta_s,), (V[k],))[1], prob.loss))[0]
    return out / prob.N


@pytest.mark.parametrize('batch_size', [1, 2, 5])
def test_batched_product_equals_per_column_product(tiny_lm, batch_size):
    gpt, names, seqs, lam, A, g = tiny_lm
    prob = FlatProblem(gpt, names, seqs, 'ce', batch_size, f64)
    V = torch.randn(6, prob.P, dtype=f64, generator=g)
    old = _per_column(prob, V)
    assert (_gnvp(prob, V) - old).norm() <= 1e-10 * old.norm()
    assert (_gnvp(prob, V) - V @ (A - lam * torch.eye(prob.P, dtype=f64))).norm() <= 1e-10 * old.norm()


def test_batched_product_mse_and_subsets():
    "Regression rows (identity output Hessian) and a product over a subset of the batches (`lissa_batch`)."
    g = torch.Generator().manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    X, y = torch.randn(12, 3, dtype=f64, generator=g), torch.randn(12, 2, dtype=f64, generator=g)
    names = [n for n, _ in net.named_parameters()]
    prob = FlatProblem(net, names, (X, y), 'mse', 4, f64)
    V = torch.randn(3, prob.P, dtype=f64, generator=g)
    old = _per_column(prob, V)
    assert (_gnvp(prob, V) - old).norm() <= 1e-10 * old.norm()
    sub = prob.data.batches(torch.tensor([0, 5, 7]))
    J = torch.func.jacrev(lambda th: prob.rows(th, sub[0]))(prob.theta_s)   # [3, 2, P]
    assert torch.allclose(_Linearised(prob, sub, 3)(V), V @ torch.einsum('rdp,rdq->pq', J, J) / 3, rtol=1e-10, atol=1e-13)


def test_lissa_full_batch_uses_batched_product(tiny_lm):
    gpt, names, seqs, lam, A, g = tiny_lm
    lam_big = 1.0                                                        # s/λ ≈ 10: 300 steps shrink the error by 1e-13
    A_big = A + (lam_big - lam) * torch.eye(len(A), dtype=f64)
    V = torch.randn(2, len(A), dtype=f64, generator=g)
    direct = torch.linalg.solve(A_big, V.T).T
    X = lissa_ihvp(gpt, names, seqs, V, lam_big, depth=300, batch_size=3)
    assert (X - direct).norm() <= 1e-8 * direct.norm()


def test_fused_attention_is_switched_for_the_solve_and_refused_where_it_cannot_be():
    "CPU SDPA has neither a double backward nor forward-mode AD: the solver runs on eager attention (scores equal the eager-loaded "
    "model's; SDPA restored); `cg_ihvp` called on the SDPA model itself says so and names the fix."
    import influence_nb as inf
    from influence_nb.modules import find_modules
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
    g = torch.Generator().manual_seed(1)
    train = [{'input_ids': torch.randint(0, 300, (int(n),), generator=g)} for n in torch.randint(8, 20, (4,), generator=g)]
    sdpa = Qwen2ForCausalLM(Qwen2Config(**cfg, attn_implementation='sdpa')).eval()
    eager = Qwen2ForCausalLM(Qwen2Config(**cfg, attn_implementation='eager')).eval()
    eager.load_state_dict(sdpa.state_dict())
    opts = dict(tol=1e-10, max_iter=200)
    s_sdpa, s_eager = (inf.pairwise_scores(m, inf.fit_factors(m, train, strategy='cg', solver=opts, progress=False), train[:1],
                                           train, damping=0.1, progress=False).total for m in (sdpa, eager))
    assert sdpa.config._attn_implementation == 'sdpa'
    assert s_sdpa.shape == (1, 4) and (s_sdpa - s_eager).abs().max() <= 1e-5 * s_eager.abs().max()
    names = layer_param_names(find_modules(sdpa, 'mlp'))
    P = sum(p.numel() for n, p in sdpa.named_parameters() if n in names)
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        cg_ihvp(sdpa, names, train, torch.randn(1, P), 0.1, max_iter=2)


def test_block_option_reaches_the_solver_and_is_checked():
    "`solver=dict(block=False)` reaches the solver (cut short, the two differ; converged, they agree); a non-bool is refused."
    import influence_nb as inf
    m = inf.tiny_model('gpt2', seed=3).double()
    g = torch.Generator().manual_seed(1)
    train = [dict(input_ids=torch.randint(0, m.config.vocab_size, (6,), generator=g)) for _ in range(6)]
    score = lambda **o: inf.pairwise_scores(m, inf.fit_factors(m, train, 'pcg', solver=o, progress=False), train[:3], train,
                                            damping=1e-2, progress=False).total
    s = {b: score(tol=1e-10, max_iter=500, block=b) for b in (True, False)}
    assert torch.allclose(s[True], s[False], rtol=0, atol=1e-7 * float(s[False].abs().max()))
    cut = {b: score(max_iter=2, block=b) for b in (True, False)}
    assert (cut[True] - cut[False]).abs().max() > 1e-3 * cut[False].abs().max()        # the option changed the solve
    alone = torch.cat([inf.pairwise_scores(m, inf.fit_factors(m, train, 'pcg', solver=dict(max_iter=2, block=False), progress=False),
                                           train[i:i + 1], train, damping=1e-2, progress=False).total for i in range(3)])
    assert torch.allclose(cut[False], alone, rtol=0, atol=1e-9 * float(alone.abs().max()))   # block=False: one CG per query
    with pytest.raises(TypeError, match='`block` must be True or False'):
        inf.pairwise_scores(m, inf.fit_factors(m, train, 'cg', solver=dict(block='yes'), progress=False), train[:1], train,
                            damping=1e-2, progress=False)


def test_block_cg_in_float32_keeps_near_dependent_directions():
    """A float32 problem whose residuals become nearly dependent: dropping those directions (as a first version did, at
    1e3 roundings) stalled block CG at 3e-2 after 400 steps; keeping them, it converges in fewer steps than one CG per column."""
    from influence_nb.pbrf import _cg
    for seed in (0, 1):
        torch.manual_seed(seed)
        Q, _ = torch.linalg.qr(torch.randn(400, 400, dtype=f64))
        ev = torch.cat([torch.logspace(0, 4, 40, dtype=f64), torch.linspace(0.5, 1.5, 360, dtype=f64)])
        A, B = ((Q * ev) @ Q.T).float(), torch.randn(20, 400, dtype=f64).float()
        _, it_b, rel_b = _cg(lambda U: U @ A, B, 1e-4, 400)
        _, it_c, rel_c = _cg(lambda U: U @ A, B, 1e-4, 400, block=False)
        assert (rel_b <= 1e-4).all() and (rel_c <= 1e-4).all() and it_b < it_c, (seed, it_b, it_c)


def test_half_precision_models_are_solved_in_float32_and_a_zero_preconditioner_is_refused(tiny_lm):
    gpt, names, seqs, lam, A, g = tiny_lm
    import copy
    V = torch.randn(3, len(A), dtype=f64, generator=g)
    half = copy.deepcopy(gpt).to(torch.bfloat16)
    X = cg_ihvp(half, names, seqs, V, lam, tol=1e-5)
    ref = cg_ihvp(copy.deepcopy(half).float(), names, seqs, V, lam, tol=1e-5)   # the same bf16 weights, in float32
    assert X.dtype == f64 and (X - ref).norm() <= 1e-4 * ref.norm()
    with pytest.raises(ValueError, match='maps every residual to zero'):
        cg_ihvp(gpt, names, seqs, V, lam, preconditioner=torch.zeros_like)


def test_preconditioned_solve_warns_only_when_it_stops_short_of_its_own_accord(tiny_lm):
    "'EK-FAC + k steps' (an explicit max_iter) is silent; the default limit, reached short of tol, warns as plain CG does."
    gpt, names, seqs, lam, A, g = tiny_lm
    V = torch.randn(2, len(A), dtype=f64, generator=g)
    M = _spd(len(A), g)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        cg_ihvp(gpt, names, seqs, V, lam, max_iter=2, preconditioner=lambda R: R @ M)          # asked for: no warning
        cg_ihvp(gpt, names, seqs, V, lam, tol=1e-10, preconditioner=lambda R: R @ M)          # converged: no warning
    with pytest.warns(UserWarning, match=r"CG stopped after 1000 steps .*solver=dict\(max_iter=\.\.\.\)"):
        cg_ihvp(gpt, names, seqs, V, lam, tol=1e-300, preconditioner=lambda R: R @ M)         # the default limit, short of tol


def test_block_cg_keeps_converged_columns_in_the_search():
    """Columns that meet `tol` early stay in the block: the slow column is then never worse than its own CG. (Dropping
    them, as a first version did, left the block Krylov space: the slow column ended up to 5 % worse than alone.)"""
    from influence_nb.pbrf import _cg
    P = 300
    torch.manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(P, P, dtype=f64))
    A = (Q * torch.logspace(-3, 1, P, dtype=f64)) @ Q.T                   # SPD, condition number 1e4
    a_err = lambda X, Xs: (((X - Xs) @ A) * (X - Xs)).sum(1).sqrt()
    for trial in range(4):
        g = torch.Generator().manual_seed(100 + trial)
        B = torch.randn(5, P, dtype=f64, generator=g)
        for j in range(4):   # four easy columns (three large-eigenvalue directions each): they meet tol within a few steps
            B[j] = Q[:, torch.randint(200, P, (3,), generator=g)].sum(1) + 1e-3 * torch.randn(P, dtype=f64, generator=g)
        Xs = torch.linalg.solve(A, B.T).T
        for k in (5, 15, 30, 55):
            Xb, _, rb = _cg(lambda U: U @ A, B, 1e-2, k)
            Xc, _, _ = _cg(lambda U: U @ A, B, 1e-2, k, block=False)
            assert (a_err(Xb, Xs) <= a_err(Xc, Xs) * (1 + 1e-9)).all(), (trial, k)
