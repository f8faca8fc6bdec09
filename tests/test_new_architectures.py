"Session 15: `modules='mlp'` on hybrids (Nemotron-H: blocks without a feed-forward layer are skipped, an MLP named `mixer`\nis found by its class) and on DBRX's experts (three 2-D weights, experts stacked along rows), checked against autograd\nand against a per-expert EK-FAC reference routed in this file; models with nothing to track, or experts influence_nb\ncannot split, are refused by name."
import warnings
import pytest, torch
from torch import nn
import transformers
from transformers import AutoModelForCausalLM
import influence_nb as inf
from influence_nb.pbrf import keep_precision
import randdata
from influence_nb.modules import find_modules, block_coverage, tiny_model, is_trackable
from influence_nb.data import eval_mode

transformers.logging.set_verbosity_error()
E = 4   # experts per MoE block in tiny_model

def model(family, layers):
    torch.manual_seed(0)
    return tiny_model(family, layers=layers).double()

whole_params = randdata.tracked_params   # an expert slice stands for its whole weight (all experts are tracked)

def identity_vs_autograd(m):
    layers = find_modules(m, 'mlp')
    train, queries = randdata.rand_seqs(4, hi=10, top=30), randdata.rand_seqs(2, lo=6, hi=10, top=30, seed=1, prompt=3)
    with warnings.catch_warnings():
        warnings.simplefilter('error')   # 'mlp' is complete: nothing to warn about
        f = inf.fit_factors(m, train, 'identity', progress=False)
    s = inf.pairwise_scores(m, f, queries, train, progress=False).total
    params = dict(m.named_parameters())
    ps = [params[n] for n in whole_params(layers)]
    ref = randdata.autograd_grads(m, ps, queries) @ randdata.autograd_grads(m, ps, train).T
    return float((s - ref).abs().max() / ref.abs().max())

def test_nemotron_h_tracks_mlp_and_moe_blocks_only():
    m = model('nemotron_h', 4)   # blocks: MoE, attention, Mamba, MLP (each one `mixer`)
    names = [layer.name for layer in find_modules(m, 'mlp')]
    want = ([f'model.layers.0.mixer.experts.{p}[{e}]' for e in range(E) for p in ('up_proj', 'down_proj')]
            + [f'model.layers.0.mixer.shared_experts.{p}' for p in ('up_proj', 'down_proj')]
            + [f'model.layers.3.mixer.{p}' for p in ('up_proj', 'down_proj')])
    assert names == want
    assert [bool(c['kinds']) for c in block_coverage(m, names).values()] == [True, False, False, True]
    # the Mamba path computes in float32 inside a float64 model, so the two batchings round differently
    assert identity_vs_autograd(m) < 1e-6

def test_dbrx_experts_identity_equals_autograd():
    m = model('dbrx', 2)
    names = [layer.name for layer in find_modules(m, 'mlp')]
    assert names == [f'transformer.blocks.{b}.ffn.experts.mlp.{p}[{e}]' for b in range(2) for e in range(E) for p in ('w1', 'v1', 'w2')]
    with keep_precision(m): err = identity_vs_autograd(m)   # float64 throughout: DBRX's softmaxes and norms compute in float32, and
    assert err < 1e-10                                      # padding moved their low bits (2.5e-9 on an AVX2 CPU, 1e-16 elsewhere)

def llama4(layers=2):
    "Llama 4 text: block 0 dense, block 1 MoE (four experts, top-1, a shared expert)."
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model('llama4_text', vocab_size=32, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                                            num_key_value_heads=2, head_dim=8, intermediate_size=8, intermediate_size_mlp=24,
                                            num_local_experts=E, num_experts_per_tok=1, interleave_moe_layer_step=2,
                                            pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation='eager').double().eval()

def jetmoe():
    "JetMoE: its MLP experts run by its own routing code (refused), and a mixture of attention heads (attention)."
    return AutoModelForCausalLM.from_config(transformers.JetMoeConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_local_experts=E, num_experts_per_tok=2,
        kv_channels=8, num_key_value_heads=2, intermediate_size=16))

def dbrx_experts(mod, x, top_idx, top_w):
    "DBRX's experts written out here: per expert, (rows, [(weight name, input, output)], output to add)."
    x, I, out = x.reshape(-1, x.shape[-1]), mod.ffn_hidden_size, []
    for e in range(mod.num_experts):
        rows, slot = (top_idx == e).nonzero(as_tuple=True)
        w1, v1, w2 = (getattr(mod.mlp, p)[e * I:(e + 1) * I] for p in ('w1', 'v1', 'w2'))
        g, u = x[rows] @ w1.T, x[rows] @ v1.T
        h = mod.mlp.activation_fn(g) * u
        y = h @ w2
        out.append((rows, [(f'mlp.w1[{e}]', x[rows], g), (f'mlp.v1[{e}]', x[rows], u), (f'mlp.w2[{e}]', h, y)], y * top_w[rows, slot, None]))
    return out

def llama4_experts(mod, routed_in, moe, hidden):
    "Llama 4's experts written out here: expert e's rows are the tokens the router sent it (their input, scaled by its score)."
    x, out = routed_in.view(mod.num_experts, -1, routed_in.shape[-1]), []
    top = torch.topk(moe.router(hidden)[1], moe.top_k, dim=1).indices   # recomputed from the MoE block's input
    for e in range(mod.num_experts):
        rows = (top == e).any(1).nonzero()[:, 0]
        gu = x[e, rows] @ mod.gate_up_proj[e]
        gate, up = gu.chunk(2, -1)
        h = up * mod.act_fn(gate)
        y = h @ mod.down_proj[e]
        out.append((rows, [(f'gate_up_proj[{e}]', x[e, rows], gu), (f'down_proj[{e}]', h, y)], y))
    return out

def routed_pieces(m, seq, kind):
    "One sequence through `m`, each experts module's output recomputed by this file's own routing: per expert layer,\n    (inputs [rows, d_in], output gradients [rows, d_out]) after backward."
    rec, handles, hidden = [], [], {}   # hidden: each Llama 4 MoE block's input, by the experts module it holds
    for path, mod in m.named_modules():
        if type(mod).__name__ == {'dbrx': 'DbrxExperts', 'llama4': 'Llama4TextExperts'}[kind]:
            def hook(mod, args, out, path=path):
                pieces = dbrx_experts(mod, *args) if kind == 'dbrx' else llama4_experts(mod, *args, *hidden[mod])
                n = out.numel() // out.shape[-1] // (1 if kind == 'dbrx' else mod.num_experts)
                new = torch.zeros(n, out.shape[-1], dtype=out.dtype)
                for e, (rows, mats, y) in enumerate(pieces):
                    for _, _, s in mats: s.retain_grad()
                    new = new.index_add(0, rows, y)
                    rec.extend((f'{path}.{w}', a, s) for w, a, s in mats)
                if kind == 'dbrx': assert torch.allclose(new.view(out.shape), out, rtol=1e-10, atol=1e-12)   # the module's own
                else:                  # Llama 4's experts return each expert's rows for every token, which the block sums
                    assert torch.allclose(new, out.view(mod.num_experts, -1, out.shape[-1]).sum(0), rtol=1e-10, atol=1e-12)
                    new = torch.cat([new] + [torch.zeros_like(new)] * (mod.num_experts - 1))
                return new.view(out.shape)
            handles.append(mod.register_forward_hook(hook))
        if kind == 'llama4' and type(mod).__name__ == 'Llama4TextMoe':
            def keep(moe, args): hidden[moe.experts] = (moe, args[0].reshape(-1, args[0].shape[-1]))
            handles.append(mod.register_forward_pre_hook(keep))
    try: randdata.loss_backward(m, seq)
    finally:
        for h in handles: h.remove()
    return {n: (a.detach(), s.grad) for n, a, s in rec}

@pytest.mark.parametrize('kind', ['dbrx', 'llama4'])
def test_per_expert_ekfac_matches_reference(kind):
    m = model('dbrx', 2) if kind == 'dbrx' else llama4()
    train, queries = randdata.rand_seqs(8, lo=8, hi=14, seed=3, top=32), randdata.rand_seqs(2, lo=6, seed=4, prompt=3, top=32)
    f = inf.fit_factors(m, train, 'ekfac', fisher='empirical', batch_size=3, progress=False)
    got = inf.pairwise_scores(m, f, queries, train, per_layer=True, progress=False).per_layer
    randdata.check_per_expert_ekfac(f, got, [routed_pieces(m, s, kind) for s in train], [routed_pieces(m, s, kind) for s in queries])

def test_llama4_tracks_dense_shared_and_routed_experts():
    m = llama4()
    names = [layer.name for layer in find_modules(m, 'mlp')]
    assert names == ([f'model.layers.0.feed_forward.{p}' for p in ('gate_proj', 'up_proj', 'down_proj')]
                     + [f'model.layers.1.feed_forward.experts.{p}[{e}]' for e in range(E) for p in ('gate_up_proj', 'down_proj')]
                     + [f'model.layers.1.feed_forward.shared_expert.{p}' for p in ('gate_proj', 'up_proj', 'down_proj')])
    assert identity_vs_autograd(m) < 1e-10

def test_dbrx_partial_list_warns_and_self_scores_are_the_diagonal():
    m = model('dbrx', 2)
    names = [layer.name for layer in find_modules(m, 'mlp') if layer.name != 'transformer.blocks.1.ffn.experts.mlp.w2[3]']
    with pytest.warns(UserWarning, match=r"ffn\.experts\.mlp\.w2: \[1\]"):
        find_modules(m, names)
    train = randdata.rand_seqs(5, seed=2, top=32)
    f = inf.fit_factors(m, train, 'ekfac', batch_size=2, progress=False)
    both = inf.pairwise_scores(m, f, train, train, progress=False).total
    self_ = inf.self_scores(m, f, train, progress=False)
    assert (self_ > 0).all() and torch.allclose(torch.diagonal(both), self_, rtol=1e-6)

def test_nothing_to_track_and_unsplittable_experts_are_refused_by_name():
    torch.manual_seed(0)
    mamba = AutoModelForCausalLM.from_config(transformers.MambaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2))
    with pytest.raises(ValueError, match="found no feed-forward layer in any block of MambaForCausalLM"):
        find_modules(mamba, 'mlp')
    jet = jetmoe()
    # its MLP experts are named; its mixture of attention heads is attention, not feed-forward
    with pytest.raises(ValueError, match=r"block 'model.layers.0' has feed-forward weights no trackable layer covers: "
                                         r"\['mlp.input_linear.weight', 'mlp.output_linear.weight'\] \("):
        find_modules(jet, 'mlp')

def test_rwkv_scores_use_the_trained_weights_and_leave_the_model_as_found():
    "RWKV's eval forward divides weights in place (`rescale_every`): influence is taken on the weights as trained."
    torch.manual_seed(0)
    m = transformers.RwkvForCausalLM(transformers.RwkvConfig(vocab_size=32, hidden_size=16, num_hidden_layers=3, attention_hidden_size=16,
                                                             intermediate_size=32, rescale_every=1)).double().eval()
    trained = {n: p.detach().clone() for n, p in m.named_parameters()}
    train, queries = randdata.rand_seqs(4, hi=10, top=30), randdata.rand_seqs(2, lo=6, hi=10, top=30, seed=1, prompt=3)
    f = inf.fit_factors(m, train, 'identity', progress=False)
    m(input_ids=train[0]['input_ids'][None])            # the user's own eval forward: block 2's value weight is divided by 4
    found = {n: p.detach().clone() for n, p in m.named_parameters()}
    v2 = 'rwkv.blocks.2.feed_forward.value.weight'
    assert torch.equal(found[v2], trained[v2] / 4)
    s = inf.pairwise_scores(m, f, queries, train, progress=False).total   # still bound to the fitted (trained) weights
    assert all(torch.equal(p, found[n]) for n, p in m.named_parameters())  # left as found
    assert (m.config.use_cache, m.config.rescale_every, m.rwkv.layers_are_rescaled) == (True, 1, True)
    m.train()                                            # a training forward multiplies them back: the reference's gradients
    ps = [dict(m.named_parameters())[n] for n in whole_params(find_modules(m, 'mlp'))]
    ref = randdata.autograd_grads(m, ps, queries) @ randdata.autograd_grads(m, ps, train).T
    assert torch.equal(dict(m.named_parameters())[v2], trained[v2])
    assert float((s - ref).abs().max() / ref.abs().max()) < 1e-10
    with eval_mode(m): f2 = inf.fit_factors(m, train, 'identity', progress=False)   # fitted while rescaling is held off
    assert torch.equal(inf.pairwise_scores(m, f2, queries, train, progress=False).total, s)   # accepted outside, same scores

def test_models_with_a_recurrent_cache_are_scored_without_it():
    "xLSTM updates its cached state in place during a forward with `use_cache`, which breaks the backward pass."
    torch.manual_seed(0)
    x = AutoModelForCausalLM.from_config(transformers.xLSTMConfig(
        vocab_size=32, hidden_size=32, embedding_dim=32, num_heads=2, num_blocks=2, qk_dim_factor=0.5, v_dim_factor=1.0,
        mode='inference')).double().eval()
    assert x.config.use_cache
    layers, train, queries = find_modules(x, 'mlp'), randdata.rand_seqs(4, hi=10, top=30), randdata.rand_seqs(2, lo=6, seed=1, prompt=3)
    s = inf.pairwise_scores(x, inf.fit_factors(x, train, 'identity', progress=False), queries, train, progress=False).total
    assert x.config.use_cache                            # restored
    x.config.use_cache = False                           # the brute force needs it off too: with it, the model's own forward fails
    ps = [dict(x.named_parameters())[n] for n in whole_params(layers)]
    ref = randdata.autograd_grads(x, ps, queries) @ randdata.autograd_grads(x, ps, train).T
    assert float((s - ref).abs().max() / ref.abs().max()) < 1e-6

def test_left_out_weights_are_named_with_advice_that_holds():
    jet = jetmoe()
    with pytest.warns(UserWarning, match=r"modules='all' leaves out these feed-forward weights, which influence_nb cannot track "
                                         r".*mlp\.input_linear\.weight: \[0, 1\]; mlp\.output_linear\.weight: \[0, 1\]\.$"):
        find_modules(jet, 'all')
    m = tiny_model('gpt2', layers=3)
    m.transformer.h[2].mlp.c_fc.weight = m.transformer.h[1].mlp.c_fc.weight   # tied: 'mlp' refuses this model
    with pytest.warns(UserWarning, match=r"mlp\.c_fc\.weight: \[0, 1, 2\]\. \(modules='mlp' refuses this model: Layer "
                                         r"'transformer\.h\.1\.mlp\.c_fc' shares its weight") as rec:
        find_modules(m, [f'transformer.h.{b}.mlp.c_proj' for b in range(3)])
    assert "Use modules='mlp'" not in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        find_modules(tiny_model('gpt2', layers=2), 'all')   # nothing left out: no warning

def test_llama4_all_leaves_out_its_tuple_returning_router():
    "Llama4Router subclasses nn.Linear and returns (scores, logits) without declaring it: never a candidate, so 'all' fits."
    m = llama4()
    assert [n for n in inf.candidate_modules(m) if 'router' in n] == []
    f = inf.fit_factors(m, randdata.rand_seqs(3, top=30), 'ekfac', modules='all', progress=False)
    assert len(f.modules) == 22   # attention q, k, v, o × 2 blocks; block 0's MLP (3); 4 experts × 2; the shared expert (3)

def test_float64_moe_with_its_default_experts_kernel():
    "transformers' default grouped-GEMM experts take no float64 on a CPU: influence_nb's passes switch to eager and back."
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=2)
    m = AutoModelForCausalLM.from_config(cfg).double().eval()
    kernel = m.config._experts_implementation
    assert kernel != 'eager'
    queries, train = randdata.rand_seqs(2, lo=6, seed=1, prompt=3, top=30), randdata.rand_seqs(4, top=30)
    lp = inf.completion_logprobs(m, queries)
    f = inf.fit_factors(m, train, 'ekfac', progress=False)
    s = inf.pairwise_scores(m, f, queries, train, progress=False).total
    assert m.config._experts_implementation == kernel
    m.set_experts_implementation('eager')                # the reference: the same model, switched by hand
    assert torch.equal(inf.completion_logprobs(m, queries), lp)
    assert torch.allclose(inf.pairwise_scores(m, f, queries, train, progress=False).total, s, rtol=1e-12)

def test_a_block_whose_layers_cannot_be_told_from_an_mlp_is_refused_not_skipped():
    "Skipping is for a hybrid's Mamba and attention blocks; an MLP under a name and class 'mlp' does not know must not vanish."
    class ChannelMix(nn.Module):
        def __init__(self, d): super().__init__(); self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
    m = tiny_model('llama', layers=4)
    for b in (1, 3):
        del m.model.layers[b].mlp
        m.model.layers[b].channel_mix = ChannelMix(16)
    with pytest.raises(ValueError, match=r"block 'model.layers.1' has no layer it recognises as feed-forward, and layers it "
                                         r"cannot tell from one \(in no attention or Mamba-like mixer\): \['channel_mix.up', "
                                         r"'channel_mix.down'\]"):
        find_modules(m, 'mlp')

def test_linear_subclasses_that_return_a_tensor_stay_trackable():
    "Only a forward that returns a tuple on every path is refused (Llama 4's router); a tuple inside a helper, or on an\n    optional path the model does not take, is not."
    class Helper(nn.Linear):
        def forward(self, x):
            def parts(): return nn.functional.linear(x, self.weight, self.bias), 0.
            y, extra = parts()
            return y + extra
    class Optional(nn.Linear):
        def forward(self, x, return_input=False):
            y = super().forward(x)
            if return_input: return y, x
            return y
    class Pair(nn.Linear):
        def forward(self, x): return super().forward(x), x
    assert [is_trackable(c(2, 2)) for c in (Helper, Optional, Pair)] == [True, True, False]
