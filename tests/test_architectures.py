"Architecture sweep: `modules='mlp'` on tiny random models of many transformers families, dense and MoE (issue 15).\n\nEach family states the feed-forward weights it must track (written here, not read from influence_nb); identity scores\nmust equal autograd gradient dot products over exactly those parameters; EK-FAC must fit and be self-consistent; and\nfor MoE the per-expert EK-FAC factors and scores must equal a reference computed in this file from explicitly routed tokens."
import functools, warnings
import pytest, torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM
import influence_nb as inf
import randdata
from influence_nb.modules import find_modules

transformers.logging.set_verbosity_error()
E, K = 4, 2   # experts per MoE block, experts per token
SWIGLU, TWO = ('mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj'), ('mlp.c_fc', 'mlp.c_proj')
def experts(path, n=E): return tuple(f'{path}.{p}[{e}]' for e in range(n) for p in ('gate_up_proj', 'down_proj'))
MOE = dict(num_local_experts=E, num_experts=E, num_experts_per_tok=K, moe_intermediate_size=8, router_jitter_noise=0.)

# family -> (block list, feed-forward leaves of every block (or a function of the block number), extra config)
FAMILIES = {
    'gpt2': ('transformer.h', TWO, {}),
    'gpt_bigcode': ('transformer.h', TWO, {}),
    'starcoder2': ('model.layers', TWO, {}),
    'gpt_neox': ('gpt_neox.layers', ('mlp.dense_h_to_4h', 'mlp.dense_4h_to_h'), {}),
    'falcon': ('transformer.h', ('mlp.dense_h_to_4h', 'mlp.dense_4h_to_h'), {}),
    'bloom': ('transformer.h', ('mlp.dense_h_to_4h', 'mlp.dense_4h_to_h'), {}),
    'gptj': ('transformer.h', ('mlp.fc_in', 'mlp.fc_out'), {'rotary_dim': 4}),
    'opt': ('model.decoder.layers', ('fc1', 'fc2'), {'word_embed_proj_dim': 16, 'ffn_dim': 24}),
    'phi': ('model.layers', ('mlp.fc1', 'mlp.fc2'), {}),
    'phi3': ('model.layers', ('mlp.gate_up_proj', 'mlp.down_proj'), {}),          # fused gate and up projection
    'glm': ('model.layers', ('mlp.gate_up_proj', 'mlp.down_proj'), {}),           # fused too
    'helium': ('model.layers', SWIGLU, {'head_dim': 8}),
    'arcee': ('model.layers', ('mlp.up_proj', 'mlp.down_proj'), {}),
    'nemotron': ('model.layers', ('mlp.up_proj', 'mlp.down_proj'), {}),
    **{f: ('model.layers', SWIGLU, {}) for f in ('llama', 'mistral', 'qwen2', 'qwen3', 'gemma', 'gemma2', 'gemma3_text',
                                                 'olmo', 'olmo2', 'stablelm', 'cohere', 'cohere2', 'granite',
                                                 'exaone4', 'seed_oss', 'smollm3')},
    # MoE: every expert's two projections; shared experts are ordinary MLPs (tracked); routers are not tracked
    'mixtral': ('model.layers', experts('mlp.experts'), {}),
    'qwen3_moe': ('model.layers', experts('mlp.experts'), {}),
    'olmoe': ('model.layers', experts('mlp.experts'), {}),
    'phimoe': ('model.layers', experts('mlp.experts'), {}),
    'minimax': ('model.layers', experts('mlp.experts'), {}),
    'jamba': ('model.layers', experts('feed_forward.experts'), dict(expert_layer_period=1, expert_layer_offset=0, attn_layer_period=1,
                                                                    attn_layer_offset=0, mamba_d_state=4, mamba_expand=2)),
    'gpt_oss': ('model.layers', experts('mlp.experts'), {'head_dim': 8, 'sliding_window': 16}),   # transposed, biased experts
    'granitemoe': ('model.layers', experts('block_sparse_moe.experts'), {}),
    'granitemoeshared': ('model.layers', experts('block_sparse_moe.experts') + ('shared_mlp.input_linear', 'shared_mlp.output_linear'),
                         {'shared_intermediate_size': 8}),
    'qwen2_moe': ('model.layers', experts('mlp.experts') + tuple(f'mlp.shared_expert.{p}' for p in ('gate_proj', 'up_proj', 'down_proj')),
                  {'shared_expert_intermediate_size': 8, 'decoder_sparse_step': 1}),
    'deepseek_v3': ('model.layers',   # block 0 dense (first_k_dense_replace=1), block 1 routed experts + a shared expert
                    lambda b: SWIGLU if b == 0 else experts('mlp.experts') + tuple(f'mlp.shared_experts.{p}' for p in ('gate_proj', 'up_proj', 'down_proj')),
                    dict(first_k_dense_replace=1, n_routed_experts=E, n_shared_experts=1, n_group=1, topk_group=1,
                         q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, head_dim=4)),
}
MOE_FAMILIES = [f for f, (_, leaves, _) in FAMILIES.items() if callable(leaves) or any('[' in l for l in leaves)]
# the reference loop of `routed_pieces` is written for `[E, out, in]` weights and a chunked gate; GPT-OSS's experts are
# transposed, interleaved, biased and clamped: (b) and (c) of the sweep cover it
REFERENCE_FAMILIES = [f for f in MOE_FAMILIES if f != 'gpt_oss']

def build(family, layers=2, hidden=16):
    _, _, extra = FAMILIES[family]
    kw = dict(vocab_size=32, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
              intermediate_size=24, max_position_embeddings=64, pad_token_id=0, bos_token_id=0, eos_token_id=0, **extra)
    if family in MOE_FAMILIES: kw.update(MOE)
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(family, **kw)
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation='eager', experts_implementation='eager')
    return m.double().eval()

def expected(family, model):
    "Full names of the layers `modules='mlp'` must track, from the table above."
    prefix, leaves, _ = FAMILIES[family]
    n = len(model.get_submodule(prefix))
    return [f'{prefix}.{b}.{l}' for b in range(n) for l in (leaves(b) if callable(leaves) else leaves)]

def expected_params(model, names):
    "The parameter tensors behind those names: a layer's weight (and bias); an experts module's whole 3-D weights."
    params = dict(model.named_parameters())
    out = []
    for n in names:
        if n.endswith(']'):   # `<experts>.<param>[e]`: every expert is listed, so the whole 3-D tensor is covered
            if n.endswith('[0]'): out += [k for k in (n[:-3], n[:-3] + '_bias') if k in params]
        else: out += [k for k in (f'{n}.weight', f'{n}.bias') if k in params]
    return out

rand_seqs = functools.partial(randdata.rand_seqs, hi=10, top=randdata.VOCAB)    # ids from the whole vocabulary

def grads(model, names, seqs):
    "Per-sequence autograd gradients of the summed loss over the parameters `names`, `[n, P]`."
    params = dict(model.named_parameters())
    return randdata.autograd_grads(model, [params[n] for n in names], seqs)

@pytest.mark.parametrize('family', list(FAMILIES))
def test_sweep(family):
    m = build(family)
    want = expected(family, m)
    layers = find_modules(m, 'mlp')
    assert sorted(l.name for l in layers) == sorted(want)                                          # (a)
    train, queries = rand_seqs(4), rand_seqs(2, lo=6, seed=1, prompt=3)
    with warnings.catch_warnings():
        warnings.simplefilter('error')   # 'mlp' is complete: nothing to warn about
        f = inf.fit_factors(m, train, 'identity', progress=False)
    s = inf.pairwise_scores(m, f, queries, train, progress=False).total
    names = expected_params(m, want)
    ref = grads(m, names, queries) @ grads(m, names, train).T
    assert float((s - ref).abs().max()) < 1e-6 * float(ref.abs().max())                          # (b)
    f = inf.fit_factors(m, train, 'ekfac', batch_size=3, progress=False)                          # (c)
    both = inf.pairwise_scores(m, f, queries + train, train, progress=False).total
    self_ = inf.self_scores(m, f, train, progress=False)
    assert torch.isfinite(both).all() and (self_ > 0).all()
    assert torch.allclose(torch.diagonal(both[2:]), self_, rtol=1e-6)

def routed_pieces(model, seq):
    "One sequence through the original model, each experts module's output recomputed by this file's own routing loop:\n    `{(experts path, e): (input rows, gate_up output rows, down input rows, down output rows)}` after backward."
    rec, handles = {}, []
    for path, mod in model.named_modules():
        if type(mod).__name__.endswith('Experts'):
            def hook(mod, args, out, path=path):
                x, top_idx, top_w = args                                       # [tokens, d], [tokens, k], [tokens, k]
                new = torch.zeros_like(x)
                for e in range(mod.gate_up_proj.shape[0]):
                    rows, slot = (top_idx == e).nonzero(as_tuple=True)
                    s1 = x[rows] @ mod.gate_up_proj[e].T; s1.retain_grad()
                    gate, up = s1.chunk(2, -1)
                    h = mod.act_fn(gate) * up
                    s2 = h @ mod.down_proj[e].T; s2.retain_grad()
                    new = new.index_add(0, rows, s2 * top_w[rows, slot, None])
                    rec[(path, e)] = (x[rows].detach(), s1, h.detach(), s2)
                assert torch.allclose(new, out, rtol=1e-10, atol=1e-12)        # this loop is the module's own forward
                return new
            handles.append(mod.register_forward_hook(hook))
    try: randdata.loss_backward(model, seq)
    finally:
        for h in handles: h.remove()
    out = {}   # per expert layer: (activations a [rows, d_in], output gradients ds [rows, d_out])
    for (path, e), (x, s1, h, s2) in rec.items():
        out[f'{path}.gate_up_proj[{e}]'] = (x, s1.grad)
        out[f'{path}.down_proj[{e}]'] = (h, s2.grad)
    return out

@pytest.mark.parametrize('family', REFERENCE_FAMILIES)
def test_moe_per_expert_ekfac_matches_reference(family):
    m = build(family)
    train, queries = rand_seqs(8, lo=8, hi=14, seed=3), rand_seqs(2, lo=6, seed=4, prompt=3)
    f = inf.fit_factors(m, train, 'ekfac', fisher='empirical', batch_size=3, progress=False)
    got = inf.pairwise_scores(m, f, queries, train, per_layer=True, progress=False).per_layer
    randdata.check_per_expert_ekfac(f, got, [routed_pieces(m, s) for s in train], [routed_pieces(m, s) for s in queries])

def test_partial_expert_list_warns_and_names_what_is_left_out():
    m = build('mixtral')
    names = [l.name for l in find_modules(m, 'mlp') if l.name != 'model.layers.1.mlp.experts.down_proj[3]']
    with pytest.warns(UserWarning, match=r"mlp\.experts\.down_proj: \[1\]"):
        layers = find_modules(m, names)
    assert len(layers) == 2 * 2 * E - 1
