"""Ready for a GPU: CUDA results checked against CPU float64, and the 124 M model timed, wherever CUDA is present.

    python benchmarks/gpu.py                  # on a machine with CUDA: checks, then times gpt2-124M (benchmarks/big.py's)
    python benchmarks/gpu.py --device cpu     # the same checks with CPU float32 / bf16 in place of CUDA (a dry run)

Without CUDA it says so and exits 0. Checks, on a small GPT-2 whose weights are rounded to bf16 (so float64, float32
and bf16 copies hold the same weights and the same factors fit all three):
- factors fitted on the device (float32 model, empirical Fisher) against those fitted on the CPU in float64: the
  covariances `A`, `S`, and the scores they give;
- pairwise and self scores of the float32 model on the device, with the CPU float64 factors (they move as needed),
  against the CPU float64 scores: float32 rounding only, so the largest difference must stay below 1e-3 of the
  largest score;
- the same with the model in bf16 on the device: float32 scores, Pearson ≥ 0.999 with the float64 ones.
Timing: floor (forward+backward), fit, pairwise scores (4 queries) and self scores of the 124 M model, 64 × 256
tokens, with `torch.cuda.synchronize` around each stage and the peak allocated device memory.
"""
from __future__ import annotations
import argparse, copy, json, sys, time, warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def small_problem(seed=0):
    "A 2-layer GPT-2 (d 64) with bf16-representable float64 weights, 24 training sequences, 4 queries."
    import torch
    import influence_nb as inf
    model = inf.tiny_model('gpt2', vocab=64, hidden=64, layers=2, ctx=64, seed=seed).to(torch.bfloat16).double()
    g = torch.Generator().manual_seed(seed)
    train = inf.as_sequences([torch.randint(1, 64, (int(n),), generator=g) for n in torch.randint(16, 48, (24,), generator=g)])
    queries = inf.as_sequences([{'input_ids': torch.randint(1, 64, (12,), generator=g), 'labels': [-100] * 8 + [5, 9, 2, 7]}
                                for _ in range(4)])
    return model, train, queries


def rel_max(a, b):
    return float((a.double().cpu() - b.double().cpu()).abs().max() / b.double().abs().max())


def check(device):
    "Device results against CPU float64; returns a dict of measured errors and whether each is within its bound."
    import torch
    import influence_nb as inf
    import perf
    ref_model, train, queries = small_problem()
    kw = dict(progress=False, batch_size=8)
    f64 = inf.fit_factors(ref_model, train, 'ekfac', fisher='empirical', **kw)   # data labels: no sampling to differ
    ref = inf.pairwise_scores(ref_model, f64, queries, train, **kw).total
    ref_self = inf.self_scores(ref_model, f64, train, **kw)
    out = {}
    m32 = copy.deepcopy(ref_model).float().to(device)
    f_dev = inf.fit_factors(m32, train, 'ekfac', fisher='empirical', **kw)
    out['fit on device: covariances A, S max rel. error'] = (max(   # basis-free (eigenvectors of near-equal eigenvalues may turn)
        float((f_dev.tensors[n][k].double() - f64.tensors[n][k]).norm() / f64.tensors[n][k].norm()) for n in f64.modules for k in 'AS'), 1e-4)
    out['scores with device-fitted factors vs float64: max rel. difference'] = (
        rel_max(inf.pairwise_scores(ref_model, f_dev, queries, train, **kw).total, ref), 1e-3)
    s32 = inf.pairwise_scores(m32, f64, queries, train, **kw).total
    out['float32 scores vs float64: max rel. difference'] = (rel_max(s32, ref), 1e-3)
    out['float32 self-scores vs float64: max rel. difference'] = (rel_max(inf.self_scores(m32, f64, train, **kw), ref_self), 1e-3)
    mbf = copy.deepcopy(ref_model).to(torch.bfloat16).to(device)
    sbf = inf.pairwise_scores(mbf, f64, queries, train, **kw).total
    if sbf.dtype != torch.float32: raise AssertionError(f'bf16 model: scores in {sbf.dtype}, expected float32')
    out['bf16 scores vs float64: 1 - Pearson'] = (1 - perf.pearson(sbf, ref), 1e-3)
    out['bf16 self-scores vs float64: 1 - Pearson'] = (1 - perf.pearson(inf.self_scores(mbf, f64, train, **kw), ref_self), 1e-3)
    return {k: {'value': v, 'bound': b, 'ok': v <= b} for k, (v, b) in out.items()}


def time_big(device, threads):
    "Wall seconds and peak device memory of each stage of the 124 M model on `device`."
    import torch
    import influence_nb as inf
    import big, perf
    torch.set_num_threads(threads)
    model, train, queries = big.build(big.BIG)
    model.to(device)
    perf.warm_up(model, train, big.BIG['batch'])
    kw = dict(batch_size=big.BIG['batch'], progress=False)
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    res, state = {}, {}
    stages = {'floor': lambda: perf.stage_floor(model, train, queries, None, big.BIG, None),
              'fit': lambda: state.update(f=inf.fit_factors(model, train, 'ekfac', seed=0, **kw)),
              'scores': lambda: inf.pairwise_scores(model, state['f'], queries, train, **kw),
              'self': lambda: inf.self_scores(model, state['f'], train, **kw)}
    for name, run in stages.items():
        if device.startswith('cuda'): torch.cuda.reset_peak_memory_stats()
        sync(); t0 = time.perf_counter(); run(); sync()
        res[name] = {'seconds': round(time.perf_counter() - t0, 2)}
        if device.startswith('cuda'): res[name]['peak_device_gb'] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        print(f"  124M {name:7s} {res[name]}", flush=True)
    for st in ('fit', 'scores', 'self'): res[st]['x_floor'] = round(res[st]['seconds'] / res['floor']['seconds'], 2)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--device', default='cuda', help="'cuda' (default) or 'cpu' for a dry run of the checks")
    ap.add_argument('--no-timing', action='store_true', help='only the checks against CPU float64')
    ap.add_argument('--threads', type=int, default=2, help='CPU threads (the CPU side of the checks)')
    ap.add_argument('--out', default=None, help='write the results as JSON here')
    args = ap.parse_args()
    import torch
    warnings.filterwarnings('ignore')
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        print('No CUDA device is available on this machine: nothing to check or time (run with --device cpu for a dry run).')
        return 0
    torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(args.device) if args.device.startswith('cuda') else 'cpu'
    print(f'device: {args.device} ({name}), torch {torch.__version__}')
    res = {'device': name, 'checks': check(args.device)}
    for k, v in res['checks'].items(): print(f"  {'ok ' if v['ok'] else 'BAD'} {k}: {v['value']:.2e} (bound {v['bound']:.0e})")
    if not args.no_timing and args.device.startswith('cuda'): res['timing_124M'] = time_big(args.device, args.threads)
    if args.out: Path(args.out).write_text(json.dumps(res, indent=1))
    return 0 if all(v['ok'] for v in res['checks'].values()) else 1


if __name__ == '__main__':
    sys.exit(main())
