"""Layers that run more than once per forward pass are scored over every call (session 23).

A block applied in a loop (ALBERT, looped and recurrent-depth models), a block registered at two places, and a block whose
copy holds the very same weights (tied: Zamba2's shared transformer block) were refused before; `capture` now keeps one
input and output per call and `layer_passes` lays the calls side by side on the token axis. Each is checked against a
computation that does not go through that code: autograd's gradients, the dense damped GGN, and covariances summed from
plain forward hooks.
"""
from types import SimpleNamespace
import pytest, torch
from torch import nn
import influence_nb as inf
from influence_nb.modules import find_modules, layer_aliases, block_coverage, candidate_modules
from influence_nb.theory import exact_influence
import randdata

V = randdata.VOCAB


class Block(nn.Module):
    def __init__(self, d=12):
        super().__init__(); self.ln = nn.LayerNorm(d); self.mlp = nn.Sequential(nn.Linear(d, 20), nn.GELU(), nn.Linear(20, d))
    def forward(self, x): return x + self.mlp(self.ln(x))


class Reusing(nn.Module):
    """A tiny causal LM whose first block runs three times: in a loop ('loop'), registered again further down
    ('registered': blocks a, b, a, a), or as tied copies holding its Linear weights and biases ('tied')."""
    def __init__(self, how, d=12, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.how, self.emb, self.head = how, nn.Embedding(V, d), nn.Linear(d, V)
        a, b = Block(d), Block(d)
        if how == 'loop': self.blocks = nn.ModuleList([a, b])
        elif how == 'registered': self.blocks = nn.ModuleList([a, b, a, a])
        else:
            copies = [Block(d), Block(d)]
            for c in copies:
                for i in (0, 2): c.mlp[i].weight, c.mlp[i].bias = a.mlp[i].weight, a.mlp[i].bias
            self.blocks = nn.ModuleList([a, b, *copies])
        self.double()
    def forward(self, input_ids, attention_mask=None, **kw):
        x = self.emb(input_ids)
        order = [0, 0, 0, 1] if self.how == 'loop' else [0, 1, 2, 3]
        for i in order: x = self.blocks[i](x)
        return SimpleNamespace(logits=self.head(x))


HOWS = ['loop', 'registered', 'tied']


def data():
    return randdata.rand_seqs(6, lo=5, hi=11, top=V), randdata.rand_queries(2, length=7, completion=3, top=V)


def autograd_dots(m, layers, queries, train):
    params = [p for layer in layers for _, p in layer.params()]
    return randdata.autograd_grads(m, params, queries) @ randdata.autograd_grads(m, params, train).T


@pytest.mark.parametrize('how', HOWS)
def test_layers_are_named_once_and_called_three_times(how):
    m = Reusing(how)
    names = [layer.name for layer in find_modules(m, 'mlp')]
    assert names == ['blocks.0.mlp.0', 'blocks.0.mlp.2', 'blocks.1.mlp.0', 'blocks.1.mlp.2']
    assert not [n for n in candidate_modules(m) if n.startswith(('blocks.2.', 'blocks.3.'))]   # the other names are aliases
    assert all(not c['missing'] for c in block_coverage(m, names).values())                # every block's MLP is covered
    if how == 'loop': assert layer_aliases(m) == {}
    else:
        assert {layer_aliases(m)[f'blocks.{k}.mlp.0'] for k in (2, 3)} == {'blocks.0.mlp.0'}
        assert [layer.name for layer in find_modules(m, ['blocks.3.mlp.2'])] == ['blocks.0.mlp.2']
        with pytest.raises(ValueError, match=r"is that layer: \{'blocks.2.mlp.0': 'blocks.0.mlp.0'\}"):
            find_modules(m, ['blocks.0.mlp.0', 'blocks.2.mlp.0'])
    train, _ = data()
    for idx, acts, outg in inf.kfac.layer_passes(m, find_modules(m, 'mlp'), train[:3], batch_size=3):
        T = max(len(train[i]['input_ids']) for i in idx)
        assert acts['blocks.0.mlp.0'].shape == (3, 3 * T, 13) and outg['blocks.0.mlp.2'].shape == (3, 3 * T, 12)
        assert acts['blocks.1.mlp.0'].shape == (3, T, 13)


@pytest.mark.parametrize('how', HOWS)
def test_identity_scores_are_autograd_over_every_call(how):
    "pairwise (total, per layer, per token), self and scan equal autograd's dot products; any batch size gives the same."
    m = Reusing(how)
    train, queries = data()
    layers = find_modules(m, 'mlp')
    want = autograd_dots(m, layers, queries, train)
    f = inf.fit_factors(m, train, 'identity', progress=False)
    for bs in (1, 4):
        s = inf.pairwise_scores(m, f, queries, train, per_layer=True, per_token=True, batch_size=bs, progress=False)
        torch.testing.assert_close(s.total.double(), want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sum(s.per_layer.values()), s.total, rtol=1e-10, atol=1e-12)
        assert s.per_token.shape == (2, 6, max(len(t['input_ids']) for t in train))   # the tokens as given, not 3 × them
        torch.testing.assert_close(s.per_token.sum(-1), s.total, rtol=1e-10, atol=1e-12)
    self_want = torch.diagonal(autograd_dots(m, layers, train, train))
    torch.testing.assert_close(inf.self_scores(m, f, train, batch_size=4, progress=False).double(), self_want, rtol=1e-10, atol=1e-12)
    r = inf.scan(m, f, queries, train, k=3, progress=False)
    assert torch.equal(r.indices, want.topk(3, dim=1).indices)


def test_per_token_scores_sum_each_tokens_calls():
    """Token t's term is the derivative of the training loss along the query gradient applied at position t only, in every
    call: nudging the layer's output at t by ε (Q āₜ) wherever the layer runs (brute force, through forward hooks)."""
    m = Reusing('loop')
    train, queries = data()
    layers = find_modules(m, ['blocks.0.mlp.0'])
    f = inf.fit_factors(m, train, 'identity', modules=['blocks.0.mlp.0'], progress=False)
    s = inf.pairwise_scores(m, f, queries[:1], train[:2], per_token=True, progress=False)
    lin = m.blocks[0].mlp[0]
    randdata.loss_backward(m, queries[0]); qw, qb = -lin.weight.grad.clone(), -lin.bias.grad.clone(); m.zero_grad()   # ∇ log p(query)
    for n, seq in enumerate(train[:2]):
        for t in range(len(seq['input_ids'])):
            eps = torch.zeros((), dtype=torch.float64, requires_grad=True)
            def nudge(mod, inp, out, t=t, eps=eps):
                bump = torch.zeros_like(out); bump[:, t] = inp[0][:, t] @ qw.T + qb
                return out + eps * bump
            h = lin.register_forward_hook(nudge)
            try:
                logits = m(input_ids=seq['input_ids'][None]).logits[0]
                logp = -torch.nn.functional.cross_entropy(logits[:-1], seq['labels'][1:], ignore_index=-100, reduction='sum')
                (d,) = torch.autograd.grad(logp, eps)
            finally: h.remove()
            torch.testing.assert_close(s.per_token[0, n, t].double(), d, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('how', HOWS)
def test_ekfac_covariances_and_eigenvalues_are_the_brute_force(how):
    """fisher='empirical' (no sampling): A is the mean of ā āᵀ over every call at every token, S the per-sequence mean of
    Σ ds dsᵀ over every call, and Λ the mean over sequences of (Q_Sᵀ G_n Q_A)² with G_n autograd's gradient of the weight."""
    m = Reusing(how)
    train, _ = data()
    f = inf.fit_factors(m, train, 'ekfac', fisher='empirical', batch_size=4, progress=False)
    lin = m.blocks[0].mlp[2]                                   # every module that runs it: the loop's one, or the copies
    runs = [mod for mod in m.modules() if isinstance(mod, nn.Linear) and mod.weight is lin.weight]
    A, S, n_tok, outs = 0, 0, 0, []
    def keep(mod, i, o): outs.append((i[0][0], o)); o.retain_grad()
    hooks = [r.register_forward_hook(keep) for r in runs]
    G = []
    try:
        for seq in train:
            outs.clear(); randdata.loss_backward(m, seq)
            assert len(outs) == 3                                   # three calls per forward
            for a, o in outs:
                abar = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
                A = A + abar.T @ abar; S = S + o.grad[0].T @ o.grad[0]; n_tok += len(a)
            G.append(torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1).clone())
    finally:
        for h in hooks: h.remove()
    A, S = A / n_tok, S / len(train)
    t = f.tensors['blocks.0.mlp.2']
    for k, want in (('A', A), ('S', S)):
        Q, lam = t['Q' + k].double(), t['l' + k].double()
        torch.testing.assert_close((Q * lam) @ Q.T, want, rtol=0, atol=1e-10 * float(want.abs().max()))
    QA, QS = t['QA'].double(), t['QS'].double()
    lam_want = sum((QS.T @ g @ QA) ** 2 for g in G) / len(G)
    torch.testing.assert_close(t['Lambda'].double(), lam_want, rtol=0, atol=1e-10 * float(lam_want.abs().max()))


@pytest.mark.parametrize('how', ['registered', 'tied'])
def test_cg_is_exact_influence_over_every_call(how):
    "A converged CG solve (GGN-vector products through torch.func) equals exact influence with the dense GGN."
    m = Reusing(how)
    train, queries = data()
    lam = 0.05
    exact = exact_influence(m, randdata.param_names(m, 'mlp'), queries, train, lam)
    # torch's functional_call (tie_weights=True) left a module registered twice holding plain tensors: `call_functional` does not
    assert (m.blocks[2] is m.blocks[0]) == (how == 'registered') and m.blocks[3].mlp[0].weight is m.blocks[0].mlp[0].weight
    assert all(type(p) is nn.Parameter for mod in m.modules() for p in mod._parameters.values())
    f = inf.fit_factors(m, train, 'cg', solver=dict(tol=1e-11, max_iter=500), progress=False)
    s = inf.pairwise_scores(m, f, queries, train, damping=lam, progress=False)
    torch.testing.assert_close(s.total.double(), exact, rtol=0, atol=1e-7 * float(exact.abs().max()))


def zamba2():
    from transformers import Zamba2Config, AutoModelForCausalLM
    cfg = Zamba2Config(vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                       mamba_d_state=8, mamba_headdim=8, n_mamba_heads=8, mamba_expand=2, intermediate_size=48,
                       layers_block_type=['mamba', 'hybrid', 'mamba', 'hybrid'], num_mem_blocks=1, use_mem_rope=False,
                       use_shared_attention_adapter=False, use_shared_mlp_adapter=True, adapter_rank=4, pad_token_id=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation='eager').eval().double()


def test_zamba2_shared_block_is_scored_as_autograd():
    """Zamba2 holds one copy of its shared transformer block per hybrid layer, the copies' weights tied to the first:
    tracked once (under layers.1), every hybrid layer's call counted."""
    m = zamba2()
    shared = 'model.layers.1.shared_transformer.feed_forward'
    assert layer_aliases(m)['model.layers.3.shared_transformer.feed_forward.down_proj'] == f'{shared}.down_proj'
    names = [layer.name for layer in find_modules(m, 'mlp')]
    assert names[:2] == [f'{shared}.gate_up_proj', f'{shared}.down_proj'] and not [n for n in names if '.layers.3.' in n]
    train, queries = randdata.rand_seqs(3, top=V), randdata.rand_queries(2, top=V)
    for modules in ('mlp', 'all'):
        layers = find_modules(m, modules, warn=False)
        f = inf.fit_factors(m, train, 'identity', modules=modules, progress=False)
        got = inf.pairwise_scores(m, f, queries, train, batch_size=1, progress=False).total.double()   # (Zamba2 computes
        want = autograd_dots(m, layers, queries, train)                                              # in float32 inside:
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))     # batches would round apart)


def test_what_stays_refused():
    "An expert called twice in one pass or tied to another experts module, and a tracked layer that sees only some of the\n    tokens or sees them sequence-first, are refused by name (the tied experts were scored 0.3 off autograd before)."
    moe = inf.tiny_model('mixtral', layers=2); moe.model.layers[1].mlp = moe.model.layers[0].mlp   # an MoE block reused
    train, queries = randdata.rand_seqs(3, top=V), randdata.rand_queries(1, top=V)
    f = inf.fit_factors(moe, train, 'identity', progress=False)
    with pytest.raises(ValueError, match=r"Expert 'model.layers.0.mlp.experts.gate_up_proj\[\d\]' was called more than once"):
        inf.pairwise_scores(moe, f, queries, train, progress=False)

    tied = inf.tiny_model('mixtral', layers=2); e0, e1 = (tied.model.layers[i].mlp.experts for i in (0, 1))
    e1.gate_up_proj, e1.down_proj = e0.gate_up_proj, e0.down_proj                # two experts modules, one set of weights
    with pytest.raises(ValueError, match=r"Layer 'model.layers.0.mlp.experts.gate_up_proj\[0\]' shares its gate_up_proj with "
                                         r"\['model.layers.1.mlp.experts.gate_up_proj'\]"):
        inf.find_modules(tied, 'mlp')

    class LastToken(Reusing):   # a Linear on the last position only, added back to every position
        def __init__(self): super().__init__('loop'); self.pool = nn.Linear(12, 12).double()
        def forward(self, input_ids, attention_mask=None, **kw):
            x = self.emb(input_ids); x = x + self.pool(x[:, -1:])
            return SimpleNamespace(logits=self.head(self.blocks[1](x)))
    lt = LastToken()
    f = inf.fit_factors(lt, train, 'identity', modules=['pool'], progress=False)
    with pytest.raises(ValueError, match=r"Layer 'pool' had an input of shape \(\d, 1, 12\) in a batch of \d sequences × \d+ tokens"):
        inf.pairwise_scores(lt, f, queries, train, progress=False)

    class SeqFirst(Reusing):   # a hand-made block run on [tokens, batch, d]: rows of several sequences would mix
        def __init__(self): super().__init__('loop')
        def forward(self, input_ids, attention_mask=None, **kw):
            x = self.blocks[0](self.emb(input_ids).transpose(0, 1)).transpose(0, 1)
            return SimpleNamespace(logits=self.head(x))
    sf = SeqFirst()
    f = inf.fit_factors(sf, train, 'identity', modules=['blocks.0.mlp.0'], progress=False)
    with pytest.raises(ValueError, match=r"Layer 'blocks.0.mlp.0' had an input of shape \(\d+, 3, 12\) in a batch of 3 sequences"):
        inf.pairwise_scores(sf, f, train, train, batch_size=3, progress=False)


def test_exact_fisher_sums_every_labelling_over_every_call():
    """fisher='exact' (32 outputs, one scored token): S and Λ of the looped layer equal the probability-weighted sum over
    all 32 labels of autograd's output gradients (every call) and weight gradients."""
    m = Reusing('loop')
    seqs = [{'input_ids': torch.tensor(ids), 'labels': torch.tensor([-100, -100, -100, ids[-1]])} for ids in ([3, 7, 11, 5], [9, 2, 30, 4])]
    f = inf.fit_factors(m, seqs, 'ekfac', fisher='exact', factor_dtype='float64', progress=False)
    lin, outs = m.blocks[0].mlp[0], []
    with torch.no_grad(): P = [m(input_ids=s['input_ids'][None]).logits[0, 2].softmax(-1) for s in seqs]   # p(label)
    def keep(mod, i, o): outs.append(o); o.retain_grad()
    h = lin.register_forward_hook(keep)
    S = Lam = 0
    t = f.tensors['blocks.0.mlp.0']
    QS, QA = t['QS'].double(), t['QA'].double()
    try:
        for s, p in zip(seqs, P):
            for y in range(V):
                outs.clear(); lab = s['labels'].clone(); lab[-1] = y
                randdata.loss_backward(m, {'input_ids': s['input_ids'], 'labels': lab})
                assert len(outs) == 3
                S = S + p[y] * sum(o.grad[0].T @ o.grad[0] for o in outs)
                g = torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1)
                Lam = Lam + p[y] * (QS.T @ g @ QA) ** 2
    finally: h.remove()
    S, Lam = S / len(seqs), Lam / len(seqs)
    torch.testing.assert_close((QS * t['lS'].double()) @ QS.T, S, rtol=0, atol=1e-10 * float(S.abs().max()))
    torch.testing.assert_close(t['Lambda'].double(), Lam, rtol=0, atol=1e-10 * float(Lam.abs().max()))


def test_gemma3n_all_layers_with_the_router_called_twice():
    "Gemma 3n runs `altup.modality_router` twice per block (predict and correct): `'all'` was refused; it equals autograd."
    m = randdata.tiny_gemma3n().double()
    train, queries = randdata.rand_seqs(3, top=V), randdata.rand_queries(2, top=V)
    layers = find_modules(m, 'all', warn=False)
    router = [l.name for l in layers if l.name.endswith('altup.modality_router')]
    assert len(router) == 2
    for idx, acts, outg in inf.kfac.layer_passes(m, layers, train[:1], batch_size=1):
        assert acts[router[0]].shape[1] == 2 * len(train[0]['input_ids'])          # two calls side by side
    f = inf.fit_factors(m, train, 'identity', modules='all', progress=False)
    got = inf.pairwise_scores(m, f, queries, train, batch_size=1, progress=False).total.double()
    torch.testing.assert_close(got, autograd_dots(m, layers, queries, train), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('how', HOWS)
def test_factors_record_each_layers_calls_and_warn_when_code_changes(how):
    """Session 24: factors fitted while block 0 ran three times per forward record it (`info['calls']`), scoring the same
    model says nothing, and scoring after the code changed to run it twice (same weights, same config: the digest cannot
    see it; the reviewer of session 23 measured scores 0.83 off) warns naming the layer, once per call."""
    import warnings
    m = Reusing(how)
    train, queries = data()
    f = inf.fit_factors(m, train, 'ekfac', fisher='empirical', batch_size=4, progress=False)
    assert f.info['calls'] == {'blocks.0.mlp.0': [3], 'blocks.0.mlp.2': [3], 'blocks.1.mlp.0': [1], 'blocks.1.mlp.2': [1]}
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        inf.pairwise_scores(m, f, queries, train, progress=False); inf.self_scores(m, f, train, progress=False)
    def forward(input_ids, attention_mask=None, **kw):                # block 0's last call (or its last copy) dropped
        x = m.emb(input_ids)
        for i in ([0, 0, 1] if how == 'loop' else [0, 1, 2]): x = m.blocks[i](x)
        return SimpleNamespace(logits=m.head(x))
    m.forward = forward
    with pytest.warns(UserWarning, match=r"Layer 'blocks.0.mlp.0' ran 2 times in a forward pass here, and 3 in every") as w:
        inf.pairwise_scores(m, f, queries, train, progress=False)
    assert sum('ran 2 times' in str(x.message) for x in w) == 1
