"""A realistic size on a CPU: a GPT-2-small-shaped model (124 M parameters, random init) through fit and scores.

Run from the repository root (see benchmarks/README.md, "The 124 M model"):

    python benchmarks/big.py --threads 2                 # 64 sequences × 256 tokens, 4 queries -> results/big.json
    python benchmarks/big.py --quick                     # the same code path on a 2-layer, d 128 model (< 1 min)

What it measures, each stage in a fresh subprocess as `perf.py` does (same warm-up, `malloc_trim` and VmHWM reset):
the floor (a forward+backward computing every parameter's gradient over the training sequences, same batches of 4), the
EK-FAC fit on every block's MLP (`c_fc`, `c_proj`: 24 layers), its saved artefact's size on disk, pairwise scores of the
4 queries against the 64 sequences (and with `--self`, self-influence of the 64). For each: wall and process CPU seconds,
the stage's peak memory above its start and the process's absolute peak resident memory (VmHWM, model included).
Targets (issue 17, item 7): absolute peak ≤ 6 GB, fit ≤ 3× the floor (process CPU time: the machine is shared). Batches
of 4: with 8, the floor alone peaks at 6.3 GB (the logits and their gradient, 8 × 256 × 50257 floats, several copies).
"""
from __future__ import annotations
import argparse, json, os, subprocess, sys, tempfile, time, warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import perf  # noqa: E402  (PeakMemory, summed_ce, warm_up, snapshot_engine: one measuring method for all benchmarks)

BIG = dict(name='gpt2-124M', layers=12, hidden=768, heads=12, vocab=50257, T=256, N=64, Q=4, batch=4, seed=0)
QUICK = dict(BIG, name='quick', layers=2, hidden=128, heads=2, vocab=4096, T=64, N=16, Q=2)
STAGES = ('floor', 'fit', 'scores')   # --self adds self-influence, --floor-end a second floor (load drift)
RESULTS = HERE / 'results' / 'big.json'


def build(spec):
    "`(model, train, queries)`: GPT2Config defaults at full size (random init, seeded), random token sequences."
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    import influence_nb as inf
    cfg = GPT2Config(n_layer=spec['layers'], n_embd=spec['hidden'], n_head=spec['heads'], vocab_size=spec['vocab'],
                     n_positions=max(1024, spec['T']), resid_pdrop=0., embd_pdrop=0., attn_pdrop=0.)
    torch.manual_seed(spec['seed'])
    model = GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(spec['seed'] + 1)
    train = [{'input_ids': r} for r in torch.randint(0, spec['vocab'], (spec['N'], spec['T']), generator=g)]
    queries = []
    for r in torch.randint(0, spec['vocab'], (spec['Q'], spec['T']), generator=g):   # completion = the second half
        lab = r.clone(); lab[:spec['T'] // 2] = -100
        queries.append({'input_ids': r, 'labels': lab})
    return model, inf.as_sequences(train, 'train'), inf.as_sequences(queries, 'queries')


def child(stage, spec, workdir, threads, factor_dtype, fit_options=False):
    "One stage in this fresh process; prints `RESULT:{json}`."
    import torch
    import influence_nb as inf
    torch.set_num_threads(threads)
    warnings.filterwarnings('ignore')
    model, train, queries = build(spec)
    perf.warm_up(model, train, spec['batch'])
    folder, res = Path(workdir) / 'factors', {'stage': stage}
    kw = dict(batch_size=spec['batch'], progress=False)
    if stage == 'floor': run = lambda: perf.stage_floor(model, train, queries, None, spec, workdir)
    elif stage == 'fit':
        extra = {} if factor_dtype is None else {'factor_dtype': factor_dtype}
        if fit_options: extra.update(eigh_dtype='float32', rotate_dtype='bfloat16')   # fit_factors' speed options (05_ekfac)
        run = lambda: inf.fit_factors(model, train, 'ekfac', modules='mlp', seed=0, **extra, **kw).save(folder)
    elif stage == 'scores': run = lambda: inf.pairwise_scores(model, inf.Factors.load(folder), queries, train, **kw)
    elif stage == 'self': run = lambda: inf.self_scores(model, inf.Factors.load(folder), train, **kw)
    else: raise ValueError(f'unknown stage {stage!r}')
    with perf.PeakMemory() as mem:
        c0, t0 = time.process_time(), time.perf_counter()
        run()
        res.update(seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0)
    res.update(peak_mb=round(mem.delta_mb, 1), rss_before_mb=round(mem.base_mb, 1), rss_peak_mb=round(mem.peak_mb, 1),
               memory_method=mem.method, threads=torch.get_num_threads(), load1=os.getloadavg()[0])
    if stage == 'fit':
        res['artefact_mb'] = round(sum(f.stat().st_size for f in folder.iterdir()) / 2**20, 1)
        res['factor_dtype'] = str(inf.Factors.load(folder).tensors[inf.Factors.load(folder).modules[0]]['QA'].dtype)
    print('RESULT:' + json.dumps(res), flush=True)


def run_child(stage, spec, workdir, threads, factor_dtype, fit_options=False):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE='1',
               TOKENIZERS_PARALLELISM='false', PYTHONWARNINGS='ignore')
    if perf.ENGINE: env['PYTHONPATH'] = perf.ENGINE['path'] + os.pathsep + env.get('PYTHONPATH', '')
    cmd = [sys.executable, str(Path(__file__).resolve()), '--child', stage, '--spec', json.dumps(spec),
           '--workdir', str(workdir), '--threads', str(threads)] + (['--factor-dtype', factor_dtype] if factor_dtype else []) + ['--fit-options'] * fit_options
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(ROOT))
    lines = [l for l in p.stdout.splitlines() if l.startswith('RESULT:')]
    if p.returncode != 0 or not lines: raise RuntimeError(f"stage {stage} failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(lines[-1][len('RESULT:'):])


def summary(stages):
    "Ratios to the floor (mean of the first and last floor), absolute peak memory, artefact size, targets."
    floors = [stages[k] for k in ('floor', 'floor_end') if k in stages]
    floor = {k: sum(f[k] for f in floors) / len(floors) for k in ('seconds', 'cpu_seconds')}
    out = {f'{st}/floor': {k: round(stages[st][k] / floor[k], 3) for k in floor} for st in ('fit', 'scores', 'self') if st in stages}
    out['peak_rss_gb'] = round(max(r['rss_peak_mb'] for r in stages.values()) / 1024, 2)
    out['artefact_mb'] = stages['fit']['artefact_mb']
    out['targets'] = {'peak <= 6 GB': out['peak_rss_gb'] <= 6, 'fit <= 3x floor (process CPU)': out['fit/floor']['cpu_seconds'] <= 3}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--quick', action='store_true', help='a 2-layer model: checks the code path in < 1 min, writes nothing')
    ap.add_argument('--factor-dtype', default=None, help="fit_factors(factor_dtype=...): 'float32' or 'float64' (default: the package's)")
    ap.add_argument('--fit-options', action='store_true', help="fit with eigh_dtype='float32' and rotate_dtype='bfloat16' (fit_factors options; see fit_options.py)")
    ap.add_argument('--self', action='store_true', help='also time self-influence of the training sequences')
    ap.add_argument('--floor-end', action='store_true', help='time the floor again at the end (ratios use the mean)')
    perf.add_run_args(ap, RESULTS)
    args = ap.parse_args()
    if args.child: return child(args.child, json.loads(args.spec), args.workdir, args.threads, args.factor_dtype, args.fit_options)
    spec = QUICK if args.quick else BIG
    out = args.out or (None if args.quick else str(RESULTS))
    stages = {}
    with tempfile.TemporaryDirectory(prefix='influence_nb-big-') as wd:
        engine = perf.snapshot_engine(wd)
        for i, st in enumerate(STAGES + ('self',) * args.self + ('floor',) * args.floor_end):
            key = 'floor_end' if st == 'floor' and i else st
            stages[key] = r = run_child(st, spec, wd, args.threads, args.factor_dtype, args.fit_options)
            perf._log(f"{spec['name']} {key:10s} wall {r['seconds']:8.1f} s  cpu {r['cpu_seconds']:8.1f} s  "
                      f"stage peak +{r['peak_mb']:7.0f} MB  process peak {r['rss_peak_mb']:7.0f} MB  load {r['load1']:.1f}"
                      + (f"  artefact {r['artefact_mb']} MB ({r['factor_dtype']})" if st == 'fit' else ''))
    res = {'spec': spec, 'meta': dict(perf.meta(args.threads), engine=engine, fit_options=args.fit_options), 'stages': stages,
           'summary': summary(stages)}
    print(json.dumps(res['summary'], indent=1))
    if out: perf.save_results(out, res)


if __name__ == '__main__':
    main()
