"""Session 6 (issue 18): 'lissa', 'cg' and 'pcg' are an `IterativeSolver` (nbs/05b_solver.ipynb) that holds the fit data,
apart from the `Factors` artefact; it scores like exact influence everywhere `Factors` are accepted, and switches a
model's fused attention to eager attention for the duration of a solve."""
import pytest
import torch
import influence_nb as inf
from influence_nb.ekfac import Factors, FACTOR_STRATEGIES, ITERATIVE
from influence_nb.solver import IterativeSolver, eager_attention
from influence_nb.search import _config
from influence_nb.theory import exact_influence
from randdata import param_names, rand_seqs, rand_queries

pytestmark = pytest.mark.usefixtures('one_thread')   # tests/conftest.py
f64 = torch.float64


@pytest.fixture(scope='module')
def lm():
    model = inf.tiny_model('gpt2', layers=1).double().eval()   # 2,128 tracked parameters: the dense GGN is cheap
    return model, rand_seqs(8), rand_queries(3)


def test_fit_factors_returns_a_solver_for_iterative_strategies_and_factors_otherwise(lm):
    m, train, _ = lm
    assert set(FACTOR_STRATEGIES) | set(ITERATIVE) == set(inf.STRATEGIES) and not set(FACTOR_STRATEGIES) & set(ITERATIVE)
    for s in inf.STRATEGIES:
        f = inf.fit_factors(m, train, s, progress=False)
        assert isinstance(f, IterativeSolver if s in ITERATIVE else Factors) and f.strategy == s and not hasattr(f, 'as_ekfac')
        assert hasattr(f, 'fit_data') == (s in ITERATIVE)          # the artefact never holds training data
    with pytest.raises(ValueError, match="returns an `IterativeSolver`"):
        Factors('cg', f.modules, {}, 'true', 1, 1, 0, '')


def test_solver_scores_are_exact_influence_for_every_entry_point(lm):
    "pairwise (total and per layer), self and scan with a converged 'cg' / 'pcg' solver equal exact influence (dense GGN)."
    m, train, queries = lm
    lam = 0.05
    both = exact_influence(m, param_names(m, 'mlp'), [*queries, *train], train, lam)           # [3 + 8, 8], 01_theory
    exact, exact_self = both[:len(queries)], torch.diagonal(both[len(queries):])
    for strategy in ('cg', 'pcg'):
        f = inf.fit_factors(m, train, strategy, solver=dict(tol=1e-11, max_iter=500), progress=False)
        s = inf.pairwise_scores(m, f, queries, train, damping=lam, per_layer=True, progress=False)
        torch.testing.assert_close(s.total.double(), exact, rtol=0, atol=1e-7 * exact.abs().max().item())
        torch.testing.assert_close(sum(s.per_layer.values()), s.total, rtol=0, atol=1e-9 * exact.abs().max().item())
        torch.testing.assert_close(inf.self_scores(m, f, train, damping=lam, progress=False).double(), exact_self,
                                   rtol=0, atol=1e-7 * exact_self.abs().max().item())
        r = inf.scan(m, f, queries, train, k=3, damping=lam, progress=False)
        top = exact.topk(3, dim=1)
        assert torch.equal(r.indices, top.indices), strategy
        torch.testing.assert_close(r.scores.double(), top.values, rtol=0, atol=1e-7 * exact.abs().max().item())
        assert s.n_train == r.n_train == len(train) and s.strategy == strategy


def test_solver_options_and_data_are_in_the_scan_resume_key(lm):
    m, train, queries = lm
    qs = inf.check_sequences(m, queries, 'queries')
    stream = type('Stream', (), {'kind': 'memory'})()
    key = lambda f: _config(f, qs, stream, None)['factors']
    a, b = (inf.fit_factors(m, train, 'cg', solver=dict(tol=t), progress=False) for t in (1e-6, 1e-8))
    assert key(a) == key(inf.fit_factors(m, train, 'cg', solver=dict(tol=1e-6), progress=False))   # the same solver
    assert key(a) != key(b)                                                                           # other options
    assert key(a) != key(inf.fit_factors(m, train[:-1], 'cg', solver=dict(tol=1e-6), progress=False))  # other data


def test_solver_refuses_what_it_cannot_do(lm, tmp_path):
    m, train, queries = lm
    cg = inf.fit_factors(m, train, 'cg', progress=False)
    with pytest.raises(ValueError, match=r"call `fit_factors\(model, train, strategy='cg'\)` again"): cg.save(tmp_path)
    pcg = inf.fit_factors(m, train, 'pcg', seed=2, progress=False)
    with pytest.raises(ValueError, match=r'solver.preconditioner.save\(path\)'): pcg.save(tmp_path)
    back = Factors.load(pcg.preconditioner.save(tmp_path))
    ek = inf.fit_factors(m, train, 'ekfac', seed=2, progress=False)
    assert all(torch.equal(back.tensors[n][k], ek.tensors[n][k]) for n in ek.modules for k in back.tensors[n])   # A, S: not loaded
    with pytest.raises(ValueError, match=r"Unknown `solver` option\(s\) \['depth'\] for strategy 'cg'"):
        inf.fit_factors(m, train, 'cg', solver=dict(depth=3), progress=False)
    changed = inf.tiny_model('gpt2', layers=1).double().eval()
    with torch.no_grad(): changed.transformer.h[0].attn.c_attn.weight.add_(0.01)   # an untracked weight
    with pytest.raises(ValueError, match='model fingerprint mismatch'):
        inf.pairwise_scores(changed, cg, queries, train, damping=0.1, progress=False)
    with pytest.raises(TypeError, match='or an IterativeSolver'):
        inf.pairwise_scores(m, {'strategy': 'cg'}, queries, train, damping=0.1, progress=False)


def _hf_pair(family):
    "A random-init transformers model with SDPA attention and the same weights with eager attention."
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    cls, config = {'qwen2': (Qwen2ForCausalLM, Qwen2Config), 'llama': (LlamaForCausalLM, LlamaConfig)}[family]
    cfg = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    sdpa = cls(config(**cfg, attn_implementation='sdpa')).eval()
    eager = cls(config(**cfg, attn_implementation='eager')).eval()
    eager.load_state_dict(sdpa.state_dict())
    g = torch.Generator().manual_seed(1)
    train = [{'input_ids': torch.randint(0, 300, (int(n),), generator=g)} for n in torch.randint(8, 20, (5,), generator=g)]
    return sdpa, eager, train


@pytest.mark.parametrize('family', ['qwen2', 'llama'])
@pytest.mark.parametrize('strategy', ['cg', 'lissa', 'pcg'])
def test_fused_attention_is_switched_to_eager_for_the_solve(family, strategy):
    sdpa, eager, train = _hf_pair(family)
    opts = {'cg': dict(tol=1e-10, max_iter=300), 'lissa': dict(depth=40), 'pcg': dict(max_iter=3)}[strategy]
    score = lambda m: inf.pairwise_scores(m, inf.fit_factors(m, train, strategy, solver=opts, progress=False), train[:2], train,
                                          damping=0.1, progress=False).total
    got, want = score(sdpa), score(eager)
    assert sdpa.config._attn_implementation == 'sdpa' and sdpa.model.config._attn_implementation == 'sdpa'   # restored
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())   # measured ≤ 1.1e-7


def test_a_model_that_cannot_be_switched_keeps_the_clear_error():
    sdpa, _, train = _hf_pair('qwen2')
    for mod in sdpa.modules():                            # as a model whose attention does not follow transformers'
        if hasattr(mod, '_can_set_attn_implementation'): mod._can_set_attn_implementation = lambda: False   # AttentionInterface
    with eager_attention(sdpa) as switched: assert switched == [] and sdpa.config._attn_implementation == 'sdpa'
    f = inf.fit_factors(sdpa, train, 'cg', progress=False)
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        inf.pairwise_scores(sdpa, f, train[:1], train, damping=0.1, progress=False)
