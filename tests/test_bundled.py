"Engine checks on the bundled trained models."
import json, random
import pytest, torch
import influence_nb as inf
from influence_nb.cli import load_bundled, completion_logprobs
from influence_nb.corpus import load_corpus, load_queries

@pytest.fixture(scope='module')
def large():
    torch.manual_seed(0)
    model, tok = load_bundled('gpt2-l')
    recs = load_corpus('train')
    rng = random.Random(0)
    texts = [recs[i]['text'] for i in rng.sample(range(len(recs)), 160)]
    train = inf.tokenize(tok, texts, max_length=128)
    qs = [q for q in load_queries() if q['kind'] == 'fact' and q['lang'] == 'en'][:8]
    queries = inf.tokenize_pairs(tok, [(q['prompt'], q['completion']) for q in qs])
    factors = inf.fit_factors(model, train, 'ekfac', batch_size=16, progress=False)
    return model, tok, train, queries, factors

def test_rank32_query_batching_matches_full_rank(large):
    model, tok, train, queries, factors = large
    full = inf.pairwise_scores(model, factors, queries, train, batch_size=16, progress=False).total
    r32 = inf.pairwise_scores(model, factors, queries, train, query_rank=32, batch_size=16, progress=False).total
    r = torch.corrcoef(torch.stack([full.flatten(), r32.flatten()]))[0, 1].item()
    print(f'rank-32 vs full rank Pearson: {r:.5f}')
    assert r >= 0.99

def test_bundled_scores_sum_and_self(large):
    model, tok, train, queries, factors = large
    s = inf.pairwise_scores(model, factors, queries, train[:32], per_layer=True, per_token=True, batch_size=16, progress=False)
    tol = 1e-4 * float(s.total.abs().max())
    assert torch.allclose(sum(s.per_layer.values()), s.total, atol=tol)
    assert torch.allclose(s.per_token.sum(-1), s.total, atol=tol)
    assert len(s.layer_shares()) == len(queries)

def test_completion_logprobs_match_model_loss(large):
    model, tok, train, queries, factors = large
    lp = completion_logprobs(model, queries)
    for i, q in enumerate(queries[:3]):
        out = model(input_ids=q['input_ids'][None], labels=q['labels'][None])
        n = int((q['labels'][1:] != -100).sum())
        assert abs(lp[i].item() + out.loss.item() * n) < 1e-4
