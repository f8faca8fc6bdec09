"""pyDVL 0.10.0's CG, LiSSA and direct solve against influence_nb's EK-FAC, EK-FAC + PCG and block CG, measured on the
same machine, problem and run: the digits MLP of `CONFIGS['solver']` (`influence_nb.evaluate.solver_benchmark`).

pyDVL is not a dependency of the project; install it (and the few packages it imports that the project's venv lacks)
into a folder of its own and point `--pydvl-site` at it:

    pip install --target /tmp/pydvl-site --no-deps pydvl==0.10.0 numcodecs==0.15.2 zarr==3.1.6 \
        pyDeprecate==0.14.0 more-itertools==11.2.1 dask==2026.8.0 distributed==2026.8.0 donfig==0.8.1.post1 \
        google-crc32c==1.9.0 locket==1.0.0 msgpack==1.2.4 partd==1.4.2 tblib==3.2.2 toolz==1.2.0 zict==3.0.0 \
        deprecated==1.3.1 wrapt==2.5.2
    python benchmarks/pydvl_solver.py --pydvl-site /tmp/pydvl-site          # 1 thread, 3 repeats

(pyDVL 0.10.0 declares numpy<2; the venv's numpy 2 was kept and `pydvl.influence.torch` ran with it.)

Conventions. Our score is `∇log p(q)ᵀ (G + λI)⁻¹ ∇log p(t)`, G the mean Gauss–Newton (true Fisher) over the 200 fit
points; since log p = -loss the two minus signs cancel: `∇ℓ_qᵀ (G + λI)⁻¹ ∇ℓ_t`. pyDVL's up-weighting influence is
`⟨(H + λI)⁻¹ ∇ℓ_q, ∇ℓ_t⟩` with H the Hessian of the mean loss over its data loader (one batch of all 200 fit points
here, so its per-batch averaging is the mean) and ℓ the per-example loss: the same factor (1) and, as measured, the same
sign; the only difference is Hessian against GGN. pyDVL's `SecondOrderMode.GAUSS_NEWTON` is the empirical Fisher
(mean ∇ℓ ∇ℓᵀ), not our GGN, so the Hessian (pyDVL's default) is what is timed. Truths: (a) our exact GGN influence
(`theory.exact_influence`, as `solver_benchmark`), (b) pyDVL's `DirectInfluence` (dense Hessian + solve).
Pearson is `evaluate.correlations`' mean per-query Pearson, after multiplying pyDVL's scores by the sign measured
between `DirectInfluence` and (a).
"""
import argparse, json, logging, os, platform, sys, time, warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / 'nbs' / 'results' / 'pydvl_solver.json'   # read by nbs/20_validation.ipynb


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--threads', type=int, default=1, help='torch.set_num_threads (default 1)')
    p.add_argument('--repeats', type=int, default=3, help='timed repeats of each chosen setting (>= 3 for the record)')
    p.add_argument('--pydvl-site', default=None, help='folder pyDVL was pip-installed into (--target); default: importable as is')
    p.add_argument('--out', default=str(OUT))
    p.add_argument('--target', type=float, default=None, help="Pearson to reach (default CONFIGS['solver']['target'])")
    p.add_argument('--smoke', action='store_true', help='tiny pyDVL sweeps (maxiter 5), to check the script runs')
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    if a.pydvl_site and Path(a.pydvl_site).is_dir():
        sys.path.insert(0, a.pydvl_site)
    sys.path.insert(0, str(ROOT))
    warnings.filterwarnings('ignore')                                   # pyDVL's deprecation and max-iteration notes
    logging.getLogger('pydvl').setLevel(logging.ERROR)
    import numpy as np, torch
    from torch.utils.data import DataLoader, TensorDataset
    import pydvl
    from pydvl.influence.torch import CgInfluence, LissaInfluence, DirectInfluence
    from pydvl.influence.torch.util import SecondOrderMode
    from influence_nb.evaluate import CONFIGS, mlp_setup, timed_scores, solver_methods, correlations, now
    from influence_nb.modules import find_modules, layer_param_names
    from influence_nb.theory import exact_influence

    torch.set_num_threads(a.threads)
    cfg = dict(CONFIGS['solver'])
    target = a.target if a.target is not None else cfg['target']
    lam, reps = cfg['damping'], a.repeats
    load_before = open('/proc/loadavg').read().split()
    t_run = time.perf_counter()
    say = lambda s: print(f"[{time.perf_counter() - t_run:7.1f} s] {s}", flush=True)

    su = mlp_setup('classification', cfg)
    model, fit, queries, net = su['model'], su['fit'], su['queries'], su['net']
    X, y, tr, te = su['X'], su['y'], su['tr'], su['te']
    names = layer_param_names(find_modules(model, 'all'))
    t0 = time.perf_counter()
    exact = exact_influence(model, names, queries, fit, lam)                   # (a) [n_q, n_fit], our GGN truth
    t_exact = time.perf_counter() - t0
    say(f"exact GGN influence {t_exact:.2f} s")

    # ---- pyDVL ----
    loss = torch.nn.functional.cross_entropy                                  # mean over the batch, as mlp_setup trains
    loader = DataLoader(TensorDataset(X[tr], y[tr]), batch_size=len(tr))       # one batch: pyDVL's mean = the mean loss

    def pydvl_run(kind, opts):
        t0 = time.perf_counter()
        cls = dict(direct=DirectInfluence, cg=CgInfluence, lissa=LissaInfluence)[kind]
        m = cls(net, loss, regularization=float(lam), **opts).fit(loader)
        S = m.influences(X[te], y[te], X[tr], y[tr])                           # up-weighting, [n_q, n_fit]
        return S.detach().double(), time.perf_counter() - t0

    direct_secs, direct = [], None
    for _ in range(reps):
        S, s = pydvl_run('direct', {})
        direct, direct_secs = S, direct_secs + [s]
    say(f"pyDVL DirectInfluence {min(direct_secs):.2f}-{max(direct_secs):.2f} s")
    sign = float(np.sign((direct * exact).sum()))                              # pyDVL's sign relative to ours
    scale = float((direct * exact).sum() / (exact * exact).sum())
    # the spectrum of pyDVL's system matrix H + λI (DirectSolveOperator adds λ in place)
    Hreg = list(DirectInfluence(net, loss, regularization=float(lam)).fit(loader).block_mapper
                .composable_block_dict.values())[0].op.matrix
    eH = torch.linalg.eigvalsh(Hreg) - lam
    hessian = dict(min=float(eH.min()), max=float(eH.max()), n_negative=int((eH < 0).sum()),
                   n_below_minus_damping=int((eH < -lam).sum()),
                   n_negative_with_damping=int((eH + lam < 0).sum()), smallest_with_damping=rnd(eH[:8] + lam))
    say(f"Hessian: min {hessian['min']:.3e}, max {hessian['max']:.3e}, H + λI has {hessian['n_negative_with_damping']} negative eigenvalues")

    def corr(S):
        S = sign * S
        return dict(vs_ggn=correlations({'m': S}, exact)['m'], vs_pydvl_direct=correlations({'m': S}, direct)['m'])

    gn = {}                                                                    # pyDVL's Gauss-Newton mode (empirical Fisher)
    try:
        S, s = pydvl_run('direct', dict(second_order_mode=SecondOrderMode.GAUSS_NEWTON))
        gn = dict(seconds=s, finite=bool(torch.isfinite(S).all()), **({} if not torch.isfinite(S).all() else corr(S)))
    except Exception as e:
        gn = dict(error=f"{type(e).__name__}: {e}")
    say(f"pyDVL DirectInfluence GAUSS_NEWTON: {gn}")

    sweeps = {   # family -> (kind, [(name, options)]) in increasing cost
        'pydvl-cg': ('cg', [(f'pydvl-cg-rtol{r:g}', dict(rtol=r, warn_on_max_iteration=False)) for r in (1e-1, 1e-2, 3e-3)]),
        'pydvl-cg-block': ('cg', [(f'pydvl-cg-block-rtol{r:g}', dict(rtol=r, solve_simultaneously=True,
                                                                    warn_on_max_iteration=False))
                                  for r in (1e-1, 3e-2, 1e-2, 3e-3, 1e-3)]),
        'pydvl-lissa': ('lissa', [(f'pydvl-lissa-s{s:g}-{k}', dict(scale=s, maxiter=k, rtol=0.0, warn_on_max_iteration=False))
                                  for s, k in ((0.5, 100), (0.5, 300), (0.5, 1000), (0.5, 3000), (10.0, 1000))]),
    }
    if a.smoke:
        sweeps = {f: (k, [(n, dict(o, maxiter=5)) for n, o in v[:2]]) for f, (k, v) in sweeps.items()}
    rows = {'pydvl-direct': dict(family='pydvl-direct', settings=dict(second_order_mode='HESSIAN'), seconds=direct_secs,
                                 **corr(direct))}
    for family, (kind, settings) in sweeps.items():
        chosen = {}
        for name, opts in settings:
            S, s = pydvl_run(kind, opts)
            r = rows[name] = dict(family=family, settings={k: v for k, v in opts.items() if k != 'warn_on_max_iteration'},
                                  seconds=[s], **corr(S))
            say(f"{name}: {s:.2f} s, Pearson vs GGN {r['vs_ggn']['pearson']:.6f}, vs pyDVL direct {r['vs_pydvl_direct']['pearson']:.6f}")
            for truth in ('vs_ggn', 'vs_pydvl_direct'):
                if truth not in chosen and r[truth]['pearson'] >= target:
                    chosen[truth] = name
            if len(chosen) == 2:
                break
        for name in set(chosen.values()):                                     # the cheapest reaching: repeats in all
            for _ in range(reps - 1):
                S, s = pydvl_run(kind, dict(sweeps[family][1])[name])
                rows[name]['seconds'].append(s)
            say(f"{name}: {min(rows[name]['seconds']):.2f}-{max(rows[name]['seconds']):.2f} s")

    # ---- ours ----
    meths = solver_methods(cfg)
    def ours(name):
        family, strategy, opts, fisher = meths[name]
        S, secs = timed_scores(model, fit, queries, strategy, lam, opts, cfg['batch_size'], cfg['seed'], reps, fisher=fisher)
        rows[name] = dict(family=family, settings=dict(strategy=strategy, solver=opts, fisher=fisher), seconds=secs,
                          vs_ggn=correlations({'m': S}, exact)['m'], vs_pydvl_direct=correlations({'m': S}, direct)['m'])
        say(f"{name}: {min(secs):.3f}-{max(secs):.3f} s, Pearson vs GGN {rows[name]['vs_ggn']['pearson']:.6f}")
        return rows[name]['vs_ggn']['pearson']
    ours('ekfac')
    for family in ('pcg', 'pcg-exact', 'cg'):                                  # the smallest setting reaching the target
        for name in [n for n, v in meths.items() if v[0] == family]:
            if ours(name) >= target:
                break

    for r in rows.values():
        r.update(seconds_min=min(r['seconds']), seconds_max=max(r['seconds']))
    def fastest(pred, truth='vs_ggn'):
        ok = [n for n, r in rows.items() if pred(n) and r[truth]['pearson'] >= target]
        return min(ok, key=lambda n: rows[n]['seconds_min']) if ok else None
    is_ours = lambda n: not n.startswith('pydvl')
    ratios = {}
    def ratio(key, num, den):
        ratios[key] = (dict(pydvl=num, ours=den, ratio=rows[num]['seconds_min'] / rows[den]['seconds_min'])
                       if num and den else dict(pydvl=num, ours=den, ratio=None))
    our_cg = fastest(lambda n: rows[n]['family'] == 'cg')
    our_best = fastest(is_ours)
    for truth in ('vs_pydvl_direct', 'vs_ggn'):
        ratio(f'pydvl_cg_{truth}_over_our_block_cg', fastest(lambda n: rows[n]['family'] == 'pydvl-cg', truth), our_cg)
        ratio(f'pydvl_cg_block_{truth}_over_our_block_cg', fastest(lambda n: rows[n]['family'] == 'pydvl-cg-block', truth), our_cg)
        ratio(f'pydvl_fastest_{truth}_over_our_fastest', fastest(lambda n: n.startswith('pydvl') and n != 'pydvl-direct', truth), our_best)
    ratio('pydvl_direct_over_our_fastest', 'pydvl-direct', our_best)
    best = {f: max((n for n in rows if rows[n]['family'] == f), key=lambda n: rows[n]['vs_ggn']['pearson'])
            for f in ('pydvl-cg', 'pydvl-cg-block', 'pydvl-lissa')}

    import sklearn, scipy
    res = dict(written=now(), what=__doc__.split('\n\n')[0], argv=sys.argv[1:], threads=a.threads, repeats=reps,
               machine=dict(platform=platform.platform(), processor=platform.processor(), python=platform.python_version(),
                            cpu_count=os.cpu_count(), cpu=_cpu(), loadavg_before=load_before,
                            loadavg_after=open('/proc/loadavg').read().split()),
               versions=dict(torch=torch.__version__, numpy=np.__version__, scipy=scipy.__version__,
                             sklearn=sklearn.__version__, pydvl=pydvl.__version__),
               config=cfg, model=su['name'], n_params=sum(p.numel() for p in net.parameters()), n_fit=len(tr),
               n_queries=len(te), target=target, exact_ggn_seconds=t_exact,
               conventions=dict(ours='∇ℓ_qᵀ (G + λI)⁻¹ ∇ℓ_t, G the mean GGN (true Fisher), ℓ per-example cross-entropy',
                                pydvl='⟨(H + λI)⁻¹ ∇ℓ_q, ∇ℓ_t⟩ (InfluenceMode.Up), H the Hessian of the mean loss over one '
                                      'batch of the 200 fit points, regularization = λ',
                                sign_pydvl_vs_ours=sign, lstsq_scale_pydvl_direct_on_ggn=scale,
                                pearson_note='pyDVL scores multiplied by sign_pydvl_vs_ours before Pearson'),
               hessian_spectrum=hessian, pydvl_direct_gauss_newton=gn, methods=rows, ratios=ratios,
               best_pearson_vs_ggn=best, total_seconds=time.perf_counter() - t_run)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1, default=str) + '\n')
    say(f"wrote {a.out}; ratios {json.dumps(ratios)}")
    return 0


def rnd(t, d=9):
    import numpy as np
    return np.round(np.asarray(t, dtype=np.float64), d).tolist()


def _cpu():
    try:
        return next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
    except Exception:
        return None


if __name__ == '__main__':
    sys.exit(main())
