#!/usr/bin/env python3
"""Re-execute notebooks in reading order and store their outputs, so readers (and the docs site) see results.

    python .ci/execute.py                       # every notebook in nbs/, in order
    python .ci/execute.py nbs/23_word_order.ipynb nbs/09_viz.ipynb
    python .ci/execute.py --slow                # also run `#| slow` cells (the full experiments: hours of CPU)

Each notebook runs exactly as `nbdev-test` runs it (same kernel shim, cwd = nbs/, `notest` cells skipped; `slow`
cells skipped unless --slow), so what a reader sees is what CI checks. A skipped cell keeps the outputs it has
stored from its last full run. A notebook is written back only when every cell succeeded, then `nbdev-clean`ed
(execution metadata and counts dropped, outputs kept: `clear_all = false`). Seeds live in the notebooks; with one
thread and PYTHONHASHSEED fixed, reruns of the fast path reproduce tables and figures, so diffs show real changes.
A slow rerun recomputes the stored results, which agree with the old ones up to float rounding; fits on them (the power
laws of 23 and 28) can move in their last digits, and stored times change with the machine and what was cached.
"""
import argparse, hashlib, json, os, re, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT_MB = 3.0   # a notebook with outputs must stay under this size


STYLER_ID = re.compile(r'T_[0-9a-f]{5}(?![0-9a-f])')   # pandas Styler's random table id


def stable_ids(path: Path):
    "Replace pandas Styler's random table ids with ones derived from the table's content (no churn on rerun)."
    nb = json.loads(path.read_text())
    for cell in nb['cells']:
        for out in cell.get('outputs', []):
            html = out.get('data', {}).get('text/html')
            if not html: continue
            text = ''.join(html) if isinstance(html, list) else html
            ids = list(dict.fromkeys(STYLER_ID.findall(text)))
            if not ids: continue
            digest = hashlib.md5(STYLER_ID.sub('T_', text).encode()).hexdigest()[:6]
            for i, old in enumerate(ids): text = text.replace(old, f'T_{digest}{i}')
            out['data']['text/html'] = text.splitlines(keepends=True)
    for cell in nb['cells']:                      # warnings name files by this checkout's path: a reader sees it from the repo root
        for out in cell.get('outputs', []):
            if out.get('output_type') == 'stream':
                text = ''.join(out['text']) if isinstance(out['text'], list) else out['text']
                out['text'] = text.replace(str(ROOT) + '/', '').splitlines(keepends=True)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('notebooks', nargs='*', help='notebook paths (default: every nbs/*.ipynb in order)')
    ap.add_argument('--slow', action='store_true', help='also run cells flagged `#| slow`')
    ap.add_argument('--timeout', type=int, default=1800, help='seconds per cell')
    args = ap.parse_args(argv)
    if os.environ.get('PYTHONHASHSEED') != '0':   # hash seeds are fixed at interpreter start: restart with it set
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, 'PYTHONHASHSEED': '0'})
    for k, v in dict(HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', HF_DATASETS_OFFLINE='1', MPLBACKEND='Agg',
                     OMP_NUM_THREADS='1', MKL_NUM_THREADS='1',
                     HF_HUB_DISABLE_PROGRESS_BARS='1', TRANSFORMERS_VERBOSITY='error',   # no library bars or advisories in stored outputs
                     ).items():
        os.environ.setdefault(k, v)
    from nbdev.test import test_nb          # imported after the environment is set
    from nbdev.clean import nbdev_clean
    nbs = [Path(p).resolve() for p in args.notebooks] or sorted((ROOT/'nbs').glob('*.ipynb'))
    missing = [str(p) for p in nbs if not p.exists() or p.suffix != '.ipynb']
    if missing: ap.error(f'not notebooks: {missing}')
    flags = ['notest'] + ([] if args.slow else ['slow'])
    if args.slow: os.environ['INFLUENCE_NB_SLOW'] = '1'   # a slow cell runs only with it (`data.run_slow_cell`): Jupyter has no flags
    failed = []
    for nb in nbs:
        t0 = time.time()
        ok, _ = test_nb(nb, skip_flags=flags, save=True, cell_timeout=args.timeout)
        if ok: stable_ids(nb); nbdev_clean(fname=str(nb))
        mb = nb.stat().st_size / 2**20
        status = 'ok' if ok else 'FAILED (left unchanged)'
        if ok and mb > LIMIT_MB: status = f'TOO BIG ({mb:.1f} MB > {LIMIT_MB} MB)'; ok = False
        print(f'{nb.name:28s} {time.time() - t0:7.1f} s  {mb:5.2f} MB  {status}', flush=True)
        if not ok: failed.append(nb.name)
    if failed: print(f'failed: {", ".join(failed)}', file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
