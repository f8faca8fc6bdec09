"""Session 20, a stranger's own model on angles nobody had tried (half precision, a float64 copy of a model, sliding
windows, `datasets` inputs, the explorer). Each test failed before its fix (the numbers in the docstrings are what the
stranger saw). (`RegressorAsLM` draws its noise with `torch.randn`, which gives the same numbers in float32 and float64:
only `torch.rand` differs.)"""
import copy
import pytest
import torch
import influence_nb as inf
from transformers import LlamaConfig, LlamaForCausalLM

pytestmark = pytest.mark.usefixtures('one_thread')   # tests/conftest.py


def _seqs(n=12, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{'input_ids': torch.randint(1, vocab, (int(torch.randint(8, 24, (1,), generator=g)),), generator=g)} for _ in range(n)]


def _llama(vocab=64, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                        pad_token_id=0, bos_token_id=None, eos_token_id=None)).eval()


def test_a_float64_copy_draws_the_same_pseudo_labels():
    """The usual check of a float32 fit is a float64 copy of the model. With the true Fisher its pseudo-labels were drawn
    from float64 uniforms, other numbers from the same seed: the stranger's EK-FAC scores differed by 12 % (another seed:
    21 %), as if float32 were that imprecise. Now the copy samples the same labels and agrees to float32 rounding."""
    m, train = _llama(), _seqs()
    queries = [{'input_ids': s['input_ids'], 'labels': torch.cat([torch.full((4,), -100), s['input_ids'][4:]])} for s in _seqs(3, seed=1)]
    m64 = copy.deepcopy(m).double()
    s32 = inf.pairwise_scores(m, inf.fit_factors(m, train, progress=False), queries, train, progress=False).total
    s64 = inf.pairwise_scores(m64, inf.fit_factors(m64, train, progress=False), queries, train, progress=False).total
    other = inf.pairwise_scores(m, inf.fit_factors(m, train, seed=1, progress=False), queries, train, progress=False).total
    rel = lambda a, b: float((a.double() - b.double()).abs().max() / b.double().abs().max())
    assert rel(other, s64) > 1e-2                 # the sample matters: another seed moves the scores
    assert rel(s32, s64) < 1e-4, rel(s32, s64)    # the precision does not


def test_a_float16_model_with_large_activations_is_scored_not_refused():
    """A float16 model whose MLP inputs reach ~200 (finite everywhere: its own forward is fine) was refused with
    "Non-finite values (NaN or Inf) in the activations … try bfloat16": the check summed a batch in float16, which passes
    65504. Its scores agree with the float64 copy of the same weights (the stranger: 2.5e-3, bfloat16 3.6e-2)."""
    m = _llama()
    with torch.no_grad():
        m.model.embed_tokens.weight.add_(0.5)                          # a residual stream with a common direction (as
        for block in m.model.layers: block.post_attention_layernorm.weight.mul_(200)   # trained models have), scaled up
    m16 = m.half()
    m64 = copy.deepcopy(m16).double()
    train = _seqs(8)
    queries = [{'input_ids': s['input_ids'], 'labels': torch.cat([torch.full((4,), -100), s['input_ids'][4:]])} for s in _seqs(2, seed=1)]
    hit = {}
    h = m16.model.layers[0].mlp.gate_proj.register_forward_hook(lambda mod, i, o: hit.update(x=i[0]))
    with torch.no_grad(): m16(input_ids=torch.stack([s['input_ids'][:8] for s in train]))
    h.remove()
    assert torch.isfinite(hit['x']).all() and not torch.isfinite(hit['x'].sum())   # finite, but its float16 sum is not
    for strategy in ('identity', 'ekfac'):
        kw = dict(strategy=strategy, fisher='empirical', progress=False)
        s16 = inf.pairwise_scores(m16, inf.fit_factors(m16, train, **kw), queries, train, progress=False).total
        s64 = inf.pairwise_scores(m64, inf.fit_factors(m64, train, **kw), queries, train, progress=False).total
        assert float((s16.double() - s64).abs().max() / s64.abs().max()) < 2e-2, strategy

