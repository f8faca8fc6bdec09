"""Session 25: an EK-FAC oracle for every dense (non-expert) tracked layer of the families the sweeps build.

The other sweeps check identity scores against autograd; EK-FAC on dense layers was only checked for being finite and
self-consistent. Here every quantity is rebuilt without influence_nb's layout code: plain forward hooks on every module
holding the layer's weight (each call; a tied copy or a module registered twice included) and `register_hook` on the
output give the input rows a and the output-gradient rows ds of the summed token loss, one sequence at a time without
padding; the per-sequence gradient DW_n comes from autograd's `.grad` of the weight, laid out by module type (`nn.Linear`
`[out, in]`, transformers' `Conv1D` `[in, out]`), bias as the last column. Then

    A = Σ ā āᵀ / (tokens the layer saw, each call counted),  S = Σ_n Σ_t ds dsᵀ / N,  Λ = mean_n (Q_Sᵀ DW_n Q_A)²
    score[q, n] = ⟨DW_q, Q_S [(Q_Sᵀ DW_n Q_A) ⊘ (Λ + λ)] Q_Aᵀ⟩,  λ = 0.1·mean(Λ) or an explicit float,

with influence_nb's own Q_A, Q_S (eigenvectors are not unique). A padded batch of 3 must give the factors and scores
of batch 1. Experts are left out (tests/randdata.py::check_per_expert_ekfac covers them); MoE models' dense layers stay.

Sweep of session 25 (`modules='mlp'` and `'all'`, 127 models that fit; /tmp/s25/oracle/results.md): A, S, Λ and per-layer
scores agree with the oracle to ≤ 5e-14 relative, batch 3 with batch 1 to ≤ 7e-12. The cases below are a representative set
(about 30 s on one core). The one finding (adaptive depth: batch-dependent factors) is at the end.
"""
import warnings
import pytest, torch
from torch import nn
import transformers
import influence_nb as inf
from influence_nb.pbrf import keep_precision
import test_architectures as TA
import test_stranger_s24 as S24
import test_stranger_s23 as S23

transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures('one_thread')   # tests/conftest.py
TOL = 1e-9


# ------------------------------------------------------------------------------------------------------------ the oracle

def layout(mod):
    "(weight, transposed, bias) from the module type: nn.Linear stores [out, in]; transformers' Conv1D stores [in, out]."
    if type(mod).__name__ == 'Conv1D': return mod.weight, True, mod.bias
    if isinstance(mod, nn.Linear): return mod.weight, False, mod.bias
    raise TypeError(f'the oracle does not know the layout of {type(mod).__name__}')


def per_sequence(model, names, s):
    """`{name: (ā rows [k·T, d_in(+1)], ds rows [k·T, d_out], DW [d_out, d_in(+1)])}` of one sequence, unpadded. Every module
    holding the layer's weight Parameter is hooked; a call the model makes under its own no_grad carries no gradient and is
    not counted."""
    mods = {n: model.get_submodule(n) for n in names}
    holders = {}
    for m in model.modules():
        w = getattr(m, 'weight', None)
        if isinstance(w, torch.Tensor): holders.setdefault(id(w), []).append(m)
    rec, hs = {n: [] for n in names}, []
    for n, mod in mods.items():
        def hook(mod, args, kwargs, out, n=n):
            if not out.requires_grad: return None
            item = [(args[0] if args else next(iter(kwargs.values()))).detach(), None]
            out.register_hook(lambda g, item=item: item.__setitem__(1, g.detach()))
            rec[n].append(item)
            return out.clone()          # a later in-place change of the output (Falcon's `+=`) leaves `out`'s gradient alone
        for m in holders[id(layout(mod)[0])]: hs.append(m.register_forward_hook(hook, with_kwargs=True))
    try:
        model.zero_grad()
        logits = model(input_ids=s['input_ids'][None]).logits[0]
        nn.functional.cross_entropy(logits[:-1].double(), s['labels'][1:], ignore_index=-100, reduction='sum').backward()
    finally:
        for h in hs: h.remove()
    res = {}
    for n, mod in mods.items():
        w, tr, b = layout(mod)
        d_in, d_out = (w.shape[0], w.shape[1]) if tr else (w.shape[1], w.shape[0])
        a = torch.cat([x.reshape(-1, d_in) for x, _ in rec[n]] + [w.new_zeros(0, d_in)])
        ds = torch.cat([(g if g is not None else x.new_zeros(*x.shape[:-1], d_out)).reshape(-1, d_out) for x, g in rec[n]]
                       + [w.new_zeros(0, d_out)])
        if b is not None: a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
        gw = w.grad if w.grad is not None else torch.zeros_like(w)
        DW = gw.T if tr else gw
        if b is not None: DW = torch.cat([DW, (b.grad if b.grad is not None else torch.zeros_like(b))[:, None]], 1)
        res[n] = (a.double(), ds.double(), DW.detach().double().clone())
    model.zero_grad()
    return res


def rel(a, b):
    a, b = a.double(), b.double()
    m = float(b.abs().max())
    return float((a - b).abs().max()) / (m if m > 0 else 1.)


def oracle(model, train, queries, modules, damping=0.05, batch_sizes=(1, 3)):
    """`({quantity: (max relative error, worst layer)}, dense layers checked, warnings said)` of influence_nb's EK-FAC
    (empirical Fisher)."""
    train, queries = inf.as_sequences(train), inf.as_sequences(queries)
    with warnings.catch_warnings(record=True) as caught, keep_precision(model):
        warnings.simplefilter('always')
        fs = {bs: inf.fit_factors(model, train, 'ekfac', fisher='empirical', modules=modules, batch_size=bs, progress=False)
              for bs in batch_sizes}
        f = fs[batch_sizes[0]]
        names = [n for n in f.modules if not n.endswith(']')]   # experts: randdata.check_per_expert_ekfac
        tr, qs = [per_sequence(model, names, s) for s in train], [per_sequence(model, names, s) for s in queries]
        sc = {(bs, d): inf.pairwise_scores(model, fs[bs], queries, train, damping=d, per_layer=True, batch_size=bs,
                                           progress=False).per_layer for bs in batch_sizes for d in (None, damping)}
    err, N = {}, len(train)
    def note(k, e, n):
        if k not in err or not e <= err[k][0]: err[k] = (e, n)   # NaN is the worst
    for n in names:
        note('DW = Σ ds āᵀ', max(rel(p[n][1].T @ p[n][0], p[n][2]) for p in tr + qs), n)   # the reference is consistent
        A = sum(p[n][0].T @ p[n][0] for p in tr) / max(sum(len(p[n][0]) for p in tr), 1)
        S = sum(p[n][1].T @ p[n][1] for p in tr) / N
        t = f.tensors[n]
        note('A', rel(t['A'], A), n); note('S', rel(t['S'], S), n)
        QA, QS = t['QA'].double(), t['QS'].double()
        rot = [QS.T @ p[n][2] @ QA for p in tr]
        lam = sum(r ** 2 for r in rot) / N
        note('Lambda', rel(t['Lambda'], lam), n)
        for d in (None, damping):
            lamda = 0.1 * float(lam.mean()) if d is None else d
            if lamda == 0: lamda = 1.   # a layer no gradient reaches (Λ = 0): its scores are 0 whatever λ
            pre = [QS @ (r / (lam + lamda)) @ QA.T for r in rot]
            want = torch.tensor([[float((q[n][2] * g).sum()) for g in pre] for q in qs], dtype=torch.float64)
            note('scores' if d is None else 'scores (damping=)', rel(sc[(batch_sizes[0], d)][n], want), n)
        for bs in batch_sizes[1:]:
            note('padded fit', max(rel(fs[bs].tensors[n][k], t[k]) for k in ('A', 'S', 'Lambda')), n)
            for d in (None, damping): note('padded scores', rel(sc[(bs, d)][n], sc[(batch_sizes[0], d)][n]), n)
    return err, names, ' '.join(str(x.message) for x in caught)


def data(prompt=0):
    "Four training sequences (5, 11, 8, 12 tokens) and two queries whose first 3 tokens are the prompt."
    g = torch.Generator().manual_seed(0)
    train = [torch.randint(1, 30, (n,), generator=g) for n in (5, 11, 8, 12)]
    if prompt: train = [{'input_ids': t, 'labels': torch.cat([torch.full((prompt,), -100), t[prompt:]])} for t in train]
    qs = []
    for n in (7, 10):
        ids = torch.randint(1, 30, (n,), generator=g)
        qs.append({'input_ids': ids, 'labels': torch.cat([torch.full((3,), -100), ids[3:]])})
    return train, qs


# ------------------------------------------------------------------------------------------------------------ the sweep

def lora(base, targets):
    import peft
    return peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=targets, lora_alpha=4, init_lora_weights=False,
                                                     lora_dropout=0.0)).eval()

def build(family):
    if family in TA.FAMILIES: return TA.build(family)
    if family in ('Loop', 'Tied', 'InPlace'): return getattr(S23, family)().double().eval()
    if family == 'lora_gpt2': return lora(TA.build('gpt2'), ['c_attn', 'c_fc', 'c_proj'])
    if family == 'lora_llama': return lora(TA.build('llama'), ['q_proj', 'v_proj', 'gate_proj', 'up_proj', 'down_proj'])
    if family == 'opt_project_in_out':
        import test_stranger_s22 as S22
        return S22.opt().double()
    if family == 'llama4':
        import test_new_architectures as NA
        return NA.llama4()
    return S24.build(family)

CASES = [   # (family, modules, layers checked: what makes the case worth its time)
    ('gpt2', 'mlp', 4), ('gpt2', 'all', 8),             # Conv1D [in, out]; attention's square c_proj
    ('gpt_bigcode', 'all', 8), ('openai-gpt', 'all', 8), ('gptj', 'all', 12),   # Conv1D; GPT-J: attention and MLP share ln_1
    ('gpt_neox', 'all', 8), ('falcon', 'all', 8), ('bloom', 'all', 8),      # fused qkv; Falcon's `mlp_output += attn` in place
    ('phi', 'all', 12), ('phi3', 'all', 8), ('codegen', 'all', 8), ('mpt', 'all', 8), ('biogpt', 'all', 12),
    ('xglm', 'all', 12), ('opt', 'all', 12), ('opt_project_in_out', 'all', 14), ('starcoder2', 'all', 12),
    ('llama', 'all', 14), ('mistral', 'mlp', 6), ('qwen2', 'all', 14), ('qwen3', 'mlp', 6), ('gemma2', 'mlp', 6),
    ('gemma3_text', 'all', 14), ('olmo2', 'all', 14), ('cohere', 'all', 14), ('stablelm', 'all', 14), ('granite', 'all', 14),
    ('nemotron', 'all', 12), ('bitnet', 'all', 14),
    ('deepseek_v2', 'all', 16),                          # latent attention: kv_b_proj sees [B, 1, T, d]
    ('deepseek_v32', 'all', 22),                         # an indexer run under no_grad: Λ = 0, scores 0
    ('qwen2_moe', 'all', 16), ('llama4', 'all', 14),     # MoE models' dense layers: shared experts, attention
    ('bamba', 'all', 12), ('zamba', 'all', 15),          # Mamba in_proj/out_proj; Zamba's shared transformer block, called twice
    ('hrm_text', 'all', 32),                             # a layer called under no_grad too: its grad calls only
    ('Loop', 'all', 5), ('Tied', 'mlp', 4), ('InPlace', 'mlp', 4),   # a block run 3 times; tied copies; output scaled in place
    ('lora_gpt2', 'lora', 16), ('lora_llama', 'lora', 20),
]

@pytest.mark.parametrize('family,modules,n', CASES, ids=[f'{f}-{m}' for f, m, _ in CASES])
def test_ekfac_equals_the_oracle(family, modules, n):
    train, queries = data()
    err, names, _ = oracle(build(family), train, queries, modules)
    assert len(names) == n, names
    assert all(e <= TOL for e, _ in err.values()), err


def test_training_prompts_are_left_out_of_s_and_lambda_only():
    "Training sequences with unscored prompt tokens: their activations count in A (every token), their gradients are 0."
    train, queries = data(prompt=2)
    for family in ('gpt2', 'phi3'):
        err, _, _ = oracle(build(family), train, queries, 'all')
        assert all(e <= TOL for e, _ in err.values()), (family, err)


def test_the_oracle_sees_a_misplaced_bias_column(monkeypatch):
    "The oracle is not blind: with the bias coordinate moved to the first column of ā, A and the scores are far off."
    import influence_nb.kfac as kfac
    orig = kfac._call_acts
    def bias_first(layer, xs, B, T, mask, padded, drop=None):
        a = orig(layer, xs, B, T, mask, padded, drop)
        return torch.cat([a[..., -1:], a[..., :-1]], -1) if layer.bias else a
    monkeypatch.setattr(kfac, '_call_acts', bias_first)
    train, queries = data()
    err, _, _ = oracle(build('gpt2'), train, queries, 'all', batch_sizes=(1,))
    assert err['A'][0] > 0.5 and err['scores'][0] > 0.1, err


# ------------------------------------------------------------------------------------------------------------ findings

def test_adaptive_depth_factors_do_not_depend_on_the_batch():
    """A model whose depth depends on its input (`Halting` of session 23: sequence i runs block 0 1 + ids[0] % 3 times; in a
    batch the block runs the batch's maximum and `torch.where` keeps a halted sequence's state). Identity scores were right
    at any batch size, but EK-FAC's A pooled every call's rows, so the rows of calls a halted sequence throws away (real
    activations, zero gradient) entered A in a batch and not alone. What a user saw, with this file's data (block 0 runs
    3, 2, 1, 1 times): between batch_size=1 and batch_size=3, A of `blocks.0.mlp.0` moved by 9.6 %, its Λ by 22 %, its
    per-layer scores by 53 % and the total scores by 12 %, with no warning. Now a call whose output gradient is zero for a
    sequence at every token, where another call of the same layer has one, is left out of A for that sequence
    (`04_kfac`, `_discarded_calls`): the same factors and scores at any batch size, equal to the oracle's."""
    m = S23.Halting().double().eval()
    train, queries = data()
    err, names, said = oracle(m, train, queries, 'mlp')
    assert err['A'][0] <= TOL and err['scores'][0] <= TOL          # batch 1 is the oracle's (per-sequence) computation
    assert err['padded fit'][0] <= TOL and err['padded scores'][0] <= TOL, err
