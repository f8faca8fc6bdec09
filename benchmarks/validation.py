"""How close do influence approximations get to the PBRF, and do their scores predict retraining?

A command-line wrapper over `influence_nb.evaluate` (defined, explained and tested in nbs/20_validation.ipynb and
nbs/22_lds.ipynb). It writes nbs/results/validation.json by default, the file those notebooks read. Run from anywhere:

    python benchmarks/validation.py                               # every task (about an hour of CPU on one thread)
    python benchmarks/validation.py --tasks regression,lds        # some of them; the others in the file are kept
    python benchmarks/validation.py --out /tmp/v.json             # write elsewhere

The same as `python -m influence_nb.evaluate --out nbs/results/validation.json [--tasks ...]` after `pip install .`.
Tasks: regression, classification (MLPs on scikit-learn data), exact (needs the two MLPs in the file), lm (gpt2-s,
one layer), lds and lds_text (the linear datamodeling score), solver (EK-FAC + k preconditioned CG steps, CG and LiSSA
against exact influence on a digits MLP, timed min-max of 3 repeats: `python benchmarks/validation.py --tasks solver`,
about 3 minutes), pcg (EK-FAC + k preconditioned steps against the stored PBRF truth of the three problems) and fisher
(EK-FAC with the sampled and the exact Fisher against the PBRF truth of the two MLP problems, under a minute). PBRF solves and retrained models are cached per point
and per subset (`--cache`, default $INFLUENCE_NB_CACHE/validation), so an interrupted run resumes.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / 'nbs' / 'results' / 'validation.json'


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == '--out' or a.startswith('--out=') for a in argv) and not any(a in ('-h', '--help') for a in argv):
        argv += ['--out', str(RESULTS)]
    try:
        from influence_nb.evaluate import main as evaluate_main
    except ImportError:                                                 # a checkout without `pip install -e .`
        sys.path.insert(0, str(ROOT))
        from influence_nb.evaluate import main as evaluate_main
    return evaluate_main(argv)


if __name__ == '__main__':
    sys.exit(main())
