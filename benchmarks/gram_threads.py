"""Covariance updates by BLAS `syrk` or by torch's product, at 1 and 2 threads (04_kfac, `kfac.Gram`).

`syrk` does half the multiply-adds of `XᵀX`, but runs in scipy's BLAS beside torch's thread pool. This times W1's
whole EK-FAC fit with `Gram` forced to each path, alternating them within one process per thread count (a fresh
process for each count, `OMP_NUM_THREADS` set before torch loads). Run from the repository root:

    python benchmarks/gram_threads.py --repeats 2          # -> results/gram_threads.json
"""
from __future__ import annotations
import argparse, json, os, statistics, subprocess, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def child(threads:int, repeats:int) -> dict:
    "Fit W1 `repeats` times with each `Gram` path on `threads` threads: wall and process CPU seconds per fit."
    import torch, perf, influence_nb as inf
    from influence_nb import kfac
    torch.set_num_threads(threads)
    model, train, _, names = perf.build(perf.W1)
    perf.warm_up(model, train, perf.W1['batch'])
    init = kfac.Gram.__init__
    out = {'syrk': [], 'torch': []}
    for _ in range(repeats):
        for path in out:
            kfac.Gram.__init__ = lambda self, like, syrk=None, _p=path: init(self, like, syrk=_p == 'syrk')
            c0, t0 = time.process_time(), time.perf_counter()
            inf.fit_factors(model, train, modules=names, batch_size=perf.W1['batch'], progress=False)
            out[path].append({'wall': time.perf_counter() - t0, 'cpu': time.process_time() - c0})
    kfac.Gram.__init__ = init
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--repeats', type=int, default=2)
    ap.add_argument('--threads', default='1,2', help='comma-separated thread counts, one process each')
    ap.add_argument('--out', default=str(HERE / 'results' / 'gram_threads.json'))
    ap.add_argument('--child', type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child is not None:
        print('RESULT:' + json.dumps(child(a.child, a.repeats))); return
    import perf
    res = {'meta': {'date': time.strftime('%Y-%m-%dT%H:%M:%S'), 'workload': 'W1 EK-FAC fit (true Fisher)',
                    'loadavg_start': os.getloadavg()}, 'runs': {}}
    for k in [int(t) for t in a.threads.split(',')]:
        env = dict(os.environ, OMP_NUM_THREADS=str(k), HF_HUB_OFFLINE='1', PYTHONWARNINGS='ignore')
        p = subprocess.run([sys.executable, __file__, '--child', str(k), '--repeats', str(a.repeats)],
                           env=env, capture_output=True, text=True, check=True)
        runs = json.loads(next(l for l in p.stdout.splitlines() if l.startswith('RESULT:'))[7:])
        res['runs'][f'{k} thread(s)'] = runs
        med = {path: statistics.median(r['wall'] for r in rs) for path, rs in runs.items()}
        print(f"{k} thread(s): syrk {med['syrk']:.2f} s, torch {med['torch']:.2f} s wall (median of {a.repeats}); "
              f"torch / syrk = {med['torch'] / med['syrk']:.3f}", flush=True)
    res['meta']['loadavg_end'] = os.getloadavg()
    perf.save_results(a.out, res)


if __name__ == '__main__':
    main()
