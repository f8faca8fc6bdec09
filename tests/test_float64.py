"""Session 20: float32 islands inside float64 models (nbs/02_pbrf.ipynb, 'When the model computes below `dtype`').

Many transformers families compute parts of a float64 forward in float32 (RMSNorm `.to(torch.float32)`, eager attention
`softmax(..., dtype=torch.float32)`, rotary `.float()`). `low_precision_parts` finds them, the float64 tools warn up front,
and `keep_precision` computes them in float64: then float64 scores are invariant to batching and padding at float64's level."""
import warnings
import pytest
import torch
import transformers as T
import influence_nb as inf
from influence_nb.pbrf import (low_precision_parts, keep_precision, pbrf_influence, cg_ihvp, lissa_ihvp, FlatProblem,
                               loss_grads)

pytestmark = pytest.mark.usefixtures('one_thread')   # tests/conftest.py
f64 = torch.float64
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=32)


def _model(family, seed=0):
    cfg = {'llama': lambda: T.LlamaConfig(**SMALL), 'qwen2': lambda: T.Qwen2Config(**SMALL),
           'gpt_neox': lambda: T.GPTNeoXConfig(**{k: v for k, v in SMALL.items() if k != 'num_key_value_heads'}),
           'opt': lambda: T.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4,
                                      word_embed_proj_dim=32, max_position_embeddings=32),
           'gpt2': lambda: T.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32)}[family]()
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(cfg, attn_implementation='eager').to(f64).eval()


def _seqs(n=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{'input_ids': torch.randint(1, 64, (int(k),), generator=g)} for k in torch.randint(6, 15, (n,), generator=g)]


def _caught(f):
    "f()'s result and the messages of the warnings it raised."
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        out = f()
    return out, [str(x.message) for x in w]


@pytest.mark.parametrize('family, classes', [
    ('llama', {'LlamaRotaryEmbedding', 'LlamaRMSNorm', 'LlamaAttention'}),
    ('qwen2', {'Qwen2RotaryEmbedding', 'Qwen2RMSNorm', 'Qwen2Attention'}),
    ('gpt_neox', {'GPTNeoXRotaryEmbedding', 'GPTNeoXAttention'}),
    ('opt', {'OPTAttention'}),                          # softmax in float32
    ('gpt2', set())])
def test_detector_per_family_and_nothing_left_inside_keep_precision(family, classes):
    m = _model(family)
    parts = low_precision_parts(m)
    assert {p.cls for p in parts} == classes and all(p.dtype == torch.float32 for p in parts)
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with keep_precision(m):
        assert low_precision_parts(m) == []
        with torch.no_grad(): kept = m(input_ids=ids).logits
    with torch.no_grad(): as_is = m(input_ids=ids).logits
    diff = ((kept - as_is).abs().max() / as_is.abs().max()).item()
    assert diff == 0 if not classes else 0 < diff < 1e-6      # the float32 parts changed the logits at float32's level


@pytest.mark.parametrize('strategy', ['identity', 'ekfac'])
def test_float64_scores_do_not_depend_on_batching_inside_keep_precision(strategy):
    """Batch sizes 1, 4 and 10 pad the same sequences differently. Measured on a float64 Llama: as it is, the scores move
    by ~1e-10 of the largest (float32 roundings flip); inside `keep_precision` by ~1e-15."""
    m, train = _model('llama'), _seqs()
    queries = [{'input_ids': s['input_ids'], 'labels': torch.where(torch.arange(len(s['input_ids'])) < 3, -100, s['input_ids'])}
               for s in train[:3]]
    damping = 1e-2 if strategy == 'identity' else None
    with keep_precision(m):
        totals = [inf.pairwise_scores(m, inf.fit_factors(m, train, strategy, batch_size=b, progress=False), queries, train,
                                      damping=damping, batch_size=b, progress=False).total for b in (1, 4, 10)]
    assert totals[0].dtype == f64
    for t in totals[1:]: torch.testing.assert_close(t, totals[0], rtol=0, atol=1e-13 * totals[0].abs().max().item())


def test_iterative_solvers_warn_once_up_front_and_not_inside_keep_precision():
    "'cg' scoring (05b_solver -> pbrf.cg_ihvp) of a float64 Llama: one warning naming the float32 parts, none when kept."
    m, train = _model('llama'), _seqs(6)
    solver = inf.fit_factors(m, train, 'cg', solver=dict(tol=1e-10), progress=False)
    as_is, msgs = _caught(lambda: inf.pairwise_scores(m, solver, train[:2], train, damping=0.1, progress=False).total)
    ours = [x for x in msgs if 'computes parts of its forward in float32' in x]
    assert len(ours) == 1 and ours[0].startswith('cg_ihvp:') and 'model.layers.0.input_layernorm (LlamaRMSNorm' in ours[0]
    assert 'keep_precision' in ours[0] and 'stalls' not in ours[0]          # no ε: no PBRF floor to quote
    with keep_precision(m): kept, msgs = _caught(lambda: inf.pairwise_scores(m, solver, train[:2], train, damping=0.1,
                                                                              progress=False).total)
    assert not [x for x in msgs if 'computes parts' in x]
    torch.testing.assert_close(kept, as_is, rtol=0, atol=1e-5 * as_is.abs().max().item())   # float32-accurate, not more
    names = ['model.layers.0.mlp.down_proj.weight']
    _, msgs = _caught(lambda: lissa_ihvp(m, names, train, torch.randn(2048, dtype=f64), 0.1, depth=2))
    assert sum(x.startswith('lissa_ihvp: the model computes parts') for x in msgs) == 1
    _, msgs = _caught(lambda: cg_ihvp(m, names, train, torch.randn(2048, dtype=f64), 0.1, dtype=torch.float32))
    assert not [x for x in msgs if 'computes parts' in x]                  # float32 asked, float32 delivered


def test_pbrf_influence_warns_up_front_records_the_parts_and_is_exact_inside_keep_precision():
    """At the default ε = 1e-5 the central difference divides f's float32 rounding by 2ε: measured, the PBRF influence of
    the Llama as it is is off by ~1e-3 of the exact damped-GGN influence; inside `keep_precision`, by ~1e-8."""
    m, train = _model('llama'), _seqs(8)
    names = ['model.layers.0.mlp.down_proj.weight']
    res, msgs = _caught(lambda: pbrf_influence(m, names, train, train[2], train[:2], 1e-2))
    assert msgs[0].startswith('pbrf_influence: the model computes parts') and 'stalls at a relative gradient of about 6e-06' in msgs[0]
    stalls = [x for x in msgs[1:] if 'stopped reducing the gradient' in x]
    assert len(stalls) == 2 and all("It is float32's, not float64's" in x for x in stalls)   # the +ε and −ε solves
    assert not res.converged and {p.cls for p in res.plus.low_precision} == {'LlamaRotaryEmbedding', 'LlamaRMSNorm', 'LlamaAttention'}
    with keep_precision(m):
        kept, msgs = _caught(lambda: pbrf_influence(m, names, train, train[2], train[:2], 1e-2))
        prob = FlatProblem(m, names, train)
        g_q, g_m = (loss_grads(prob, prob.examples(x, 'x')) for x in (train[:2], [train[2]]))
        exact = g_q @ cg_ihvp(m, names, train, g_m[0], 1e-2, tol=1e-12)            # [2]
    assert kept.converged and msgs == [] and kept.plus.low_precision == []
    err = lambda x: ((x - exact).abs().max() / exact.abs().max()).item()
    assert err(kept.influence) < 1e-6 and err(res.influence) > 1e-5


def test_low_precision_parts_refuses_bad_input():
    net = torch.nn.Linear(3, 2).double()
    with pytest.raises(ValueError, match='`example` is needed'): low_precision_parts(net)
    with pytest.raises(TypeError, match='floating torch.dtype'): low_precision_parts(net, torch.randn(2, 3), dtype=torch.int64)
    assert low_precision_parts(net, (torch.randn(4, 3), torch.randn(4, 2))) == []
    with pytest.raises(TypeError, match='torch.float64 or torch.float32'):
        with keep_precision(net, torch.bfloat16): pass


def test_a_clean_float64_model_stalls_at_float64s_floor_and_says_so():
    "GPT-2 computes in float64 throughout: no warning up front; an unreachable `rtol` stalls with float64's message."
    m, train = _model('gpt2'), _seqs(6)
    res, msgs = _caught(lambda: inf.pbrf.pbrf_response(m, ['transformer.h.0.mlp.c_fc.weight'], train, train[1], 1e-5, 1e-2,
                                                       rtol=1e-15))
    assert res.stalled and res.low_precision == [] and len(msgs) == 1
    reached = res.grad_norm / res.tol * 1e-15
    assert 'the unit roundoff u = 1.1e-16 of float64' in msgs[0] and 'as accurate as the arithmetic allows' in msgs[0]
    assert f'`rtol` ≥ {reached:.0e}' in msgs[0] and 'keep_precision' not in msgs[0]
    assert inf.pbrf.FLOOR_FACTOR[0] * 1.1e-16 / 1e-5 <= reached <= inf.pbrf.FLOOR_FACTOR[1] * 1.1e-16 / 1e-5
