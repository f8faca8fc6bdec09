"Cross-cutting engine tests: architectures, GPT-2 Conv1D vs Linear, invariances."
import copy, functools
import pytest, torch
from torch import nn
import influence_nb as inf
from influence_nb.modules import find_modules, is_conv1d
import randdata

rand_seqs = functools.partial(randdata.rand_seqs, top=randdata.VOCAB)          # ids from the whole vocabulary
rand_queries = functools.partial(randdata.rand_queries, length=7, completion=2, top=randdata.VOCAB)

def autograd_dots(model, layers, queries, train):
    params = [p for layer in layers for _, p in layer.params()]
    return randdata.autograd_grads(model, params, queries) @ randdata.autograd_grads(model, params, train).T

@pytest.mark.parametrize('family', ['gpt2', 'gpt_neox', 'llama', 'opt', 'qwen2', 'mistral', 'gptj'])
def test_architectures_identity_is_autograd_dot(family):
    m = inf.tiny_model(family, layers=2).double()
    train, queries = rand_seqs(5), rand_queries(3)
    f = inf.fit_factors(m, train, 'identity', progress=False)
    s = inf.pairwise_scores(m, f, queries, train, progress=False)
    want = autograd_dots(m, find_modules(m, 'mlp'), queries, train)
    assert torch.allclose(s.total, want, rtol=1e-6, atol=1e-12)

@pytest.mark.parametrize('family', ['gpt2', 'gpt_neox', 'llama', 'opt', 'qwen2'])
def test_architectures_ekfac_consistent(family):
    m = inf.tiny_model(family, layers=2)
    train, queries = rand_seqs(24, lo=8, hi=16), rand_queries(3)
    f = inf.fit_factors(m, train, 'ekfac', batch_size=5, progress=False)
    s = inf.pairwise_scores(m, f, queries + train[:4], train, per_layer=True, batch_size=7, progress=False)
    tol = 1e-4 * float(s.total.abs().max())
    assert torch.allclose(sum(s.per_layer.values()), s.total, atol=tol)
    self_ = inf.self_scores(m, f, train[:4], progress=False)
    assert torch.allclose(self_, torch.diagonal(s.total[3:, :4]), atol=tol)
    assert (self_ > 0).all()   # a positive definite preconditioner

def to_linear(model):
    "The same network with every GPT-2 Conv1D rewritten as nn.Linear (weight transposed)."
    m = copy.deepcopy(model)
    for name, mod in list(m.named_modules()):
        if is_conv1d(mod):
            lin = nn.Linear(mod.weight.shape[0], mod.weight.shape[1]).to(mod.weight.dtype)
            lin.weight.data.copy_(mod.weight.data.T); lin.bias.data.copy_(mod.bias.data)
            parent, leaf = name.rsplit('.', 1)
            setattr(m.get_submodule(parent), leaf, lin)
    return m

@pytest.mark.parametrize('strategy', ['identity', 'diagonal', 'kfac', 'ekfac'])
def test_gpt2_conv1d_equals_linear(strategy):
    m = inf.tiny_model('gpt2', layers=2).double()
    lin = to_linear(m)
    assert not any(is_conv1d(x) for x in lin.modules())
    train, queries = rand_seqs(30, lo=8, hi=16), rand_queries(4)
    sc = []
    for model in (m, lin):
        f = inf.fit_factors(model, train, strategy, batch_size=6, seed=2, progress=False)
        sc.append(inf.pairwise_scores(model, f, queries, train, progress=False).total)
    assert torch.allclose(sc[0], sc[1], rtol=1e-7, atol=1e-9 * float(sc[0].abs().max()))

def test_scores_invariant_to_batch_size_padding_and_order():
    m = inf.tiny_model('gpt_neox', layers=2)
    train, queries = rand_seqs(20, lo=3, hi=20), rand_queries(3)
    f = inf.fit_factors(m, train, 'ekfac', batch_size=4, progress=False)
    ref = inf.pairwise_scores(m, f, queries, train, batch_size=1, progress=False).total
    tol = 1e-5 * float(ref.abs().max())
    for bs in (3, 20):
        assert torch.allclose(inf.pairwise_scores(m, f, queries, train, batch_size=bs, progress=False).total, ref, atol=tol)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    got = inf.pairwise_scores(m, f, queries, [train[i] for i in perm], batch_size=5, progress=False).total
    assert torch.allclose(got, ref[:, perm], atol=tol)
    # factors too: a different batch size gives the same preconditioner (per-sequence pseudo-label seeds)
    f2 = inf.fit_factors(m, train, 'ekfac', batch_size=7, progress=False)
    got2 = inf.pairwise_scores(m, f2, queries, train, batch_size=8, progress=False).total
    assert torch.allclose(got2, ref, atol=1e-3 * float(ref.abs().max()))

def test_model_state_restored():
    m = inf.tiny_model('llama', layers=1).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    flags = [p.requires_grad for p in m.parameters()]
    train = rand_seqs(6)
    f = inf.fit_factors(m, train, 'ekfac', progress=False)
    inf.pairwise_scores(m, f, rand_queries(2), train, per_token=True, progress=False)
    assert m.training and [p.requires_grad for p in m.parameters()] == flags
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(p.grad is None for p in m.parameters())
