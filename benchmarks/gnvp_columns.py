"""One Gauss–Newton product for k columns: one vmapped call, or a loop over the columns? (`pbrf._Linearised`)

    python benchmarks/gnvp_columns.py            # -> results/gnvp_columns.json and a markdown table

Times, on one thread and in one process, the product `Jᵀ H J V` of one linearised fit batch both ways, for the
digits MLP of the `solver` task (10 outputs per row) and the language-model problem (c) of `20_validation`
(a frozen GPT-2 trunk, 2048-token vocabulary per row), at several batch sizes and column counts. Each row reports
process CPU seconds (best of `--repeats`, the two ways alternating), the tangent size `columns × rows × d_out`, and
which way `pbrf.VMAP_MAX` picks. The two results are asserted equal.
"""
import argparse, json, sys, time, warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / 'benchmarks' / 'results' / 'gnvp_columns.json'


def _best(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.process_time(); r = fn(); times.append(time.process_time() - t)
    return min(times), r


def rows_for(problem, bs, cols, repeats):
    "Both ways on the first fit batch of `problem` at batch size `bs`, for `cols` random columns."
    import torch
    from torch.func import vjp, vmap
    from influence_nb import pbrf
    model, names, fit = problem
    fp = pbrf.FlatProblem(model, names, fit, 'ce', bs, torch.float64)
    b = next(iter(fp.data.batches()))
    h, jt = vjp(lambda th: fp.rows(th, b), fp.theta_s)
    _, j_of = vjp(jt, torch.zeros_like(h))
    j, p = (lambda v: j_of((v,))[0]), torch.softmax(h, -1)
    out = []
    for k in cols:
        V = torch.randn(k, fp.P, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
        batched = lambda: vmap(jt)(pbrf._out_hvp(h, vmap(j)(V), 'ce', p))[0]
        looped = lambda: torch.stack([jt(pbrf._out_hvp(h, j(v), 'ce', p))[0] for v in V])
        tv, rv = _best(batched, repeats); tl, rl = _best(looped, repeats)
        assert (rv - rl).norm() <= 1e-10 * rl.norm(), 'the two products differ'
        entries = k * h.numel()
        out.append(dict(batch=bs, rows=h.shape[0], d_out=h.shape[1], columns=k, tangent_entries=entries,
                        vmap_s=tv, loop_s=tl, loop_over_vmap=tl / tv, faster='loop' if tl < tv else 'vmap',
                        rule_picks='vmap' if entries <= pbrf.VMAP_MAX else 'loop'))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--out', default=str(OUT))
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(1); warnings.filterwarnings('ignore')
    from influence_nb import evaluate as ev, pbrf
    from influence_nb.modules import find_modules, layer_param_names
    su = ev.mlp_setup('classification', ev.CONFIGS['solver'])
    digits = (su['model'], layer_param_names(find_modules(su['model'], 'all')), su['fit'])
    stored = json.loads((ROOT / 'nbs' / 'results' / 'validation.json').read_text())['problems']['lm']
    lm = ev.against_pbrf('lm', stored)
    lm = (lm['model'], layer_param_names(find_modules(lm['model'], lm['modules'])), lm['fit'])
    res = [dict(problem='digits', **r) for bs in (25, 200) for r in rows_for(digits, bs, (5, 20), a.repeats)]
    res += [dict(problem='lm (c)', **r) for bs in (1, 3, 8, 25) for r in rows_for(lm, bs, (5, 20), a.repeats)]
    Path(a.out).write_text(json.dumps(dict(vmap_max=pbrf.VMAP_MAX, torch=torch.__version__, threads=1,
                                           timing='process CPU s, best of repeats', rows=res), indent=1) + '\n')
    print('| problem | batch | rows × d_out | columns | vmap (ms) | loop (ms) | loop / vmap | rule picks |')
    print('|---|---|---|---|---|---|---|---|')
    for r in res:
        print(f"| {r['problem']} | {r['batch']} | {r['rows']} × {r['d_out']} | {r['columns']} | {r['vmap_s'] * 1e3:.1f} | "
              f"{r['loop_s'] * 1e3:.1f} | {r['loop_over_vmap']:.2f} | {r['rule_picks']} |")
    wrong = [r for r in res if r['rule_picks'] != r['faster'] and abs(1 - r['loop_over_vmap']) > 0.1]
    print(f"rule VMAP_MAX = {pbrf.VMAP_MAX:,} entries: {len(res) - len(wrong)} of {len(res)} cases on the faster side or within 10 %")
    return 0


if __name__ == '__main__':
    sys.exit(main())
