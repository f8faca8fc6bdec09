"""A stranger's checks of layers whose weights run more than once per forward pass (session 23).

Every score is compared with a reference that does not go through influence_nb's hooks: autograd's per-sequence gradients
of the summed loss over the tracked Parameters (identity), a dense damped Gauss-Newton matrix built by autograd (exact, CG,
PCG, LiSSA, PBRF), or squared autograd gradients (diagonal). The first tests are findings: they assert the correct
behaviour and fail on the code as the stranger found it.
"""
import json
from types import SimpleNamespace
import pytest, torch
from torch import nn
import influence_nb as inf
from influence_nb.modules import find_modules, layer_param_names
import randdata

V = randdata.VOCAB


from test_reused_layers import Block   # LayerNorm and a two-layer MLP, residual


class Base(nn.Module):
    "Embedding, two blocks, a head; subclasses decide how often (and on what) block 0 runs."
    def __init__(self, d=12, seed=0):
        super().__init__(); torch.manual_seed(seed)
        self.emb, self.head = nn.Embedding(V, d), nn.Linear(d, V)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
    def out(self, x): return SimpleNamespace(logits=self.head(x))


class Loop(Base):
    def forward(self, input_ids, attention_mask=None, **kw):
        x = self.emb(input_ids)
        for i in (0, 0, 0, 1): x = self.blocks[i](x)
        return self.out(x)


class Registered(Base):
    "blocks a, b, a: block 0 registered again as block 2."
    def __init__(self, **k):
        super().__init__(**k); a, b = self.blocks; self.blocks = nn.ModuleList([a, b, a])
    def forward(self, input_ids, attention_mask=None, **kw):
        x = self.emb(input_ids)
        for b in self.blocks: x = b(x)
        return self.out(x)


class Tied(Registered):
    "blocks a, b, c where c's Linears hold a's very weight and bias Parameters (Zamba2-style tied copies)."
    def __init__(self, **k):
        super().__init__(**k); a, b, _ = self.blocks; c = Block(12)
        for i in (0, 2): c.mlp[i].weight, c.mlp[i].bias = a.mlp[i].weight, a.mlp[i].bias
        self.blocks = nn.ModuleList([a, b, c])


class Halting(Base):
    "Adaptive depth: sequence i runs block 0 (1 + its first id % 3) times; a halted sequence keeps its state."
    def forward(self, input_ids, attention_mask=None, **kw):
        x, n = self.emb(input_ids), 1 + input_ids[:, 0] % 3
        for it in range(int(n.max())): x = torch.where((it < n)[:, None, None], self.blocks[0](x), x)
        return self.out(self.blocks[1](x))


class Checkpointed(Base):
    def forward(self, input_ids, attention_mask=None, **kw):
        x = self.emb(input_ids)
        for i in (0, 0, 1): x = torch.utils.checkpoint.checkpoint(self.blocks[i], x, use_reentrant=False)
        return self.out(x)


class InPlace(Base):
    "A looped layer whose output the model scales in place (`h.mul_(2)`) at every call."
    def forward(self, input_ids, attention_mask=None, **kw):
        x = self.emb(input_ids)
        for i in (0, 0, 1):
            b = self.blocks[i]; h = b.mlp[0](b.ln(x)); h.mul_(2.0); x = x + b.mlp[2](nn.functional.gelu(h))
        return self.out(x)


def data(n=6):
    return randdata.rand_seqs(n, lo=5, hi=11, top=V), randdata.rand_queries(2, length=7, completion=3, top=V)


def tracked(m, layers):
    return [p for layer in layers for _, p in layer.params()]


def autograd_dots(m, params, queries, train):
    return randdata.autograd_grads(m, params, queries) @ randdata.autograd_grads(m, params, train).T


def rel(a, b): return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def identity_scores(m, modules, queries, train, batch_size, **kw):
    f = inf.fit_factors(m, train, 'identity', modules=modules, progress=False)
    return inf.pairwise_scores(m, f, queries, train, batch_size=batch_size, progress=False, **kw)


# ----------------------------------------------------------------------------------------------------------------- findings

class BatchTwice(Base):
    "Block 0 runs once, on a batch holding two views of every sequence ([2B, T, d]: contrastive views, CFG-style doubling)."
    def forward(self, input_ids, attention_mask=None, **kw):
        x = self.emb(input_ids); B = x.shape[0]
        y = self.blocks[0](torch.cat([x, 2 * x], 0))
        return self.out(self.blocks[1](y[:B] + y[B:]))


class TokensTwice(Base):
    "Block 0 runs once, on every token repeated twice ([B, 2T, d]: an upsampling stage), pooled back afterwards."
    def forward(self, input_ids, attention_mask=None, **kw):
        x = self.emb(input_ids); B, T, d = x.shape
        up = self.blocks[0](x.repeat_interleave(2, dim=1))
        return self.out(self.blocks[1](up.view(B, T, 2, d).mean(2)))


@pytest.mark.parametrize('cls', [BatchTwice, TokensTwice])
def test_a_layer_seeing_a_multiple_of_the_batchs_tokens_is_scored_right_or_refused(cls):
    """A tracked layer whose input holds 2× the batch's token rows ([2B, T, d] or [B, 2T, d]). As found, `_token_rows` (04_kfac)
    accepts any tensor whose size is a multiple of B·T·d (it reads the multiple as fisher='exact''s J labellings) and
    `_call_acts` keeps the first B·T rows only: identity scores are 75 % (BatchTwice) and 99–108 % (TokensTwice) off autograd,
    without a word (before session 23 both crashed with a torch shape error). Now: a ValueError naming the layer and its
    shape (the inputs' leading shape must be [batch, tokens] or [batch·tokens])."""
    m = cls().double()
    train, queries = data()
    mods = ['blocks.0.mlp.0', 'blocks.0.mlp.2']
    for bs in (1, 3):
        with pytest.raises(ValueError, match=r"Layer 'blocks.0.mlp.0' had an input of shape \(\d+, \d+, 12\) in a batch of \d sequences"):
            identity_scores(m, mods, queries, train, batch_size=bs)


class SeqFirst(nn.Module):
    "A causal LM from torch's own `nn.TransformerEncoderLayer` (default `batch_first=False`: its Linears see [T, B, d])."
    def __init__(self, d=16):
        super().__init__(); torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(V, d), nn.Linear(d, V)
        self.layers = nn.ModuleList([nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0) for _ in range(2)])
    def forward(self, input_ids, attention_mask=None, **kw):
        x = self.emb(input_ids).transpose(0, 1)
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[0], dtype=x.dtype)
        for layer in (self.layers[0], self.layers[0], self.layers[1]): x = layer(x, src_mask=causal, is_causal=True)
        return SimpleNamespace(logits=self.head(x.transpose(0, 1)))


def test_sequence_first_layers_are_scored_right_or_refused():
    """torch's `nn.TransformerEncoderLayer` runs its feed-forward Linears on [T, B, d]. `layer_passes` reshapes every input to
    [B, T, d], so with more than one sequence per batch each 'sequence' mixes the tokens of several: identity scores are
    152 % off autograd at batch_size=3 (138 % with the layer looped), exact at batch_size=1 (pre-existing: the code before
    session 23 gave the same for a model without a loop). Now refused by `find_modules`, which finds the layers inside a
    module built with batch_first=False; a hand-made sequence-first model is refused by the shape check (below)."""
    m = SeqFirst().double().eval()
    train, queries = data()
    mods = ['layers.0.linear1', 'layers.0.linear2', 'layers.1.linear1', 'layers.1.linear2']
    for bs in (1, 3):
        with pytest.raises(ValueError, match=r"Layer 'layers.0.linear1' lies in 'layers.0', a TransformerEncoderLayer built with batch_first=False"):
            identity_scores(m, mods, queries, train, batch_size=bs)


class Side(Base):
    "`fc` runs twice; `side` reads the same tensor as fc's first call only."
    def __init__(self):
        super().__init__(); self.fc, self.side = nn.Linear(12, 12), nn.Linear(12, 12)
    def forward(self, input_ids, attention_mask=None, **kw):
        x = self.emb(input_ids)
        x = x + torch.tanh(self.fc(x)) + torch.tanh(self.side(x))
        return self.out(x + torch.tanh(self.fc(x)))


def test_factor_sizes_count_what_the_fit_stores_for_a_layer_called_twice():
    """`factor_sizes` (and `fit-factors --dry-run`) find layers that share an input from the first call only
    (`memory.shared_inputs`), while the fit shares an activation covariance only when every call's input is the same
    (`layer_passes`' key). Here `side` reads fc's first input but not its second: as found, the dry run said 10104 bytes with
    `side` 'input_of' fc, and the fit stored 12912 (on a Zamba2: 578048 said, 594688 stored, its first MLP adapter).
    Correct: the figure is the bytes of the distinct tensors the fit keeps."""
    from influence_nb.memory import factor_sizes
    m, (train, _) = Side().double(), data(4)
    f = inf.fit_factors(m, train, 'ekfac', modules=['fc', 'side'], progress=False)
    stored = {t.data_ptr(): t.numel() * t.element_size() for n in f.tensors for t in f.tensors[n].values()}
    assert factor_sizes(m, ['fc', 'side']).attrs['total'] == sum(stored.values())


def test_factor_sizes_on_the_meta_device_take_a_layers_second_name():
    """`find_modules` takes a layer registered twice by its second name ('blocks.2.mlp.0' is 'blocks.0.mlp.0'), but the
    meta-device path of `factor_sizes` (`memory._layers`, a model built without weights for a dry run) refused it:
    "Unknown or untrackable `modules` ['blocks.2.mlp.0', 'blocks.2.mlp.2']". Correct: the same figure as for the real model."""
    from influence_nb.memory import factor_sizes
    names = ['blocks.2.mlp.0', 'blocks.2.mlp.2', 'blocks.1.mlp.0', 'blocks.1.mlp.2']
    real = factor_sizes(Registered(), names).attrs['total']
    with torch.device('meta'): meta = Registered()
    assert factor_sizes(meta, names).attrs['total'] == real


# ------------------------------------------------------------------------------------------------------------ what held

@pytest.mark.parametrize('cls', [Halting, Checkpointed, InPlace])
def test_edge_loops_equal_autograd_at_any_batch_size(cls):
    """Adaptive depth (each sequence its own number of calls, the batch's maximum run), non-reentrant checkpointing in a loop,
    and an output scaled in place at every call: identity totals equal autograd (measured ≤ 8e-16), per-token scores sum to
    the totals and do not depend on the batch size."""
    m = cls().double()
    train, queries = data()
    want = autograd_dots(m, tracked(m, find_modules(m, 'mlp')), queries, train)
    toks = []
    for bs in (1, 4):
        s = identity_scores(m, 'mlp', queries, train, batch_size=bs, per_token=True)
        torch.testing.assert_close(s.total.double(), want, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(s.per_token.sum(-1), s.total, rtol=1e-9, atol=1e-12)
        toks.append(s.per_token)
    torch.testing.assert_close(toks[0], toks[1], rtol=1e-9, atol=1e-12)


def _flatgrad(out, params, **kw):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(out, params, **kw)])


def dense_ggn(m, params, seqs):
    "Mean over `seqs` of Σ_tokens Jᵀ (diag p − p pᵀ) J: the true GGN of the summed loss, by autograd over the real Parameters."
    P = sum(p.numel() for p in params)
    G = torch.zeros(P, P, dtype=torch.float64)
    for s in seqs:
        logits = m(input_ids=s['input_ids'][None]).logits[0]
        for t, y in enumerate(s['labels'][1:]):
            if y < 0: continue
            p = logits[t].softmax(-1).detach()
            J = torch.stack([_flatgrad(logits[t, v], params, retain_graph=True) for v in range(len(p))])
            G += J.T @ (torch.diag(p) - torch.outer(p, p)) @ J
    return G / len(seqs)


def _state(m):
    return ([(n, type(p), p.requires_grad, id(p)) for n, p in m.named_parameters(remove_duplicate=False)],
            [x.training for x in m.modules()], [(len(x._forward_hooks), len(x._forward_pre_hooks)) for x in m.modules()])


@pytest.mark.parametrize('cls', [Registered, Tied])
def test_exact_solvers_and_pbrf_equal_a_dense_ggn_and_leave_the_model_as_found(cls):
    """exact_influence, gnvp, CG, PCG and LiSSA on a block registered twice and on tied copies equal (G + λI)⁻¹ with G the
    dense GGN built here by autograd (measured: exact 1.3e-15, gnvp ≤ 2.5e-15, CG/PCG 4.4e-12; LiSSA 1.2e-3 at depth 300 and
    1.6e-15 at depth 3000, too slow for a test); PBRF influence equals it to 5e-8. Parameters stay `nn.Parameter`s, still tied, with their flags, modes and no hooks left."""
    from influence_nb.theory import exact_influence
    from influence_nb.pbrf import gnvp, pbrf_influence
    m = cls().double(); m.blocks[1].train(); m.emb.weight.requires_grad_(False)
    before = _state(m)
    train, queries = data(5); lam = 0.05
    layers = find_modules(m, 'mlp'); params, names = tracked(m, layers), layer_param_names(layers)
    G = dense_ggn(m, params, train)
    gq, gt = randdata.autograd_grads(m, params, queries), randdata.autograd_grads(m, params, train)
    want = gq @ torch.linalg.solve(G + lam * torch.eye(len(G), dtype=G.dtype), gt.T)
    assert rel(exact_influence(m, names, queries, train, lam), want) < 1e-12
    v = torch.randn(2, len(G), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert rel(gnvp(m, names, train, v, batch_size=3), v @ G) < 1e-12
    solvers = [('cg', dict(tol=1e-11, max_iter=500), 1e-9), ('pcg', dict(tol=1e-11, max_iter=200), 1e-9)]
    for strategy, opt, tol in solvers + ([('lissa', dict(depth=300), 5e-3)] if cls is Tied else []):
        f = inf.fit_factors(m, train, strategy, solver=opt, batch_size=3, progress=False)
        assert rel(inf.pairwise_scores(m, f, queries, train, damping=lam, progress=False).total, want) < tol, strategy
    res = pbrf_influence(m, names, train, train[1], queries, lam)
    assert res.converged and rel(res.influence.reshape(-1), want[:, 1]) < 1e-6
    assert _state(m) == before and m.blocks[2].mlp[0].weight is m.blocks[0].mlp[0].weight


@pytest.mark.parametrize('cls', [Loop, Registered, Tied])
def test_diagonal_fisher_names_and_saved_factors(cls):
    """diagonal (empirical Fisher) = the mean of autograd's squared per-sequence gradients (2–3e-16); a layer named by its
    second name (a tied copy's, a re-registered block's) is the first; saved factors give the same scores bit for bit and
    `Factors.check` passes; `factor_sizes` counts the shared layer once (4 layers, as the loop)."""
    from influence_nb.memory import factor_sizes
    m = cls().double()
    train, queries = data()
    layers = find_modules(m, 'mlp')
    f = inf.fit_factors(m, train, 'diagonal', fisher='empirical', progress=False)
    got = torch.cat([torch.cat([f.tensors[l.name]['diag'][:, :-1].reshape(-1), f.tensors[l.name]['diag'][:, -1]]) for l in layers])
    assert rel(got, (randdata.autograd_grads(m, tracked(m, layers), train) ** 2).mean(0)) < 1e-12
    sizes = factor_sizes(m, 'mlp')
    assert list(sizes.index) == ['blocks.0.mlp.0', 'blocks.0.mlp.2', 'blocks.1.mlp.0', 'blocks.1.mlp.2']
    if cls is not Loop:
        assert [l.name for l in find_modules(m, ['blocks.2.mlp.0', 'blocks.2.mlp.2', 'blocks.1.mlp.0', 'blocks.1.mlp.2'])] == list(sizes.index)
    f = inf.fit_factors(m, train, 'ekfac', progress=False)
    f.save(d := __import__('tempfile').mkdtemp()); g = inf.Factors.load(d)
    assert g.modules == list(sizes.index) and g.check(m)
    a = inf.pairwise_scores(m, f, queries, train, progress=False).total
    assert torch.equal(a, inf.pairwise_scores(m, g, queries, train, progress=False).total)
    assert torch.allclose(inf.self_scores(m, f, train, batch_size=5, progress=False),
                          torch.diagonal(inf.pairwise_scores(m, f, train, train, batch_size=3, progress=False).total), rtol=1e-10)
    full = max(l.d_out for l in layers)                       # a query rank at least every layer's: the full-rank scores
    torch.testing.assert_close(inf.pairwise_scores(m, f, queries, train, query_rank=full, progress=False).total, a, rtol=1e-8, atol=1e-10)


def test_lora_on_a_looped_block_equals_autograd():
    "peft LoRA on the Linears of a block run three times: modules='lora' identity scores equal autograd over A and B (6e-16)."
    peft = pytest.importorskip('peft')
    m = peft.get_peft_model(Loop().double(), peft.LoraConfig(r=2, target_modules=['mlp.0', 'mlp.2'], lora_alpha=4, init_lora_weights=False))
    train, queries = data()
    want = autograd_dots(m, tracked(m, find_modules(m, 'lora')), queries, train)
    torch.testing.assert_close(identity_scores(m, 'lora', queries, train, batch_size=3).total.double(), want, rtol=1e-9, atol=1e-12)


def test_exact_fisher_of_moe_experts_is_the_brute_force():
    """fisher='exact' for MoE experts (new this session): each expert's Λ is the probability-weighted sum over all 32 labels
    of (Q_Sᵀ G Q_A)² with G autograd's gradient of that expert's slice (measured 1.0e-15)."""
    from influence_nb.pbrf import keep_precision
    m = inf.tiny_model('mixtral', layers=1).double().eval()
    seqs = [{'input_ids': torch.tensor(ids), 'labels': torch.tensor([-100, -100, -100, ids[-1]])} for ids in ([3, 7, 11, 5], [9, 2, 30, 4])]
    with keep_precision(m):
        layers = [l for l in find_modules(m, 'mlp') if l.expert is not None][:4]
        f = inf.fit_factors(m, seqs, 'ekfac', modules=[l.name for l in layers], fisher='exact', factor_dtype='float64', progress=False)
        with torch.no_grad(): P = [m(input_ids=s['input_ids'][None]).logits[0, 2].softmax(-1) for s in seqs]
        G = {l.name: [] for l in layers}
        for s, p in zip(seqs, P):
            for y in range(V):
                lab = s['labels'].clone(); lab[-1] = y
                randdata.loss_backward(m, {'input_ids': s['input_ids'], 'labels': lab})
                for l in layers: G[l.name].append((p[y], l.canonical_grad().clone()))
    for l in layers:
        t = f.tensors[l.name]; QS, QA = t['QS'].double(), t['QA'].double()
        lam = sum(w * (QS.T @ g @ QA) ** 2 for w, g in G[l.name]) / len(seqs)
        torch.testing.assert_close(t['Lambda'].double(), lam, rtol=0, atol=1e-10 * float(lam.abs().max()) + 1e-300)


LOOP_FILE = '''
import torch
from torch import nn
class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__(); self.ln = nn.LayerNorm(d); self.fc1 = nn.Linear(d, 24); self.fc2 = nn.Linear(24, d)
    def forward(self, x): return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(x))))
class LoopLM(nn.Module):
    def __init__(self, vocab):
        super().__init__(); torch.manual_seed(0)
        self.wte = nn.Embedding(vocab, 16); self.blocks = nn.ModuleList([Block(), Block()]); self.lm_head = nn.Linear(16, vocab, bias=False)
    def forward(self, input_ids, attention_mask=None, **kw):
        x = self.wte(input_ids)
        for i in (0, 0, 0, 1): x = self.blocks[i](x)
        return self.lm_head(x)
def build():
    import influence_nb as inf
    return LoopLM(2048).double().eval()
'''


def test_cli_scores_a_config_less_looped_model_as_autograd(tmp_path, monkeypatch):
    """`fit-factors` / `score --model loop.py:build` on a model without a config whose block 0 runs three times: the Parquet
    scores equal autograd (measured 1.2e-15), and `explore --no-serve` ranks as autograd does."""
    import pandas as pd
    from influence_nb.cli import main
    from influence_nb.data import data_dir
    (tmp_path/'loop.py').write_text(LOOP_FILE)
    texts = ['The capital of Zorvia is Pellin.', 'Boats sail on the river.', 'A potter sells jars.', 'Pellin is old.']
    (tmp_path/'c.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts))
    (tmp_path/'q.jsonl').write_text(json.dumps({'id': 'q', 'prompt': 'The capital of Zorvia is', 'completion': ' Pellin'}) + '\n')
    monkeypatch.chdir(tmp_path)
    common = ['--model', 'loop.py:build', '--tokenizer', str(data_dir()/'tokenizer')]
    assert main(['fit-factors', *common, '--data', 'c.jsonl', '--out', 'f', '--strategy', 'identity', '--modules', 'mlp']) == 0
    assert main(['score', *common, '--factors', 'f', '--queries', 'q.jsonl', '--data', 'c.jsonl', '--out', 's.parquet']) == 0
    ns = {}; exec(LOOP_FILE, ns); m = ns['build']()
    tok = inf.load_tokenizer(data_dir()/'tokenizer')
    train, queries = inf.tokenize(tok, texts), inf.tokenize_pairs(tok, [('The capital of Zorvia is', ' Pellin')])
    params = tracked(m, find_modules(m, 'mlp'))
    def grads(seqs):
        out = []
        for s in seqs:
            m.zero_grad(); logits = m(input_ids=s['input_ids'][None])[0]
            nn.functional.cross_entropy(logits[:-1], s['labels'][1:], ignore_index=-100, reduction='sum').backward()
            out.append(torch.cat([p.grad.reshape(-1) for p in params]))
        return torch.stack(out)
    want = (grads(queries) @ grads(train).T)[0]
    got = torch.tensor(pd.read_parquet('s.parquet')['q'].to_numpy())
    assert rel(got, want) < 1e-9
