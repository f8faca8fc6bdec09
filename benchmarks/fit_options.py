"""What the fitting options buy: `fit_factors(..., eigh_dtype='float32', rotate_dtype='bfloat16')` (05_ekfac).

W1 fits through `fit_factors` with each combination of the two options; `--big` times the engine's own steps
(`ekfac._fit_eigen`, `ekfac.fit_lambda`), which take the same options. Run from the repository root:

    python benchmarks/fit_options.py --repeats 3            # W1: floor, fit (default and options), Kronfluence fit
    python benchmarks/fit_options.py --big --batches 4      # the 124 M model's fit pieces on 4 batches, extrapolated

W1: one process, one thread, after a warm-up batch; each repeat times the floor, every variant and (when installed)
Kronfluence's EK-FAC fit in turn, as process CPU time, so load drift falls on all of them; each variant's scores
against the default's (16 queries × 256 sequences) give the agreement. `--big`: the 124 M model's floor, one plain
pass, the covariance pass, the Λ pass (float32 and bfloat16 rotations) on `--batches` batches of 4 and the
eigendecompositions of one block, scaled to the full run's 16 batches and 12 blocks (an extrapolation, labelled so).
"""
from __future__ import annotations
import argparse, json, os, statistics, sys, tempfile, time, warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import perf  # noqa: E402

EIGH, BF16 = {'eigh_dtype': 'float32'}, {'rotate_dtype': 'bfloat16'}   # `fit_factors` keyword options
VARIANTS = {'default': {}, 'eigh32': EIGH, 'bf16': BF16, 'eigh32+bf16': {**EIGH, **BF16}}


def cpu(f):
    c = time.process_time(); out = f(); return time.process_time() - c, out


def w1(repeats, kron):
    import torch, influence_nb as inf
    model, train, queries, names = perf.build(perf.W1)
    perf.warm_up(model, train, perf.W1['batch'])
    runs, scores = [], {}
    with tempfile.TemporaryDirectory() as wd:
        an = perf.kron_setup(perf.build(perf.W1)[0], names, wd) if kron else None   # its own copy: Kronfluence wraps the layers
        for r in range(repeats):
            row = {'floor': cpu(lambda: perf.stage_floor(model, train, queries, names, perf.W1, wd))[0]}
            for v, opts in VARIANTS.items():
                row[v], f = cpu(lambda: inf.fit_factors(model, train, modules=names, batch_size=8, progress=False, **opts))
                if r == 0: scores[v] = inf.pairwise_scores(model, f, queries, train, progress=False).total
            if an is not None: row['kron'] = cpu(lambda: perf.kron_fit(an, train, 8, 'true'))[0]
            row['load1'] = os.getloadavg()[0]
            perf._log(' '.join(f'{k} {v:.2f}' for k, v in row.items()))
            runs.append(row)
    def stat(xs): return {'median': round(statistics.median(xs), 3), 'min': round(min(xs), 3), 'max': round(max(xs), 3)}
    out = {'runs': runs, 'cpu_seconds': {k: stat([r[k] for r in runs]) for k in runs[0]}, 'per_floor': {}, 'per_kron': {},
           'scores_vs_default': {v: {'pearson': round(perf.pearson(scores[v], scores['default']), 10),
                                     'max_rel': float((scores[v] - scores['default']).abs().max() / scores['default'].abs().max())}
                                 for v in VARIANTS if v != 'default'}}
    for v in VARIANTS:
        out['per_floor'][v] = stat([r[v] / r['floor'] for r in runs])
        if kron: out['per_kron'][v] = stat([r[v] / r['kron'] for r in runs])
    return out


def big(n_batches):
    import torch, influence_nb as inf, big as bigmod
    from influence_nb import ekfac, kfac
    from influence_nb.data import check_sequences
    spec = dict(bigmod.BIG, N=4 * n_batches)
    model, train, queries = bigmod.build(spec)
    perf.warm_up(model, train, 4)
    layers, seqs = inf.find_modules(model, 'mlp'), check_sequences(model, train, 'train')
    t = {'floor': cpu(lambda: perf.stage_floor(model, train, queries, None, spec, '/tmp'))[0],
         'one_pass': cpu(lambda: [None for _ in kfac.layer_passes(model, layers, seqs, 4, sample=True)])[0]}
    t['covariance_pass'], (cov, _) = cpu(lambda: kfac.fit_covariances(model, layers, seqs, batch_size=4, progress=False, dtype=torch.float32))
    block = {n: cov[n] for n in [layer.name for layer in layers][:2]}                     # c_fc, c_proj of block 0
    t['eigh64_one_block'] = cpu(lambda: ekfac._fit_eigen(block, torch.float32))[0]
    t['eigh32_one_block'] = cpu(lambda: ekfac._fit_eigen(block, torch.float32, eigh_dtype=torch.float32))[0]
    eig = ekfac._fit_eigen(cov, torch.float32)
    kw = dict(batch_size=4, progress=False, dtype=torch.float32)
    t['lambda_pass'] = cpu(lambda: ekfac.fit_lambda(model, layers, seqs, eig, **kw))[0]
    t['lambda_pass_bf16'] = cpu(lambda: ekfac.fit_lambda(model, layers, seqs, eig, rotate_dtype=torch.bfloat16, **kw))[0]
    return dict(extrapolate(t, n_batches), load1=os.getloadavg()[0])


def extrapolate(t, n_batches):
    "Scale the pieces timed on `n_batches` batches and one block to the full run (16 batches, 12 blocks)."
    k = 16 / n_batches
    est = {'floor': t['floor'] * k, 'covariance_pass': t['covariance_pass'] * k, 'lambda_pass': t['lambda_pass'] * k,
           'lambda_pass_bf16': t['lambda_pass_bf16'] * k, 'eigh64': t['eigh64_one_block'] * 12, 'eigh32': t['eigh32_one_block'] * 12}
    fits = {f'fit {v}': est['covariance_pass'] + est['eigh32' if 'eigh_dtype' in o else 'eigh64'] + est['lambda_pass_bf16' if 'rotate_dtype' in o else 'lambda_pass']
            for v, o in VARIANTS.items()}
    return {'measured_cpu_seconds': {k: round(v, 2) for k, v in t.items()}, 'batches_measured': n_batches,
            'extrapolated_cpu_seconds (16 batches, 12 blocks; fit without saving)': {k: round(v, 1) for k, v in {**est, **fits}.items()},
            'extrapolated_fit_per_floor': {v: round(fits[f'fit {v}'] / est['floor'], 2) for v in VARIANTS}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--big', action='store_true', help="the 124 M model's fit pieces, extrapolated")
    ap.add_argument('--batches', type=int, default=4, help='--big: batches of 4 sequences to time')
    ap.add_argument('--no-kron', action='store_true')
    ap.add_argument('--out', default=str(HERE / 'results' / 'fit_options.json'))
    args = ap.parse_args()
    import torch
    torch.set_num_threads(1)
    warnings.filterwarnings('ignore')
    key, res = ('big', big(args.batches)) if args.big else ('W1', w1(args.repeats, not args.no_kron and perf.kron_available()))
    res['meta'] = {k: v for k, v in perf.meta(1).items() if k not in ('memory_method', 'timing')}
    res['meta']['timing'] = 'process CPU time, one process, one thread' + ('' if args.big else ', stages interleaved per repeat')
    print(json.dumps(res, indent=1))
    path = Path(args.out)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[key] = res
    path.write_text(json.dumps(data, indent=1) + '\n')


if __name__ == '__main__':
    main()
