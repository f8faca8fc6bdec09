"Brute-force and invariance tests for the BM25 / TF-IDF token filter (nbs/07_tfidf.ipynb)."
import math, warnings
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from sklearn.feature_extraction.text import TfidfVectorizer
from influence_nb.tfidf import TokenIndex, bm25_scores, top_candidates


def bm25_reference(queries, corpus, k1=1.5, ignore_ids=()):
    "The paper's score typed out term by term: distinct query tokens, binary existence, corpus-level IDF."
    ignore = set(ignore_ids)
    docs = [[t for t in d if t not in ignore] for d in corpus]
    C = len(docs)
    out = np.zeros((len(queries), C))
    for qi, q in enumerate(queries):
        for di, d in enumerate(docs):
            for t in set(q) - ignore:
                n = sum(t in dd for dd in docs)
                e = 1 if t in d else 0
                out[qi, di] += (k1 + 1) * e / (k1 + e) * math.log((C - n + 0.5) / (n + 0.5) + 1)
    return out


def top_reference(scores, k):
    "Stable full sort: descending score, ties by lower index."
    return np.stack([sorted(range(len(r)), key=lambda j: (-r[j], j))[:k] for r in scores])


token_lists = st.lists(st.integers(0, 12), min_size=1, max_size=10)


@settings(max_examples=60, deadline=None)
@given(corpus=st.lists(token_lists, min_size=1, max_size=15),
       queries=st.lists(st.lists(st.integers(1, 15), min_size=1, max_size=6), min_size=1, max_size=4),
       k=st.integers(1, 15))
def test_bm25_matches_bruteforce(corpus, queries, k):
    ref = bm25_reference(queries, corpus, ignore_ids={0})
    got = bm25_scores(queries, corpus, ignore_ids=[0]).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    k_eff = min(k, len(corpus))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        idx, val = top_candidates(queries, corpus, k=k, ignore_ids=[0])
    assert idx.shape == (len(queries), k_eff)
    # ties are defined on the exact same float64 values, so the reference sort runs on `got`
    np.testing.assert_array_equal(idx.numpy(), top_reference(got, k_eff))
    np.testing.assert_allclose(val.numpy(), np.take_along_axis(ref, idx.numpy(), 1), rtol=1e-12, atol=1e-12)


def test_closed_form():
    # docs [1,2],[2,3],[3]: count(1)=1, count(2)=count(3)=2, C=3
    s = bm25_scores([[1, 2]], [[1, 2], [2, 3], [3]]).numpy()
    np.testing.assert_allclose(s, [[math.log(8 / 3) + math.log(1.6), math.log(1.6), 0.0]], rtol=1e-13)


def test_invariances():
    rng = np.random.default_rng(0)
    corpus = [rng.integers(1, 30, size=rng.integers(1, 20)).tolist() for _ in range(40)]
    queries = [rng.integers(1, 30, size=5).tolist() for _ in range(3)]
    base = bm25_scores(queries, corpus)
    perm = rng.permutation(len(corpus))
    torch.testing.assert_close(bm25_scores(queries, [corpus[j] for j in perm]), base[:, perm])
    # duplicating a query token does not change the score (the query is a set of tokens)
    torch.testing.assert_close(bm25_scores([q + q[:2] for q in queries], corpus), base)
    # k1 cancels with binary term existence
    torch.testing.assert_close(bm25_scores(queries, corpus, k1=0.2), base)
    # padded dict inputs = unpadded lists
    T = max(map(len, corpus))
    padded = [dict(input_ids=torch.tensor(d + [0] * (T - len(d))),
                   attention_mask=torch.tensor([1] * len(d) + [0] * (T - len(d)))) for d in corpus]
    torch.testing.assert_close(bm25_scores(queries, padded), base)
    # a [n, T] tensor padded with an ignored id = unpadded lists
    torch.testing.assert_close(bm25_scores(queries, torch.stack([p['input_ids'] for p in padded]), ignore_ids=[0]), base)


def test_tfidf_matches_numpy():
    rng = np.random.default_rng(1)
    V = 25
    corpus = [rng.integers(0, V, size=rng.integers(1, 15)).tolist() for _ in range(30)]
    corpus[0].append(V - 1)
    queries = [rng.integers(0, V + 5, size=6).tolist() for _ in range(4)]
    counts = lambda xs: np.stack([np.bincount([t for t in x if t < V], minlength=V) for x in xs]).astype(float)
    D, Q = counts(corpus), counts(queries)
    df = (D > 0).sum(0)
    Q[:, df == 0] = 0                                  # as in TfidfVectorizer: tokens unseen in the corpus are not terms
    idf = np.log((1 + len(corpus)) / (1 + df)) + 1
    norm = lambda M: (M * idf) / np.linalg.norm(M * idf, axis=1, keepdims=True)
    ref = norm(Q) @ norm(D).T
    np.testing.assert_allclose(TokenIndex(corpus).scores(queries, 'tfidf'), ref, rtol=1e-10, atol=1e-12)
    vec = TfidfVectorizer(analyzer=lambda ids: ids)   # token ids as terms
    D = vec.fit_transform(corpus)
    np.testing.assert_allclose(TokenIndex(corpus).scores(queries, 'tfidf'), (vec.transform(queries) @ D.T).toarray(),
                               rtol=1e-10, atol=1e-12)
    idx, val = top_candidates(queries, corpus, k=5, method='tfidf')
    np.testing.assert_array_equal(idx.numpy(), top_reference(TokenIndex(corpus).scores(queries, 'tfidf').numpy(), 5))


def test_errors():
    with pytest.raises(ValueError, match='corpus'): bm25_scores([[1]], [])
    with pytest.raises(ValueError, match='queries'): bm25_scores([], [[1]])
    with pytest.raises(ValueError, match='k'): top_candidates([[1]], [[1]], k=0)
    with pytest.raises(ValueError, match='method'): top_candidates([[1]], [[1]], k=1, method='bm42')
    with pytest.warns(UserWarning, match='exceeds the corpus size'):
        idx, _ = top_candidates([[1]], [[1], [2]], k=5)
    assert idx.shape == (1, 2)
