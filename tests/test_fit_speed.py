"Issue 17 (FIT, session 6): the fitting passes' fast paths are the same maths; bfloat16 rotations and float32 eigh are options."
import pytest, torch
from unittest import mock
from torch.utils._python_dispatch import TorchDispatchMode
import influence_nb as inf
import randdata
from influence_nb import ekfac, kfac
from influence_nb.data import as_sequences
from influence_nb.modules import find_modules, tiny_model


def _llama(n_layers=1, seed=0):
    "A tiny Llama (gate_proj and up_proj share an input) and 12 sequences of 6–15 tokens."
    model = tiny_model('llama', layers=n_layers, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    lens = torch.randint(6, 16, (12,), generator=g).tolist()
    return model, as_sequences([torch.randint(1, 32, (n,), generator=g) for n in lens])



def test_seq_grads_is_the_token_sum(one_thread):
    "The batched product Dsᵀ ā equals Σ_t Ds_t ā_tᵀ, with J gradients per sequence too (float64, 1e-12)."
    torch.manual_seed(0)
    a, d = torch.randn(4, 7, 5, dtype=torch.float64), torch.randn(4, 7, 3, dtype=torch.float64)
    want = torch.zeros(4, 3, 5, dtype=torch.float64)
    for b in range(4):
        for t in range(7): want[b] += torch.outer(d[b, t], a[b, t])
    torch.testing.assert_close(ekfac.seq_grads(a, d), want, rtol=0, atol=1e-12)
    dj = torch.randn(4, 2, 7, 3, dtype=torch.float64)
    got = ekfac.seq_grads(a, dj)
    assert got.shape == (4, 2, 3, 5)
    for j in range(2): torch.testing.assert_close(got[:, j], ekfac.seq_grads(a, dj[:, j]), rtol=0, atol=1e-12)


@pytest.mark.parametrize('chunk', [1, 1 << 23])
def test_rotated_squares_add_into_the_running_sum(one_thread, chunk):
    "`_rotated_squares(..., out=)` adds Σ_n (Dsᵀ ā)_n² into `out` in place, whatever the chunking; bf16 inputs sum in float32."
    torch.manual_seed(1)
    a, d = torch.randn(5, 6, 4), torch.randn(5, 6, 3)
    out = torch.full((3, 4), 2.0)
    got = ekfac._rotated_squares(a, d, chunk_bytes=chunk, out=out)
    assert got is out
    torch.testing.assert_close(got, 2 + (ekfac.seq_grads(a.double(), d.double()) ** 2).sum(0).float(), rtol=1e-6, atol=1e-5)
    half = ekfac._rotated_squares(a.bfloat16(), d.bfloat16(), chunk_bytes=chunk)
    assert half.dtype == torch.float32
    ref = (ekfac.seq_grads(a.bfloat16().double(), d.bfloat16().double()) ** 2).sum(0)
    assert (half.double() - ref).norm() < 1e-2 * ref.norm()                 # products in bf16, sums in float32


def test_default_lambda_pass_is_unchanged_and_float32_only(one_thread):
    """fit_factors' Λ is `fit_lambda` with the defaults, bit for bit; with float32 factors no large op runs in float64 but
    the pseudo-labels' running sum over the vocabulary, which is float64 on purpose: a float32 one rounds differently on
    other CPUs and moved labels (`04_kfac`, session 20)."""
    model, seqs = _llama()
    f = inf.fit_factors(model, seqs, 'ekfac', batch_size=4, seed=2, progress=False, factor_dtype='float32')
    layers = find_modules(model, 'mlp')
    kw = dict(batch_size=4, seed=2, progress=False, dtype=torch.float32)

    class Float64Ops(TorchDispatchMode):
        "Record ops that touch a float64 tensor of more than 64 elements."
        def __init__(self): super().__init__(); self.seen, self.sampling = [], False
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            flat = [x for x in list(args) + list((kwargs or {}).values()) if isinstance(x, torch.Tensor)]
            if not self.sampling and any(x.dtype == torch.float64 and x.numel() > 64 for x in flat): self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    sample, calls = kfac._sample_labels, []
    def sampling(*a, **k):                                     # the label draw: its float64 sum is not counted
        mode.sampling = True; calls.append(1)
        try: return sample(*a, **k)
        finally: mode.sampling = False
    with Float64Ops() as mode, mock.patch.object(kfac, '_sample_labels', sampling):
        Lam = ekfac.fit_lambda(model, layers, seqs, f.tensors, **kw)
    assert calls, "fit_lambda drew no labels through kfac._sample_labels: the exemption above exempts nothing"
    assert mode.seen == [], mode.seen[:5]
    for n in Lam:
        assert torch.equal(Lam[n], f.tensors[n]['Lambda']), n


def test_bfloat16_rotations_agree_with_float32(one_thread):
    "rotate_dtype=torch.bfloat16: Λ within bf16 rounding of the float32 pass; EK-FAC scores at Pearson ≥ 0.9999."
    model, seqs = _llama(n_layers=2)
    f = inf.fit_factors(model, seqs, 'ekfac', batch_size=4, seed=2, progress=False, factor_dtype='float32')
    layers = find_modules(model, 'mlp')
    Lbf = ekfac.fit_lambda(model, layers, seqs, f.tensors, batch_size=4, seed=2, progress=False, dtype=torch.float32,
                           rotate_dtype=torch.bfloat16)
    for n, L in Lbf.items():
        ref = f.tensors[n]['Lambda']
        assert L.dtype == torch.float32
        assert (L - ref).norm() < 2e-2 * ref.norm(), n
        assert not torch.equal(L, ref), n                                     # the option did change the arithmetic
    fb = ekfac.Factors(**{**f.__dict__, 'tensors': {n: {**t, 'Lambda': Lbf[n]} for n, t in f.tensors.items()}})
    s, sb = (inf.pairwise_scores(model, x, seqs[:3], seqs, progress=False).total for x in (f, fb))
    assert randdata.pearson(s, sb) >= 0.9999


def test_float32_eigh_agrees_with_float64(one_thread):
    "eigh_dtype=torch.float32: orthonormal bases that reconstruct A and S; EK-FAC refit on them scores at Pearson ≥ 0.9999."
    model, seqs = _llama(n_layers=2)
    layers = find_modules(model, 'mlp')
    cov, _ = kfac.fit_covariances(model, layers, seqs, batch_size=4, seed=2, progress=False, dtype=torch.float32)
    e64, e32 = ekfac._fit_eigen(cov, torch.float32), ekfac._fit_eigen(cov, torch.float32, eigh_dtype=torch.float32)
    for n, t in e32.items():
        for k in 'AS':
            Q, lam, C = t['Q' + k].double(), t['l' + k].double(), cov[n][k].double()
            assert (Q.T @ Q - torch.eye(len(Q), dtype=torch.float64)).abs().max() < 1e-5
            assert ((Q * lam) @ Q.T - C).abs().max() < 1e-5 * C.abs().max()
            torch.testing.assert_close(lam, e64[n]['l' + k].double(), rtol=0, atol=1e-5 * float(lam.max()))
    assert e32[layers[0].name]['QA'] is e32[layers[1].name]['QA']           # gate_proj and up_proj still share A's basis
    base = inf.fit_factors(model, seqs, 'ekfac', batch_size=4, seed=2, progress=False, factor_dtype='float32')
    kw = dict(batch_size=4, seed=2, progress=False, dtype=torch.float32)
    tensors = {n: {**base.tensors[n], **{k: e32[n][k] for k in ('QA', 'lA', 'QS', 'lS')}} for n in e32}
    Lam = ekfac.fit_lambda(model, layers, seqs, tensors, **kw)
    f32 = ekfac.Factors(**{**base.__dict__, 'tensors': {n: {**t, 'Lambda': Lam[n]} for n, t in tensors.items()}})
    s, s32 = (inf.pairwise_scores(model, x, seqs[:3], seqs, progress=False).total for x in (base, f32))
    assert randdata.pearson(s, s32) >= 0.9999
