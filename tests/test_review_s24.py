"""Review of session 24's changes (no-grad calls, call counts, duplicate routing, size-1 axes, other lists of blocks).

The oracle is plain autograd over the tracked weights in float64: `strategy='identity'` scores must equal dot products of
per-sequence gradients of the summed token loss; iterative strategies must equal the dense damped GGN solve. Each test is
one finding and asserts the correct behaviour (it fails while the finding stands).
"""
import warnings
from types import SimpleNamespace
import pytest, torch
from torch import nn
import influence_nb as inf
from influence_nb.modules import find_modules
import randdata

V = randdata.VOCAB


def data():
    return randdata.rand_seqs(5, lo=4, hi=9, top=V), randdata.rand_queries(2, length=7, completion=3, top=V)


def grads(model, params, seqs):
    "Per-sequence gradients `[n, P]` of the summed loss by plain autograd (a parameter without one: zeros)."
    out = []
    for s in seqs:
        randdata.loss_backward(model, s)
        out.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]))
    model.zero_grad()
    return torch.stack(out)


def rel(a, b): return float((a.double() - b.double()).abs().max() / b.double().abs().max())


class Mlp(nn.Module):
    def __init__(self, d=8): super().__init__(); self.fc1, self.fc2 = nn.Linear(d, 16), nn.Linear(16, d)
    def forward(self, x): return self.fc2(torch.tanh(self.fc1(x)))


class SetupContextCheckpoint(torch.autograd.Function):
    "A reentrant checkpoint written in torch's newer style: `forward` takes no ctx (`setup_context` gets it)."
    @staticmethod
    def forward(fn, x): return fn(x)                   # runs under no_grad, as every autograd.Function forward does
    @staticmethod
    def setup_context(ctx, inputs, output): ctx.fn = inputs[0]; ctx.save_for_backward(inputs[1])
    @staticmethod
    def backward(ctx, g):
        x, = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_(); y = ctx.fn(x)
        torch.autograd.backward(y, g)                  # the weights' gradients, as torch's reentrant checkpoint does
        return None, x.grad


class Tiny(nn.Module):
    "emb -> x + mlp(x) -> head, the MLP run plainly, in a setup_context-style checkpoint, or the whole forward under no_grad."
    def __init__(self, how='plain', d=8):
        super().__init__(); torch.manual_seed(0); self.how = how
        self.emb, self.mlp, self.head = nn.Embedding(V, d), Mlp(d), nn.Linear(d, V); self.double()
    def forward(self, input_ids, attention_mask=None, **kw):
        x = self.emb(input_ids)
        if self.how == 'whole_nograd':
            with torch.no_grad(): return SimpleNamespace(logits=self.head(x + self.mlp(x)))
        h = SetupContextCheckpoint.apply(self.mlp, x) if self.how == 'checkpoint' else self.mlp(x)
        return SimpleNamespace(logits=self.head(x + h))


def test_a_checkpoint_function_without_ctx_is_refused_or_scored_right():
    """`reentrant_checkpoint()` recognises a checkpoint only by a frame whose first argument is a `BackwardCFunction` (the
    ctx). An autograd.Function in the `setup_context` style (forward(fn, x), no ctx) runs its forward under no_grad too, so
    `capture` files the MLP's calls as "the model's own no_grad" and drops them. Today: identity scores are all exactly 0
    (autograd's are up to ~3.7), with a warning that says "no gradient reaches their weights, so their influence is 0"; before
    session 24 this was refused ("ran without gradients ... reentrant checkpoint")."""
    m = Tiny('checkpoint')
    train, queries = data()
    params = [p for layer in find_modules(m, 'mlp') for _, p in layer.params()]
    want = grads(m, params, queries) @ grads(m, params, train).T
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            f = inf.fit_factors(m, train, 'identity', modules='mlp', progress=False)
            got = inf.pairwise_scores(m, f, queries, train, progress=False).total
    except ValueError: return                                           # refused by name: fine
    assert rel(got, want) < 1e-8, (got, want)


def test_a_model_whose_whole_forward_runs_without_gradients_is_refused():
    """A model whose forward runs under `torch.no_grad` (or `inference_mode`) throughout: no tracked layer has any call a
    gradient can reach. Before session 24 scoring raised "ran without gradients"; 'ekfac' still raises ("No tracked layer
    has any curvature"). Today 'identity' returns a score matrix of exact zeros, with only a warning per pass — a result
    that looks like "no training sequence matters"."""
    m = Tiny('whole_nograd')
    train, queries = data()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(ValueError):
            f = inf.fit_factors(m, train, 'identity', modules='mlp', progress=False)
            inf.pairwise_scores(m, f, queries, train, progress=False)


class Depth(nn.Module):
    "Block 0 runs once on batches of up to 8 tokens and twice on longer ones (a depth that depends on the input)."
    def __init__(self, d=8):
        super().__init__(); torch.manual_seed(0)
        self.emb, self.mlp, self.head = nn.Embedding(V, d), Mlp(d), nn.Linear(d, V); self.double()
    def forward(self, input_ids, attention_mask=None, **kw):
        x = self.emb(input_ids)
        for _ in range(1 if input_ids.shape[1] <= 8 else 2): x = x + self.mlp(x)
        return SimpleNamespace(logits=self.head(x))


def test_pairwise_scores_checks_the_training_side_calls_as_self_scores_does():
    """Factors fitted on short sequences record `{'mlp.fc1': [1], 'mlp.fc2': [1]}`. On longer training sequences the layers
    run twice per forward: `self_scores(m, f, long)` warns "Layer 'mlp.fc1' ran 2 times in a forward pass here, and 1 in
    every forward pass of the fit", while `pairwise_scores(m, f, queries, long)` — the same sequences, the same forwards —
    says nothing: only `prepare_queries` is watched, not the training pass (nor `scan`'s `_score_chunk`)."""
    m = Depth()
    short = randdata.rand_seqs(4, lo=4, hi=8, top=V)
    long = randdata.rand_seqs(3, lo=10, hi=12, seed=3, top=V)
    queries = randdata.rand_queries(2, length=7, completion=3, top=V)
    f = inf.fit_factors(m, short, 'ekfac', fisher='empirical', modules='mlp', progress=False)
    assert f.info['calls'] == {'mlp.fc1': [1], 'mlp.fc2': [1]}
    with pytest.warns(UserWarning, match=r"ran 2 times in a forward pass here, and 1 in every"):
        inf.self_scores(m, f, long, progress=False)
    with pytest.warns(UserWarning, match=r"ran 2 times in a forward pass here, and 1 in every"):
        inf.pairwise_scores(m, f, queries, long, progress=False)


def test_mlp_on_a_vision_language_model_does_not_advise_tracking_the_vision_tower():
    """On every vision-language model (Llava, Gemma 3, ...) `modules='mlp'` now warns that it "leaves out those of the
    model's other lists of blocks: 'model.vision_tower.encoder.layers' (4 layers ...). To track them too, pass ... plus
    theirs". influence_nb's sequences carry only input_ids, so the vision tower never runs: following the advice makes
    `fit_factors` raise "Layers [...vision_tower...] were not called in the model's forward pass"."""
    import transformers as T
    txt = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
               intermediate_size=24, head_dim=8)
    vis = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, image_size=16, patch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.manual_seed(0)
        m = T.LlavaForConditionalGeneration(T.LlavaConfig(vision_config=T.CLIPVisionConfig(**vis), text_config=T.LlamaConfig(**txt),
                                                          image_token_index=63)).eval()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        find_modules(m, 'mlp')
    said = [str(x.message) for x in w if 'vision_tower' in str(x.message)]
    assert not said, said


class FusedTanh(torch.autograd.Function):
    "tanh as a fused kernel would give it: a forward-mode rule, and a backward with no double backward."
    generate_vmap_rule = True
    @staticmethod
    def forward(x): return torch.tanh(x)
    @staticmethod
    def setup_context(ctx, inputs, output): ctx.save_for_backward(output); ctx.save_for_forward(output)
    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g): y, = ctx.saved_tensors; return g * (1 - y * y)
    @staticmethod
    def jvp(ctx, t): y, = ctx.saved_tensors; return t * (1 - y * y)


class Fused(nn.Module):
    def __init__(self, d=8):
        super().__init__(); torch.manual_seed(0)
        self.emb, self.fc1, self.fc2, self.head = nn.Embedding(V, d), nn.Linear(d, 16), nn.Linear(16, d), nn.Linear(d, V); self.double()
    def forward(self, input_ids, attention_mask=None, **kw):
        x = self.emb(input_ids)
        return SimpleNamespace(logits=self.head(x + self.fc2(FusedTanh.apply(self.fc1(x)))))


def dense_ggn(m, params, seqs):
    "Mean over `seqs` of Σ_scored Jᵀ (diag p − p pᵀ) J, J by one autograd.grad per logit (tiny models only)."
    P = sum(p.numel() for p in params)
    G = torch.zeros(P, P, dtype=torch.float64)
    for s in seqs:
        logits = m(input_ids=s['input_ids'][None]).logits[0, :-1][(s['labels'][1:] != -100)]   # [S, V]
        for r in range(len(logits)):
            J = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(logits[r, c], params, retain_graph=True)])
                             for c in range(logits.shape[1])])                                  # [V, P]
            p = logits[r].softmax(-1).detach()
            G += J.T @ (torch.diag(p) - p[:, None] * p[None]) @ J
    return G / len(seqs)


def test_gauss_newton_products_through_a_function_without_double_backward():
    """Pre-existing (02_pbrf, `_Linearised`): J v is taken as the vjp of the vjp, probed once with `j_of(θ)`. Through a
    `setup_context`-style autograd.Function whose backward is `once_differentiable`, torch.func gives zeros there instead of
    raising, so the probe passes and the jvp fallback is never used. Today: `gnvp` is 0.64 off the dense GGN on these three
    sequences (0.39 on five), and 'cg' scores 1.18 off the dense solve on five, with no warning."""
    from influence_nb.pbrf import gnvp
    m = Fused()
    train, _ = data()
    layers = find_modules(m, ['fc1', 'fc2'])
    names, params = [n for l in layers for n, _ in l.params()], [p for l in layers for _, p in l.params()]
    G = dense_ggn(m, params, train[:3])
    v = torch.randn(2, len(G), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    try: got = gnvp(m, names, train[:3], v)
    except ValueError: return                                           # refused by name: fine
    assert rel(got, v @ G) < 1e-8
