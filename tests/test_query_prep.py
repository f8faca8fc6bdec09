"""One query-preparation path (`scores.prepare_queries`) for `pairwise_scores`, `search.scan` and its refinement.

Scans must score exactly as `pairwise_scores` does, also at a low rank and in float32 (the default dtype); the
eigenbasis path must agree with preconditioning the plain gradients; low-rank queries are never held multiplied out.
"""
import functools
import pytest, torch
import influence_nb as inf
from influence_nb import scores, search
from influence_nb.search import scan, read_scores
import randdata

torch.set_num_threads(1)

rand_seqs = functools.partial(randdata.rand_seqs, lo=3, hi=20, top=randdata.VOCAB)
rand_queries = functools.partial(randdata.rand_queries, length=10, completion=4, top=randdata.VOCAB)


@pytest.fixture(scope='module')
def llama():
    "A float32 Llama (gate_proj and up_proj share their input), 40 sequences, 5 queries, EK-FAC factors."
    model = inf.tiny_model('llama', layers=2)
    corpus, queries = rand_seqs(40), rand_queries(5)
    return model, corpus, queries, inf.fit_factors(model, corpus, batch_size=8, progress=False)


@pytest.mark.parametrize('rank', [None, 3])
def test_scan_is_bit_identical_to_pairwise(llama, tmp_path, rank):
    model, corpus, queries, f = llama
    want = inf.pairwise_scores(model, f, queries, corpus, query_rank=rank, batch_size=8, progress=False).total
    r = scan(model, f, queries, corpus, k=6, query_rank=rank, chunk_size=len(corpus), batch_size=8,
             scores_path=tmp_path / 's', progress=False)
    got = torch.tensor(read_scores(tmp_path / 's').sort_index().to_numpy().T)
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want)                                       # every score, bit for bit
    v, i = want.topk(6, dim=1)
    assert torch.equal(r.scores, v) and torch.equal(r.indices, i)


def test_pairwise_scan_and_refine_share_one_query_path(llama, monkeypatch):
    model, corpus, queries, f = llama
    calls, real = [], scores.prepare_queries
    def spy(*a, **k):
        calls.append(a[5] if len(a) > 5 else k.get('query_rank'))
        return real(*a, **k)
    monkeypatch.setattr(scores, 'prepare_queries', spy)
    monkeypatch.setattr(search, 'prepare_queries', spy)
    inf.pairwise_scores(model, f, queries, corpus, query_rank=2, progress=False)
    scan(model, f, queries, corpus, k=3, query_rank=2, refine=True, progress=False)
    assert calls == [2, 2, None]                                       # pairwise, scan, full-rank refinement


@pytest.mark.parametrize('strategy', ['identity', 'diagonal', 'kfac', 'ekfac'])
def test_float32_queries_match_a_float64_plain_preconditioning(llama, strategy):
    "The float32 eigenbasis path against float64 `Factors.precondition` of the plain gradients, at full and low rank."
    model, corpus, queries, _ = llama
    m64 = inf.tiny_model('llama', layers=2).double()
    m64.load_state_dict(model.state_dict())
    fit = dict(fisher='empirical', batch_size=8, progress=False)     # sampled pseudo-labels could differ between dtypes
    f32, f64 = inf.fit_factors(model, corpus, strategy, **fit), inf.fit_factors(m64, corpus, strategy, **fit)
    layers, layers64 = inf.find_modules(model, 'mlp'), inf.find_modules(m64, 'mlp')
    qs = inf.as_sequences(queries)
    ref = {n: f64.precondition(n, g) for n, g in scores.query_gradients(m64, layers64, qs).items()}
    for rank in (None, 2):
        got = scores.prepare_queries(model, f32, layers, qs, query_rank=rank)
        for n, pq in got.items():
            assert pq.dtype == torch.float32 and pq.rank == rank
            want = scores.query_form(ref[n], n, rank).dense()
            assert (pq.dense().double() - want).abs().max() <= 1e-4 * want.abs().max(), n


def test_low_rank_queries_are_contracted_factored(llama):
    "At a low rank no `[n_q, d_out, d_in+1]` tensor is kept, and the factored contraction equals the dense one."
    model, corpus, queries, f = llama
    layers = inf.find_modules(model, 'mlp')
    pq = scores.prepare_queries(model, f, layers, inf.as_sequences(queries), query_rank=2)
    (idx, acts, outg), = list(inf.kfac.layer_passes(model, layers, corpus[:4], 4))
    for layer in layers:
        q = pq[layer.name]
        assert q.full is None and q.U.shape == (5, layer.d_out, 2) and q.V.shape == (5, layer.d_in1, 2)
        dense = scores.PrecondQuery(full=q.dense())
        for path in ('lowrank', 'grad', 'token'):
            s = scores.contract_scores(q, acts[layer.name], outg[layer.name], path=path)[0]
            ref = scores.contract_scores(dense, acts[layer.name], outg[layer.name], path='grad')[0]
            assert torch.allclose(s, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
        assert not hasattr(q, '_flat') and q.full is None               # nothing multiplied out was kept


def test_bad_damping_names_the_layer(llama):
    model, corpus, queries, f = llama
    layers = inf.find_modules(model, 'mlp')
    with pytest.raises(ValueError, match="preconditioned query gradients of layer 'model.layers.0.mlp.gate_proj'"):
        scores.prepare_queries(model, f, layers, inf.as_sequences(queries), damping=-float(f.tensors[layers[0].name]['Lambda'].max()))
