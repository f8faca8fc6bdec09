"""Property tests of the exact influence reference (influence_nb.theory) on tiny random models of several architectures."""
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                          LlamaForCausalLM)
from transformers.utils import logging as hf_logging

from influence_nb.theory import (exact_ggn, exact_hessian, exact_influence, influence_from_grads, param_blocks,
                                 sequence_grads)

hf_logging.set_verbosity_error()
torch.set_num_threads(1)


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2))


def _neox():
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=16, max_position_embeddings=16))


def _llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16))


MODELS = {'gpt2': _gpt2, 'gpt_neox': _neox, 'llama': _llama}


def _model(kind, seed=0):
    torch.manual_seed(seed)
    model = MODELS[kind]().eval()
    names = [n for n, _ in model.named_parameters() if '.mlp.' in n]
    return model, names


def _seqs(n, seed, lengths=(5, 9, 7, 12, 6, 10)):
    g = torch.Generator().manual_seed(seed)
    return [{'input_ids': torch.randint(0, 32, (lengths[i % len(lengths)],), generator=g)} for i in range(n)]


def _eye(n):
    return torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize('kind', list(MODELS))
def test_grads_match_autograd(kind):
    model, names = _model(kind)
    seqs = _seqs(3, 1)
    got = sequence_grads(model, names, seqs)
    m64 = copy.deepcopy(model).double()
    params = dict(m64.named_parameters())
    for i, s in enumerate(seqs):
        m64.zero_grad()
        logits = m64(input_ids=s['input_ids'][None]).logits[0]
        (-F.cross_entropy(logits[:-1], s['input_ids'][1:], reduction='sum')).backward()
        want = torch.cat([params[n].grad.reshape(-1) for n in names])
        assert torch.allclose(got[i], want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize('kind', list(MODELS))
def test_influence_equals_direct_solve(kind):
    model, names = _model(kind)
    train, queries = _seqs(4, 2), _seqs(2, 3)
    lam = 1e-2
    G = exact_ggn(model, names, train)
    assert torch.allclose(G, G.T, atol=1e-13)
    evals = torch.linalg.eigvalsh(G)
    assert evals.min() > -1e-12 * evals.max()   # PSD
    Q, T = sequence_grads(model, names, queries), sequence_grads(model, names, train)
    want = Q @ torch.linalg.solve(G + lam * _eye(len(G)), T.T)
    got = exact_influence(model, names, queries, train, damping=lam)
    assert got.shape == (2, 4) and got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=1e-7, atol=1e-9 * want.abs().max())


@pytest.mark.parametrize('kind', ['gpt2', 'llama'])
def test_symmetric_when_queries_are_train(kind):
    model, names = _model(kind)
    train = _seqs(5, 4)
    for curvature in ('ggn', 'hessian'):
        S = exact_influence(model, names, train, train, damping=0.1, curvature=curvature)
        assert torch.allclose(S, S.T, rtol=1e-8, atol=1e-10 * S.abs().max())
    S = exact_influence(model, names, train, train, damping=0.1)
    assert (S.diagonal() > 0).all()   # self-influence under a PSD curvature is positive


def test_additive_over_scored_tokens():
    "The measurement is a sum over scored tokens, so scores of disjoint token sets add up."
    model, names = _model('gpt2')
    ids = _seqs(1, 5, lengths=(12,))[0]['input_ids']
    pos = torch.arange(len(ids))
    part = lambda keep: {'input_ids': ids, 'labels': torch.where(keep, ids, torch.full_like(ids, -100))}
    queries = [part(pos >= 3), part((pos >= 3) & (pos < 7)), part(pos >= 7)]
    S = exact_influence(model, names, queries, _seqs(4, 6), damping=1e-2)
    assert torch.allclose(S[0], S[1] + S[2], rtol=1e-9, atol=1e-10 * S.abs().max())


def test_linear_in_query_scale_and_duplicates():
    "Doubling a query gradient doubles its scores; listing a training sequence twice repeats its column."
    model, names = _model('gpt_neox')
    train, queries = _seqs(3, 7), _seqs(2, 8)
    G = exact_ggn(model, names, train)
    Q, T = sequence_grads(model, names, queries), sequence_grads(model, names, train)
    base = influence_from_grads(Q, T, G, 1e-2)
    assert torch.allclose(influence_from_grads(2.5 * Q, T, G, 1e-2), 2.5 * base, rtol=1e-12, atol=0)
    S = exact_influence(model, names, queries, train + [train[1]], damping=1e-2, fit=train)
    assert torch.allclose(S[:, 3], S[:, 1], rtol=1e-12, atol=0)
    assert torch.allclose(S[:, :3], base, rtol=1e-9, atol=1e-10 * base.abs().max())


def test_fit_is_a_mean():
    "G is a mean over sequences: fitting on the training set twice over changes nothing."
    model, names = _model('gpt2')
    train, queries = _seqs(3, 9), _seqs(2, 10)
    a = exact_influence(model, names, queries, train, damping=1e-2)
    b = exact_influence(model, names, queries, train, damping=1e-2, fit=train + train)
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_large_damping_is_scaled_dot_product():
    model, names = _model('llama')
    train, queries = _seqs(3, 11), _seqs(2, 12)
    lam = 1e7
    dot = sequence_grads(model, names, queries) @ sequence_grads(model, names, train).T
    S = exact_influence(model, names, queries, train, damping=lam)
    G_norm = torch.linalg.matrix_norm(exact_ggn(model, names, train), ord=2)
    # (G + λI)⁻¹ = I/λ − G/λ² + ..., so the relative error is about ‖G‖/λ
    assert torch.allclose(lam * S, dot, rtol=0, atol=10 * float(G_norm / lam) * float(dot.abs().max()))


def test_block_diagonal_is_sum_over_modules():
    "With only diagonal blocks, the score is the sum of the scores of each module tracked alone (any architecture)."
    for kind in MODELS:
        model, names = _model(kind)
        train, queries = _seqs(3, 13), _seqs(2, 14)
        total = exact_influence(model, names, queries, train, damping=1e-2, block_diagonal=True)
        parts = sum(exact_influence(model, [names[i] for i in b], queries, train, damping=1e-2)
                    for b in param_blocks(names))
        assert torch.allclose(total, parts, rtol=1e-9, atol=1e-10 * total.abs().max())


def test_padding_changes_nothing():
    model, names = _model('gpt2')
    seqs = _seqs(2, 15)
    padded = [{'input_ids': torch.cat([s['input_ids'], torch.zeros(3, dtype=torch.long)]),
               'attention_mask': torch.cat([torch.ones_like(s['input_ids']), torch.zeros(3, dtype=torch.long)])}
              for s in seqs]
    assert torch.allclose(sequence_grads(model, names, padded), sequence_grads(model, names, seqs), rtol=1e-12, atol=1e-14)
    assert torch.allclose(exact_ggn(model, names, padded), exact_ggn(model, names, seqs), rtol=1e-12, atol=1e-14)


def test_hessian_equals_ggn_for_output_layer():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                       tie_word_embeddings=False)).eval()
    seqs = _seqs(3, 16)
    H, G = exact_hessian(model, ['lm_head.weight'], seqs), exact_ggn(model, ['lm_head.weight'], seqs)
    assert torch.allclose(H, G, rtol=1e-10, atol=1e-13)
    model, names = _model('gpt2')   # through the MLP they differ and the Hessian is indefinite
    H, G = exact_hessian(model, names, seqs), exact_ggn(model, names, seqs)
    assert (H - G).norm() > 1e-2 * G.norm() and torch.linalg.eigvalsh(H)[0] < 0


def test_caller_model_untouched():
    model, names = _model('gpt2')
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exact_influence(model, names, _seqs(1, 17), _seqs(2, 18), damping=0.1, curvature='hessian')
    assert model.training and next(model.parameters()).dtype == torch.float32
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_errors_name_the_problem():
    model, names = _model('gpt2')
    train = _seqs(2, 19)
    with pytest.raises(ValueError, match=r"Did you mean \['transformer.h.0.mlp.c_fc.weight'"):
        exact_influence(model, ['transformer.h.0.mlp.c_fc.wieght'], train, train, damping=0.1)
    with pytest.raises(ValueError, match='Candidates: transformer.wte.weight'):
        sequence_grads(model, ['nothing.like.this'], train)
    with pytest.raises(TypeError, match='wrap it in a list'):
        exact_ggn(model, names[0], train)
    with pytest.raises(ValueError, match='damping'):
        exact_influence(model, names, train, train, damping=-1.0)
    with pytest.raises(ValueError, match='singular'):   # GPT-2's MLP GGN has a null space (final layer norm)
        exact_influence(model, names, train, train, damping=0.0)
    with pytest.raises(ValueError, match='`queries` is empty'):
        exact_influence(model, names, [], train, damping=0.1)
    with pytest.raises(ValueError, match='no scored token'):
        exact_influence(model, names, [{'input_ids': [1, 2, 3], 'labels': [-100, -100, -100]}], train, damping=0.1)
    with pytest.raises(ValueError, match="'ggn' or 'hessian'"):
        exact_influence(model, names, train, train, damping=0.1, curvature='fisher')
    with pytest.raises(ValueError, match="context is 16"):
        sequence_grads(model, names, [{'input_ids': torch.zeros(20, dtype=torch.long)}])
