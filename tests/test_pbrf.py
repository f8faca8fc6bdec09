"PBRF solver and inverse-GGN baselines against closed forms and dense solves (nbs/02_pbrf.ipynb)."
import pytest
import torch
from influence_nb.pbrf import (bregman_objective, pbrf_response, pbrf_influence, gnvp, lissa_ihvp, cg_ihvp,
                               FlatProblem, ggn_matrix, loss_grads)
from randdata import tanh_mlp

f64 = torch.float64


pytestmark = pytest.mark.usefixtures('one_thread')   # tests/conftest.py


@pytest.fixture(scope='module')
def linear_problem():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3).double()
    X = torch.randn(30, 4, dtype=f64, generator=g)
    y = torch.randn(30, 3, dtype=f64, generator=g)
    # Jacobian of h = W x + b in θ = (W.reshape(-1), b), built by hand
    J = lambda x: torch.cat([torch.kron(torch.eye(3, dtype=f64), x[None]), torch.eye(3, dtype=f64)], 1)   # [3, 15]
    theta = torch.cat([lin.weight.detach().reshape(-1), lin.bias.detach()])
    G = sum(J(x).T @ J(x) for x in X) / len(X)
    return lin, X, y, J, theta, G


def test_linear_pbrf_closed_form(linear_problem):
    lin, X, y, J, theta, G = linear_problem
    lam, m = 0.03, 5
    g_m = J(X[m]).T @ (J(X[m]) @ theta - y[m])
    H_m = J(X[m]).T @ J(X[m])
    I = torch.eye(15, dtype=f64)
    for eps in (1.0, 0.1, 1e-3, -1e-3, -0.005):
        res = pbrf_response(lin, ['weight', 'bias'], (X, y), (X[m], y[m]), eps, lam, loss='mse', rtol=1e-12)
        exact = -eps * torch.linalg.solve(G + lam * I + eps * H_m, g_m)
        assert res.converged
        torch.testing.assert_close(res.delta, exact, rtol=0, atol=1e-9 * exact.abs().max().item())
        torch.testing.assert_close(res.params()['weight'], (theta + exact)[:12].view(3, 4), rtol=0, atol=1e-9)
    # the L-BFGS path alone (no Gauss–Newton steps) reaches the same solution to its own floor
    exact = -0.2 * torch.linalg.solve(G + lam * I + 0.2 * H_m, g_m)
    res = pbrf_response(lin, ['weight', 'bias'], (X, y), (X[m], y[m]), 0.2, lam, loss='mse', rtol=1e-7, newton_steps=0)
    assert res.converged and res.n_newton == 0 and res.n_iter > 0
    torch.testing.assert_close(res.delta, exact, rtol=0, atol=1e-6 * exact.abs().max().item())


def test_linear_influence_is_damped_ggn_derivative(linear_problem):
    lin, X, y, J, theta, G = linear_problem
    lam, m, q = 0.03, 5, 17
    g_m = J(X[m]).T @ (J(X[m]) @ theta - y[m])
    grad_f = -J(X[q]).T @ (J(X[q]) @ theta - y[q])                    # f = −½‖h(x_q) − y_q‖²
    deriv = -grad_f @ torch.linalg.solve(G + lam * torch.eye(15, dtype=f64), g_m)
    res = pbrf_influence(lin, ['weight', 'bias'], (X, y), (X[m], y[m]), (X[q:q + 1], y[q:q + 1]), lam, loss='mse')
    assert res.converged
    assert abs(res.influence.item() - deriv.item()) <= 1e-6 * abs(deriv.item())


def test_gnvp_linear_exact(linear_problem):
    lin, X, y, J, theta, G = linear_problem
    V = torch.randn(3, 15, dtype=f64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(gnvp(lin, ['weight', 'bias'], (X, y), V, loss='mse', batch_size=7), V @ G)


def _classifier():
    net = tanh_mlp((3, 6, 6, 3), seed=0)
    X = torch.randn(30, 3, dtype=f64, generator=torch.Generator().manual_seed(0))
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    return net, X, y


def test_mlp_ce_pbrf_matches_solve():
    net, X, y = _classifier()
    names = ['2.weight', '2.bias', '4.weight', '4.bias']
    lam = 0.05
    prob = FlatProblem(net, names, (X, y), 'ce')
    A = ggn_matrix(prob) + lam * torch.eye(prob.P, dtype=f64)
    Xq, yq = X[:2] + 0.1, y[:2]
    exact = loss_grads(prob, prob.examples((Xq, yq), 'q')) @ torch.linalg.solve(A, loss_grads(prob, prob.data)[4])
    res = pbrf_influence(net, names, (X, y), (X[4], y[4]), (Xq, yq), lam)
    assert res.converged
    torch.testing.assert_close(res.influence, exact, rtol=0, atol=1e-5 * exact.abs().max().item())


def test_objective_at_theta_s():
    net, X, y = _classifier()
    names = ['4.weight', '4.bias']
    val = bregman_objective(net, names, (X, y), (X[2], y[2]), None, 0.3, 0.1)
    ce = torch.nn.functional.cross_entropy(net(X[2:3]), y[2:3], reduction='sum')
    assert abs(val.item() - 0.3 * ce.item()) < 1e-12


def test_cg_and_lissa_against_solve():
    net, X, y = _classifier()
    names = ['2.weight', '4.weight']
    lam = 0.02
    prob = FlatProblem(net, names, (X, y), 'ce')
    G = ggn_matrix(prob)
    V = torch.randn(3, prob.P, dtype=f64, generator=torch.Generator().manual_seed(2))
    direct = torch.linalg.solve(G + lam * torch.eye(prob.P, dtype=f64), V.T).T
    rel = lambda Z: ((Z - direct).norm(dim=1) / direct.norm(dim=1)).max().item()
    torch.testing.assert_close(gnvp(net, names, (X, y), V), V @ G)
    assert rel(cg_ihvp(net, names, (X, y), V, lam, tol=1e-8)) < 1e-6
    assert rel(lissa_ihvp(net, names, (X, y), V, lam, depth=200)) < 1e-4
    assert rel(lissa_ihvp(net, names, (X, y), V, lam, depth=150, repeats=2, lissa_batch=15, seed=1)) < 0.05
    one = cg_ihvp(net, names, (X, y), V[0], lam, tol=1e-8)
    assert one.shape == (prob.P,)


def test_lm_gnvp_padding_and_batching():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=12, n_embd=8, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [dict(input_ids=torch.randint(1, 20, (n,), generator=g)) for n in (4, 9, 6, 7)]
    names = ['transformer.h.0.mlp.c_proj.weight']
    prob = FlatProblem(gpt, names, seqs, 'ce', dtype=f64)
    V = torch.randn(2, prob.P, dtype=f64, generator=g)
    G = ggn_matrix(prob)
    for bs in (1, 3, 4):                                                # padding inside batches changes nothing
        torch.testing.assert_close(gnvp(gpt, names, seqs, V, batch_size=bs, dtype=f64), V @ G, rtol=1e-9, atol=1e-12)


def test_validation_errors():
    net, X, y = _classifier()
    with pytest.raises(ValueError, match=r"not a parameter of the model. Candidates: 0.weight"):
        gnvp(net, ['2.weight', 'nope'], (X, y), torch.zeros(1))
    with pytest.raises(ValueError, match='eps'):
        pbrf_influence(net, ['4.bias'], (X, y), (X[0], y[0]), (X[1], y[1]), 0.1, eps=0.0)
    with pytest.raises(ValueError, match='eps'):
        pbrf_influence(net, ['4.bias'], (X, y), (X[0], y[0]), (X[1], y[1]), 0.1, eps=-1e-3)
    for bad in (0.0, -1.0, float('nan')):
        with pytest.raises(ValueError, match='damping'):
            pbrf_response(net, ['4.bias'], (X, y), (X[0], y[0]), 1e-3, bad)
        with pytest.raises(ValueError, match='damping'):
            cg_ihvp(net, ['4.bias'], (X, y), torch.zeros(3, dtype=f64), bad)
    with pytest.raises(ValueError, match=r'\[k, 3\]'):
        cg_ihvp(net, ['4.bias'], (X, y), torch.zeros(4, dtype=f64), 0.1)
    with pytest.raises(ValueError, match='loss'):
        gnvp(net, ['4.bias'], (X, y), torch.zeros(3, dtype=f64), loss='l1')
    with pytest.raises(TypeError, match="loss='mse'"):
        gnvp(net, ['4.bias'], (X, y.double()), torch.zeros(3, dtype=f64))
    with pytest.raises(ValueError, match='diverged'):
        lissa_ihvp(net, ['4.weight'], (X, y), torch.ones(18, dtype=f64), 1e-3, scale=1e-4, depth=200)


def test_lm_rows_and_gnvp_with_unscored_tokens():
    "Rows are the scored positions' logits; G V from all positions with unscored ones masked equals the explicit G."
    from transformers import GPT2Config, GPT2LMHeadModel
    from influence_nb.solver import eager_attention
    torch.manual_seed(1)
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=12, n_embd=8, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)).eval()
    g = torch.Generator().manual_seed(1)
    seqs = []
    for n, prompt in ((5, 2), (9, 0), (6, 4), (8, 3)):           # prompts are unscored (labels -100)
        ids = torch.randint(1, 20, (n,), generator=g)
        seqs.append(dict(input_ids=ids, labels=torch.where(torch.arange(n) < prompt, -100, ids)))
    names = ['transformer.h.1.mlp.c_proj.weight', 'transformer.h.0.attn.c_attn.bias']
    prob = FlatProblem(gpt, names, seqs, 'ce', batch_size=4, dtype=f64)
    (b,) = prob.data.batches()
    out = gpt(**b.inputs).logits.double()
    torch.testing.assert_close(prob.rows(prob.theta_s, b), out[:, :-1][b.scored])   # the transformers shift
    assert len(b.targets) == sum(len(s['input_ids']) - max(p, 1) for s, p in zip(seqs, (2, 0, 4, 3)))
    G = ggn_matrix(prob)
    V = torch.randn(3, prob.P, dtype=f64, generator=g)
    with eager_attention(gpt):                                   # an attention bias: the products differentiate through it
        for bs in (1, 3, 4):
            torch.testing.assert_close(gnvp(gpt, names, seqs, V, batch_size=bs, dtype=f64), V @ G, rtol=1e-9, atol=1e-12)
