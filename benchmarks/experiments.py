"""The paper's findings (Grosse et al. 2023, §5) measured on the bundled world corpus and gpt2-s/m/l.

    python benchmarks/experiments.py [--only NAME[,NAME]] [--sizes s,m,l] [--out PATH] [--refresh-verdicts]

A thin wrapper over `influence_nb.experiments.harness.main` (defined and tested in nbs/19_experiments.ipynb; each
experiment in nbs/23_word_order … nbs/28_tails) that writes to the repository's stored results,
nbs/results/experiments.json, unless `--out` says otherwise. Numbers are merged per experiment and per model size,
so a partial run never erases the others. The full run takes tens of CPU-minutes (mostly gpt2-l).
"""
import sys
from pathlib import Path

from influence_nb.experiments.harness import main

RESULTS = Path(__file__).resolve().parents[1]/'nbs'/'results'/'experiments.json'

if __name__ == '__main__':
    argv = sys.argv[1:]
    if not any(a == '--out' or a.startswith('--out=') for a in argv): argv += ['--out', str(RESULTS)]
    sys.exit(main(argv))
