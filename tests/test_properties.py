"""Never silently wrong (issue 9, rows P1–P3 of tests/README.md): property tests with hypothesis.

Scores do not depend on batch size, padding or data order; a scan interrupted anywhere and resumed equals the
uninterrupted scan bit for bit; and no public call — finishing or failing midway — changes the model's parameters,
gradients, hooks, `requires_grad` flags or any module's train/eval mode."""
import functools, tempfile
from pathlib import Path
import pytest, torch
from hypothesis import given, settings, HealthCheck, strategies as st
import influence_nb as inf
from influence_nb.pbrf import keep_precision
from influence_nb.search import scan, read_scores

from randdata import VOCAB, rand_queries, rand_seqs as _rand_seqs

torch.set_num_threads(1)
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rand_seqs(n, lo=3, hi=12, seed=0): return _rand_seqs(n, lo, hi, seed)   # sequences from 3 tokens up


@functools.lru_cache(None)
def setup():
    "float64 model so that reordering sums moves scores by ~1e-15 relative, far below the 1e-9 asserted."
    m = inf.tiny_model('gpt2', layers=1).double()
    train, queries = rand_seqs(10), rand_queries(2)
    f = inf.fit_factors(m, train, 'ekfac', batch_size=4, progress=False)
    ref = inf.pairwise_scores(m, f, queries, train, per_layer=True, per_token=True, batch_size=1, progress=False)
    return m, f, train, queries, ref


@settings(max_examples=8, **SETTINGS)
@given(perm=st.permutations(range(10)), bs=st.integers(1, 10),
       pads=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=10, max_size=10))
def test_P1_scores_invariant_to_batch_order_padding(perm, bs, pads):
    m, f, train, queries, ref = setup()
    data = []
    for j, i in enumerate(perm):
        ids = train[i]['input_ids'].tolist(); lft, rgt = pads[j]
        data.append({'input_ids': [0] * lft + ids + [7] * rgt, 'attention_mask': [0] * lft + [1] * len(ids) + [0] * rgt})
    got = inf.pairwise_scores(m, f, queries, data, per_layer=True, per_token=True, batch_size=bs, progress=False)
    tol = 1e-9 * float(ref.total.abs().max())
    assert torch.allclose(got.total, ref.total[:, list(perm)], rtol=0, atol=tol)
    for n in ref.per_layer: assert torch.allclose(got.per_layer[n], ref.per_layer[n][:, list(perm)], rtol=0, atol=tol)
    assert got.per_token.shape[-1] == max(len(d['input_ids']) for d in data)           # as wide as the sequences given
    for j, i in enumerate(perm):   # each token's term where the token was given (S2), zeros on the padding
        lft, L = pads[j][0], len(train[i]['input_ids'])
        assert torch.allclose(got.per_token[:, j, lft:lft + L], ref.per_token[:, i, :L], rtol=0, atol=tol)
        assert float(got.per_token[:, j, :lft].abs().sum() + got.per_token[:, j, lft + L:].abs().sum()) == 0.
    self_ = inf.self_scores(m, f, data, batch_size=bs, progress=False)
    assert torch.allclose(self_, inf.self_scores(m, f, train, batch_size=1, progress=False)[list(perm)], rtol=0, atol=tol)


class Flaky:
    "An indexable corpus that fails (like a kill or a network error) when record `stop` is read."
    def __init__(self, seqs, stop): self.seqs, self.stop = seqs, stop
    def __len__(self): return len(self.seqs)
    def __getitem__(self, i):
        if i == self.stop: raise KeyboardInterrupt(f'interrupted at {i}')
        return self.seqs[i]


@settings(max_examples=6, **SETTINGS)
@given(stop=st.integers(1, 19), chunk=st.integers(1, 6), every=st.integers(1, 8), bs=st.integers(1, 4),
       rank=st.sampled_from([None, 2]))
def test_P2_scan_resumed_in_pieces_is_identical(stop, chunk, every, bs, rank):
    m, f, _, queries, _ = setup()
    corpus = rand_seqs(20, seed=3)
    kw = dict(k=5, chunk_size=chunk, batch_size=bs, checkpoint_every=every, query_rank=rank, progress=False)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        clean = scan(m, f, queries, corpus, scores_path=d/'clean', **kw)
        with pytest.raises(KeyboardInterrupt):
            scan(m, f, queries, Flaky(corpus, stop), checkpoint=d/'c.ckpt', scores_path=d/'s', **kw)
        with pytest.raises(KeyboardInterrupt):          # a second interruption, later on
            scan(m, f, queries, Flaky(corpus, min(stop + chunk + every, 19)), checkpoint=d/'c.ckpt', scores_path=d/'s', **kw)
        r = scan(m, f, queries, corpus, checkpoint=d/'c.ckpt', scores_path=d/'s', **kw)
        assert torch.equal(r.indices, clean.indices) and torch.equal(r.scores, clean.scores) and r.n_scanned == 20
        assert read_scores(d/'s').equals(read_scores(d/'clean'))


def snapshot(m):
    return ({k: v.clone() for k, v in m.state_dict().items()}, [x.training for x in m.modules()],
            [p.requires_grad for p in m.parameters()])


def unchanged(m, snap):
    sd, modes, flags = snap
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items()), 'parameters changed'
    assert [x.training for x in m.modules()] == modes, 'a module changed train/eval mode'
    assert [p.requires_grad for p in m.parameters()] == flags, 'requires_grad changed'
    assert all(p.grad is None for p in m.parameters()), 'a .grad was left behind'
    assert sum(len(x._forward_hooks) + len(x._backward_hooks) for x in m.modules()) == 0, 'a hook was left behind'


CALLS = {
    'fit_factors': lambda m, f, tr, q: inf.fit_factors(m, tr, 'ekfac', batch_size=3, progress=False),
    'fit_factors(diagonal)': lambda m, f, tr, q: inf.fit_factors(m, tr, 'diagonal', progress=False),
    'pairwise_scores': lambda m, f, tr, q: inf.pairwise_scores(m, f, q, tr, per_layer=True, per_token=True, progress=False),
    'pairwise_scores(rank)': lambda m, f, tr, q: inf.pairwise_scores(m, f, q, tr, query_rank=2, batch_size=3, progress=False),
    'self_scores': lambda m, f, tr, q: inf.self_scores(m, f, tr, progress=False),
    'scan': lambda m, f, tr, q: scan(m, f, q, tr, k=3, chunk_size=4, progress=False),
    'scan(refine)': lambda m, f, tr, q: scan(m, f, q, tr, k=3, query_rank=2, refine=True, progress=False),
}


@settings(max_examples=14, **SETTINGS)
@given(call=st.sampled_from(sorted(CALLS)), modes=st.lists(st.booleans(), min_size=40, max_size=40),
       frozen=st.lists(st.booleans(), min_size=20, max_size=20), fail=st.booleans())
def test_P3_model_state_unchanged(call, modes, frozen, fail):
    "After any public call — or its failure midway through a pass — the model is exactly as it was."
    m, f, train, queries, _ = setup()
    mods, params = list(m.modules()), list(m.parameters())
    for x, t in zip(mods, modes): x.training = t
    for p, fr in zip(params, frozen): p.requires_grad_(not fr)
    snap = snapshot(m)
    data = train + [[3, VOCAB - 1, 5]] if fail else train
    h = m.transformer.wte.register_forward_hook(lambda mod, i, out: out.masked_fill((i[0] == VOCAB - 1)[..., None], float('nan')))
    try:
        if fail:
            with pytest.raises(ValueError, match='Non-finite'): CALLS[call](m, f, data, queries)
        else: CALLS[call](m, f, data, queries)
    finally:
        h.remove()
        try: unchanged(m, snap)
        finally:                                    # leave the shared model as setup() made it
            m.eval(); m.requires_grad_(True)


# ------------------------------------------------------------------ P4 (issue 16): any container, any family, identity
FAMILIES = ('gpt2', 'llama', 'gpt_neox', 'opt')
CONTAINERS = ('list of dicts', 'list of lists', 'tuple of tensors', 'DataFrame', 'Series', 'HF Dataset',
              'BatchEncoding', 'BatchEncoding pt', 'numpy object', 'numpy 2-D')
BAD = (None, 'id >= vocab', 'float ids', 'empty sequence', 'too long', 'a string', 'flat ids')


@functools.lru_cache(None)
def family_setup(family):
    m = inf.tiny_model(family, layers=1, vocab=VOCAB, ctx=32).double()
    f = inf.fit_factors(m, rand_seqs(3), 'identity', progress=False)
    return m, f, inf.find_modules(m, 'mlp')


def autograd_grads(m, layers, rows):
    "Per-sequence gradient of the summed loss over the tracked layers' parameters, by plain autograd: `[n, P]`."
    out = []
    for ids, lab in rows:
        m.zero_grad()
        logits = m(input_ids=torch.tensor([ids])).logits[0]
        torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(lab[1:]), ignore_index=-100, reduction='sum').backward()
        out.append(torch.cat([p.grad.reshape(-1) for l in layers for _, p in l.params()]))
    m.zero_grad(set_to_none=True)
    return torch.stack(out)


def container(kind, rows):
    "The token-id lists `rows` (every token scored) in container `kind`."
    import numpy as np, pandas as pd, datasets
    from transformers import BatchEncoding
    if kind == 'list of dicts': return [{'input_ids': r} for r in rows]
    if kind == 'list of lists': return [list(r) for r in rows]
    if kind == 'tuple of tensors': return tuple(torch.tensor(r) for r in rows)
    if kind == 'DataFrame': return pd.DataFrame({'input_ids': rows})
    if kind == 'Series': return pd.Series(rows, index=range(50, 50 + len(rows)))
    if kind == 'HF Dataset': return datasets.Dataset.from_dict({'input_ids': rows})
    if kind == 'numpy object':
        a = np.empty(len(rows), dtype=object)
        for i, r in enumerate(rows): a[i] = np.array(r)
        return a
    if kind == 'numpy 2-D': return np.array(rows)
    L = max(map(len, rows))
    pad = {'input_ids': [r + [0] * (L - len(r)) for r in rows], 'attention_mask': [[1] * len(r) + [0] * (L - len(r)) for r in rows]}
    return BatchEncoding({k: torch.tensor(v) for k, v in pad.items()} if kind == 'BatchEncoding pt' else pad)


@settings(max_examples=60, **SETTINGS)
@given(family=st.sampled_from(FAMILIES), kind=st.sampled_from(CONTAINERS), role=st.sampled_from(['train', 'queries', 'self']),
       rows=st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=2, max_size=9), min_size=1, max_size=4),
       bad=st.sampled_from(BAD), where=st.integers(0, 3))
def test_P4_identity_equals_autograd_or_named_refusal(family, kind, role, rows, bad, where):
    "`strategy='identity'` scores from any container equal plain autograd dot products; bad data is refused naming the argument."
    m, f, layers = family_setup(family)
    if kind == 'numpy 2-D' and bad in ('empty sequence', 'too long'): kind = 'numpy object'   # no longer a rectangle
    if kind == 'numpy 2-D': rows = [r[:min(map(len, rows))] for r in rows]        # a rectangle
    where = where % len(rows)
    if bad == 'id >= vocab': rows[where] = rows[where][:-1] + [VOCAB + 3]
    if bad == 'empty sequence': rows[where] = []
    if bad == 'too long': rows[where] = (rows[where] * 40)[:33]
    data = container(kind, rows)
    if bad == 'float ids': data = [[float(x) for x in r] for r in rows]
    if bad == 'a string': data = [list(r) for r in rows]; data[where] = 'some text'
    if bad == 'flat ids': data = rows[0]
    queries = rand_queries(2)
    name = 'queries' if role == 'queries' else 'train'
    call = {'train': lambda: inf.pairwise_scores(m, f, queries, data, progress=False).total,
            'queries': lambda: inf.pairwise_scores(m, f, data, queries, progress=False).total,
            'self': lambda: inf.self_scores(m, f, data, progress=False)}[role]
    if bad is not None:
        with pytest.raises((ValueError, TypeError)) as e: call()
        assert name in str(e.value), f"the message does not name `{name}`: {e.value}"
        return
    mine = [(r, r) for r in rows]
    other = [(s['input_ids'].tolist(), s['labels'].tolist()) for s in queries]
    with keep_precision(m):     # float64 throughout: Llama, GPT-NeoX and OPT take norms or softmaxes in float32, whose
        gq, gt = ((autograd_grads(m, layers, mine), autograd_grads(m, layers, other)) if role == 'queries'   # rounding
                  else (autograd_grads(m, layers, other), autograd_grads(m, layers, mine)))              # moves with the
        want = (gt * gt).sum(1) if role == 'self' else gq @ gt.T                                         # padding
        got = call()
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12 * float(want.abs().max())), (got, want)
