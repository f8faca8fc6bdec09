"""Scan throughput and peak memory on the smallest bundled model, for growing corpus sizes.

    python benchmarks/scan.py                       # 10k, 30k, 100k sequences -> benchmarks/results/scan.json
    python benchmarks/scan.py --sizes 2000 4000     # quicker

EK-FAC factors are fitted once on 1,000 training sequences of `gpt2-s`. Each corpus size is a JSONL file of
texts made by cycling `data/corpus/train.jsonl`, scanned by `influence_nb.search.scan` in a *fresh process*
so that its peak resident memory (the kernel's VmHWM, reset just before the scan; `getrusage` max RSS
where that cannot be reset) belongs to that size alone. Wall time and the process's CPU time are both
recorded: on a shared machine wall time depends on the neighbours, CPU time much less. Time should grow
linearly with the corpus and memory should not grow at all. A size whose projected time (from the previous
size's throughput) exceeds `--max-minutes` is skipped and its projection recorded instead.
"""
from __future__ import annotations
import os, sys, json, time, argparse, platform, resource, subprocess, tempfile, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_mb() -> float:
    "Peak resident memory of this process so far, in MB (Linux reports KB)."
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != 'darwin' else r / 2**20


def _status_mb(key):
    import re
    try: return int(re.search(key + r':\s+(\d+)', Path('/proc/self/status').read_text()).group(1)) / 1024
    except (OSError, AttributeError): return None


def reset_peak() -> bool:
    "Reset the kernel's peak-RSS mark (VmHWM) so that it measures the scan alone (Linux >= 4.0)."
    try: Path('/proc/self/clear_refs').write_text('5'); return True
    except OSError: return False


def worker(a):
    "Scan one corpus file; print one JSON line with time and memory."
    import torch
    torch.set_num_threads(a.threads)
    from influence_nb.cli import load_bundled
    from influence_nb.ekfac import Factors
    from influence_nb.data import tokenize_pairs
    from influence_nb.search import scan
    model, tok = load_bundled(a.model)
    factors = Factors.load(Path(a.workdir)/'factors')
    qs = [json.loads(l) for l in (Path(a.workdir)/'queries.jsonl').read_text().splitlines()]
    queries = tokenize_pairs(tok, [(q['prompt'], q['completion']) for q in qs])
    peak_load = rss_mb()                      # loading transformers/the model peaks higher than the scan itself
    reset = reset_peak()
    before = _status_mb('VmRSS')
    t0, c0 = time.perf_counter(), time.process_time()
    res = scan(model, factors, queries, Path(a.workdir)/f'corpus_{a.n}.jsonl', k=a.k, tokenizer=tok,
               batch_size=a.batch_size, chunk_size=a.chunk_size, progress=False)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert res.n_scanned == a.n, (res.n_scanned, a.n)
    peak = _status_mb('VmHWM') if reset else rss_mb()
    print(json.dumps({'n': a.n, 'seconds': round(secs, 2), 'seqs_per_s': round(a.n / secs, 1), 'cpu_seconds': round(cpu, 2),
                      'seqs_per_cpu_s': round(a.n / cpu, 1),
                      'peak_rss_mb': round(peak, 1), 'rss_before_scan_mb': round(before, 1) if before else None,
                      'rss_after_scan_mb': round(_status_mb('VmRSS') or 0, 1), 'peak_rss_while_loading_mb': round(peak_load, 1),
                      'peak_is_scan_only': reset, 'top1_q0': int(res.indices[0, 0])}))


def main(a):
    import torch
    torch.set_num_threads(a.threads)
    from influence_nb.cli import load_bundled
    from influence_nb.data import tokenize, data_dir
    from influence_nb.ekfac import fit_factors
    work = Path(a.workdir or tempfile.mkdtemp(prefix='scan-bench-'))
    work.mkdir(parents=True, exist_ok=True)
    model, tok = load_bundled(a.model)
    lines = [l for l in (data_dir()/'corpus'/'train.jsonl').read_text().splitlines() if l.strip()]
    texts = [json.loads(l)['text'] for l in lines]
    fit_seqs = tokenize(tok, texts[:a.fit], max_length=model.config.n_positions)
    t0 = time.perf_counter()
    factors = fit_factors(model, fit_seqs, batch_size=16, seed=0, progress=False)
    fit_s = time.perf_counter() - t0
    factors.save(work/'factors')
    qs = [json.loads(l) for l in (data_dir()/'corpus'/'queries.jsonl').read_text().splitlines()]
    qs = [q for q in qs if q['kind'] == 'fact' and q['lang'] == 'en'][:a.queries]
    (work/'queries.jsonl').write_text(''.join(json.dumps({'prompt': q['prompt'], 'completion': q['completion']}) + '\n' for q in qs))
    mean_tokens = sum(len(s['input_ids']) for s in tokenize(tok, texts, max_length=model.config.n_positions)) / len(texts)
    out = {'benchmark': 'scan', 'model': a.model, 'parameters': sum(p.numel() for p in model.parameters()),
           'tracked_modules': factors.modules, 'fit_sequences': a.fit, 'fit_seconds': round(fit_s, 2),
           'n_queries': len(qs), 'k': a.k, 'query_rank': None, 'batch_size': a.batch_size, 'chunk_size': a.chunk_size,
           'corpus': f'data/corpus/train.jsonl ({len(lines)} records) cycled to each size; text records, tokenized during the scan',
           'mean_tokens_per_sequence': round(mean_tokens, 1), 'torch_threads': a.threads, 'cpu_count': os.cpu_count(),
           'python': platform.python_version(), 'torch': torch.__version__, 'platform': platform.platform(),
           'date': datetime.datetime.now().isoformat(timespec='seconds'), 'load_average_start': os.getloadavg(),
           'conditions': a.note, 'runs': []}
    print(f"factors fitted on {a.fit} sequences in {fit_s:.1f} s; work dir {work}", flush=True)
    for n in a.sizes:
        done = [r for r in out['runs'] if 'seconds' in r]
        if done:
            proj = done[-1]['seconds'] / done[-1]['n'] * n
            if proj > 60 * a.max_minutes:
                out['runs'].append({'n': n, 'skipped': True, 'projected_seconds': round(proj, 1),
                                    'why': f'projected {proj/60:.1f} min > --max-minutes {a.max_minutes}'})
                print(f"n={n}: skipped, projected {proj/60:.1f} min", flush=True); continue
        with open(work/f'corpus_{n}.jsonl', 'w') as f:
            for i in range(n): f.write(lines[i % len(lines)] + '\n')
        load0 = os.getloadavg()
        cmd = [sys.executable, __file__, '--worker', '--n', str(n), '--workdir', str(work), '--model', a.model, '--k', str(a.k),
               '--batch-size', str(a.batch_size), '--chunk-size', str(a.chunk_size), '--threads', str(a.threads)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0: sys.exit(f"worker for n={n} failed:\n{p.stderr[-3000:]}")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        r['load_average_during'] = [round((x + y) / 2, 2) for x, y in zip(load0, os.getloadavg())]
        out['runs'].append(r)
        (work/f'corpus_{n}.jsonl').unlink()
        print(json.dumps(r), flush=True)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1) + '\n')          # after every size: partial results survive
    out['load_average_end'] = os.getloadavg()
    Path(a.out).write_text(json.dumps(out, indent=1) + '\n')
    print(f"wrote {a.out}")


if __name__ == '__main__':
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--sizes', type=int, nargs='+', default=[10_000, 30_000, 100_000])
    p.add_argument('--model', default='gpt2-s')
    p.add_argument('--fit', type=int, default=1000, help='training sequences the factors are fitted on')
    p.add_argument('--queries', type=int, default=8)
    p.add_argument('--k', type=int, default=100)
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--chunk-size', type=int, default=1024)
    p.add_argument('--threads', type=int, default=1, help='torch threads per process')
    p.add_argument('--max-minutes', type=float, default=15, help='skip a size projected to take longer')
    p.add_argument('--workdir', default=None)
    p.add_argument('--note', default='', help='conditions to record (e.g. a shared CPU)')
    p.add_argument('--out', default=str(ROOT/'benchmarks'/'results'/'scan.json'))
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--n', type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    worker(a) if a.worker else main(a)
