"""Session 7, SCORES-EKFAC: the damping of layers without curvature (S1), per-token scores in the coordinates of the
sequences as given (S2), one definition of layer shares (S7) and `fit_factors`' speed options `eigh_dtype` and
`rotate_dtype`. Each test checks a closed form, an exact equality with another path, or a refusal.
"""
import tempfile, warnings
import numpy as np
import pytest, torch
import influence_nb as inf
from influence_nb.ekfac import Factors
from influence_nb.scores import Scores, layer_sums, shares_of_total
from influence_nb import viz
from transformers import MixtralConfig, MixtralForCausalLM
from randdata import rand_seqs, rand_queries

f64 = torch.float64


def _sparse_moe():
    "A one-block float64 Mixtral, top-1 routing over 16 experts: a 5-token fit set leaves most experts without a token."
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_local_experts=16, num_experts_per_tok=1,
                        router_jitter_noise=0., num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                        max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return MixtralForCausalLM(cfg).eval().double()


def _factors(eigenvalues:dict, strategy='ekfac'):
    "EK-FAC `Factors` with the given `Λ` per layer and random orthogonal eigenbases."
    g = torch.Generator().manual_seed(0)
    def layer(lam):
        o, i = lam.shape
        QS, QA = (torch.linalg.qr(torch.randn(k, k, dtype=f64, generator=g))[0] for k in (o, i))
        return {'QS': QS, 'QA': QA, 'lS': torch.ones(o, dtype=f64), 'lA': torch.ones(i, dtype=f64), 'Lambda': lam}
    return Factors(strategy, list(eigenvalues), {n: list(v.shape) for n, v in eigenvalues.items()}, 'true', 1, 1, 0, '',
                   tensors={n: layer(v) for n, v in eigenvalues.items()})


# ---- S1: a layer with no curvature gets the model-wide damping -------------------------------------------------------

def test_layer_without_curvature_gets_the_model_wide_damping_closed_form():
    g = torch.Generator().manual_seed(1)
    la, lc = torch.rand(3, 4, dtype=f64, generator=g) + .1, torch.rand(2, 5, dtype=f64, generator=g) * 7
    f = _factors({'a': la, 'b': torch.zeros(3, 4, dtype=f64), 'c': lc})
    model_wide = 0.1 * float((la.sum() + lc.sum()) / (la.numel() + lc.numel()))   # mean Λ over the fitted layers
    assert f.without_curvature() == ['b']
    assert f.model_damping() == pytest.approx(model_wide, rel=1e-14)
    assert f.damping_for('a') == 0.1 * float(la.mean())                    # fitted layers: the paper's rule, unchanged
    assert f.damping_for('b') == pytest.approx(model_wide, rel=1e-14)
    V = torch.randn(3, 4, dtype=f64, generator=g)
    torch.testing.assert_close(f.precondition('b', V), V / model_wide, rtol=1e-12, atol=0)   # (0 + λ)⁻¹ in any basis
    torch.testing.assert_close(f.precondition('b', V, 0.25), V / 0.25, rtol=1e-12, atol=0)   # explicit damping: as given
    assert torch.equal(f.damped_eigenvalues('a'), la + f.damping_for('a'))


def test_no_curvature_anywhere_is_refused_naming_damping():
    f = _factors({'a': torch.zeros(3, 4, dtype=f64)})
    with pytest.raises(ValueError, match='pass `damping`'):
        f.precondition('a', torch.ones(3, 4, dtype=f64))
    torch.testing.assert_close(f.precondition('a', torch.ones(3, 4, dtype=f64), 2.), torch.full((3, 4), .5, dtype=f64),
                               rtol=1e-12, atol=1e-14)   # an explicit damping needs no curvature


def test_unfitted_experts_warn_and_score_as_gradient_products_over_the_model_wide_damping(one_thread):
    m = _sparse_moe()
    fit, train, q = rand_seqs(1, lo=5, hi=6), rand_seqs(24, seed=1), rand_queries(2)
    with pytest.warns(UserWarning, match=r'tracked layers have no curvature: .*no fit token reached .*modules=') as rec:
        f = inf.fit_factors(m, fit, progress=False)
    empty = f.without_curvature()
    assert empty and len(empty) < len(f.modules) and empty[0] in str(rec[0].message)
    ek = inf.pairwise_scores(m, f, q, train, per_layer=True, progress=False)
    plain = inf.pairwise_scores(m, inf.fit_factors(m, fit, 'identity', progress=False), q, train, per_layer=True, progress=False)
    lam = f.model_damping()
    reached = 0
    for n in empty:   # Q (G + λ)⁻¹ Qᵀ with G = 0: the plain gradient product over λ; 0 where no token reaches the expert
        torch.testing.assert_close(ek.per_layer[n], plain.per_layer[n] / lam, rtol=1e-9, atol=1e-12 * float(plain.per_layer[n].abs().max() / lam + 1))
        assert torch.equal(ek.per_layer[n] == 0, plain.per_layer[n] == 0)
        reached += bool(plain.per_layer[n].abs().max() > 0)
    assert reached                                                          # some unfitted expert does score
    diag = torch.diagonal(inf.pairwise_scores(m, f, train, train, progress=False).total)
    torch.testing.assert_close(inf.self_scores(m, f, train, progress=False), diag, rtol=1e-9, atol=0)   # one damping in both


# ---- fit options ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def small():
    return inf.tiny_model('llama', layers=1), rand_seqs(10, seed=3)


def test_fit_options_off_by_default_on_and_recorded(small, one_thread):
    m, seqs = small
    kw = dict(batch_size=4, progress=False)
    base, none = inf.fit_factors(m, seqs, **kw), inf.fit_factors(m, seqs, eigh_dtype=None, rotate_dtype=None, **kw)
    assert all(torch.equal(base.tensors[n][k], none.tensors[n][k]) for n in base.modules for k in base.tensors[n])
    assert base.info.keys() == none.info.keys() and 'eigh_dtype' not in base.info
    fast = inf.fit_factors(m, seqs, eigh_dtype=torch.float32, rotate_dtype='bfloat16', **kw)
    assert (fast.info['eigh_dtype'], fast.info['rotate_dtype']) == ('float32', 'bfloat16')
    with tempfile.TemporaryDirectory() as d:
        assert Factors.load(fast.save(d)).info['eigh_dtype'] == 'float32'          # in the artefact's metadata
    only_eigh = inf.fit_factors(m, seqs, 'kfac', eigh_dtype='float32', **kw)
    assert only_eigh.info['eigh_dtype'] == 'float32' and 'rotate_dtype' not in only_eigh.info
    q = rand_queries(3)
    a, b = (inf.pairwise_scores(m, f, q, seqs, progress=False).total.flatten().double() for f in (fast, base))
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.999               # bfloat16 rounding of Λ, not a new method


def test_fit_options_reach_the_pcg_preconditioner(small, one_thread):
    m, seqs = small
    s = inf.fit_factors(m, seqs, 'pcg', eigh_dtype='float32', rotate_dtype='bfloat16', batch_size=4, progress=False)
    assert (s.preconditioner.info['eigh_dtype'], s.preconditioner.info['rotate_dtype']) == ('float32', 'bfloat16')


@pytest.mark.parametrize('strategy, kw, msg', [
    ('ekfac', {'eigh_dtype': 'float16'}, r"`eigh_dtype` must be None or one of \('float32', 'float64'\)"),
    ('ekfac', {'eigh_dtype': torch.bfloat16}, '`eigh_dtype` must be None'),
    ('ekfac', {'rotate_dtype': 'int8'}, '`rotate_dtype` must be None or one of'),
    ('ekfac', {'rotate_dtype': True}, '`rotate_dtype` must be None'),
    ('kfac', {'rotate_dtype': 'bfloat16'}, "`rotate_dtype` applies to strategies .*'kfac' does not"),
    ('diagonal', {'eigh_dtype': 'float32'}, "`eigh_dtype` applies to strategies"),
    ('cg', {'eigh_dtype': 'float32'}, "`eigh_dtype` applies to strategies"),
    ('identity', {'rotate_dtype': 'float32'}, "`rotate_dtype` applies to strategies"),
])
def test_bad_fit_options_are_refused(small, strategy, kw, msg):
    m, seqs = small
    with pytest.raises(ValueError, match=msg):
        inf.fit_factors(m, seqs, strategy, progress=False, **kw)


# ---- S2: per-token scores in the coordinates of the sequences as given -----------------------------------------------

@pytest.fixture(scope='module')
def scored():
    m = inf.tiny_model('gpt2', layers=1).double()
    train, q = rand_seqs(5, seed=4), rand_queries(2)
    f = inf.fit_factors(m, train, progress=False)
    return m, f, train, q, inf.pairwise_scores(m, f, q, train, per_token=True, progress=False)


def _pad(s, left, right):
    z = lambda k: torch.zeros(k, dtype=torch.long)
    L = len(s['input_ids'])
    return {'input_ids': torch.cat([z(left), s['input_ids'], z(right)]),
            'attention_mask': torch.cat([z(left), torch.ones(L, dtype=torch.long), z(right)])}


@pytest.mark.parametrize('batch_size', [1, 3])
def test_per_token_of_padded_sequences_sits_where_the_tokens_were(scored, batch_size, one_thread):
    m, f, train, q, plain = scored
    pads = [(3, 0), (0, 4), (2, 2), (0, 0), (5, 1)]                          # left, right, both, none
    given = [_pad(s, *p) for s, p in zip(train, pads)]
    got = inf.pairwise_scores(m, f, q, given, per_token=True, batch_size=batch_size, progress=False)
    assert got.per_token.shape == (2, 5, max(len(g['input_ids']) for g in given))
    for n, ((left, right), s) in enumerate(zip(pads, train)):
        L = len(s['input_ids'])
        assert float(got.per_token[:, n, :left].abs().sum() + got.per_token[:, n, left + L:].abs().sum()) == 0.
        torch.testing.assert_close(got.per_token[:, n, left:left + L], plain.per_token[:, n, :L], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.per_token.sum(-1), got.total, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.total, plain.total, rtol=1e-9, atol=1e-12)


def test_per_token_of_a_left_padded_batch_dict_and_of_a_generator(scored, one_thread):
    m, f, train, q, plain = scored
    W = max(len(s['input_ids']) for s in train)
    batch = {'input_ids': torch.stack([_pad(s, W - len(s['input_ids']), 0)['input_ids'] for s in train]),   # as a tokenizer
             'attention_mask': torch.stack([_pad(s, W - len(s['input_ids']), 0)['attention_mask'] for s in train])}
    got = inf.pairwise_scores(m, f, q, batch, per_token=True, progress=False)
    gen = inf.pairwise_scores(m, f, q, (dict(s) for s in train), per_token=True, progress=False)   # read once
    for n, s in enumerate(train):
        L = len(s['input_ids'])
        torch.testing.assert_close(got.per_token[:, n, W - L:], plain.per_token[:, n, :L], rtol=1e-9, atol=1e-12)
        assert float(got.per_token[:, n, :W - L].abs().sum()) == 0.
    assert torch.equal(gen.per_token, plain.per_token)


def test_per_token_of_rows_given_as_1_by_T_tensors(scored, one_thread):
    "`tokenizer(text, return_tensors='pt')` gives [1, T] ids (and mask) per record: per-token scores as for [T] rows."
    m, f, train, q, plain = scored
    rows = [{'input_ids': s['input_ids'][None], 'attention_mask': torch.ones(1, len(s['input_ids']), dtype=torch.long)}
            for s in train]
    got = inf.pairwise_scores(m, f, q, rows, per_token=True, progress=False)
    assert torch.equal(got.per_token, plain.per_token) and torch.equal(got.total, plain.total)


def test_layer_sums_names_the_callers_argument():
    with pytest.raises(ValueError, match='`top` needs'): layer_sums({'a': np.ones(2)}, top=1)
    with pytest.raises(ValueError, match='`top_k` must be'): layer_sums({'a': np.ones((2, 3))}, top=0, name='top_k')


# ---- S7: one definition of layer shares ------------------------------------------------------------------------------

def test_layer_shares_one_definition_nan_for_non_positive_totals():
    g = torch.Generator().manual_seed(5)
    per_layer = {f'h.{k}.mlp': torch.randn(4, 9, generator=g) for k in range(3)}
    s = Scores(sum(per_layer.values()), per_layer, n_train=9, modules=list(per_layer))
    sums = np.stack([v.double().sum(1).numpy() for v in per_layer.values()], -1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        mine, drawn = s.layer_shares().to_numpy(), viz.layer_shares(s).to_numpy()
        top_mine, top_drawn = s.layer_shares(top=3).to_numpy(), viz.layer_shares(s, top_k=3).to_numpy()
        again = shares_of_total(layer_sums(per_layer))                      # the one definition, called directly
    np.testing.assert_array_equal(mine, drawn)
    np.testing.assert_array_equal(top_mine, top_drawn)
    pos = sums.sum(1) > 0
    assert pos.any() and (~pos).any()                                       # both cases occur in this draw
    np.testing.assert_allclose(mine[pos], sums[pos] / sums[pos].sum(1, keepdims=True), rtol=1e-12)
    assert np.isnan(mine[~pos]).all()
    assert any('total influence <= 0' in str(x.message) for x in w)
    np.testing.assert_array_equal(again, mine)
    with pytest.raises(ValueError, match='`top` must be a positive integer'):
        s.layer_shares(top=0)
