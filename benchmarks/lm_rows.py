"""A language model's Gauss–Newton product on the scored rows, or on every position with the others masked? (`pbrf._Linearised`)

    python benchmarks/lm_rows.py            # -> results/lm_rows.json and a markdown table

On the language-model problem (c) of `20_validation` (a frozen GPT-2 trunk, one tracked layer, 2048-token vocabulary),
times one product `Jᵀ H J V` of the whole fit set for 5 columns, one thread, in one process, three ways:
- `boolean`: the rows picked as `logits[:, :-1][scored]` (the engine before session 9): the backward of the slice and of
  the boolean index each fill a `[B, T, V]` tensor with zeros and copy into it;
- `index_select`: the rows picked from the flat `[B·T, V]` logits by position (what `FlatProblem.rows` does now): one
  scatter into zeros in the backward;
- `all positions`: `rows(..., every=True)`, the unscored positions' rows of `p` set to zero so `H` ignores them (what
  `_Linearised` does now): no selection at all.
Process CPU seconds, best of `--repeats` with the three ways alternating; the three products are asserted equal.
"""
import argparse, json, sys, time, warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / 'benchmarks' / 'results' / 'lm_rows.json'


def pieces(fp, way):
    "Per fit batch: (h, p, Jᵀ·, J·), rows chosen `way`."
    import torch
    from torch.func import vjp
    out = []
    for b in fp.data.batches():
        if way == 'boolean':
            f = lambda th, b=b: fp.rows(th, b, every=True).reshape(*b.inputs['input_ids'].shape, -1)[:, :-1][b.scored]
        else: f = lambda th, b=b: fp.rows(th, b, every=way == 'all positions')
        h, jt = vjp(f, fp.theta_s)
        _, j_of = vjp(jt, torch.zeros_like(h))
        h = h.detach(); p = torch.softmax(h, -1)
        if way == 'all positions': p = torch.where(torch.nn.functional.pad(b.scored, (0, 1)).reshape(-1, 1), p, 0)
        out.append((h, p, jt, lambda v, j_of=j_of: j_of((v,))[0]))
    return out


def product(ps, V):
    "G V (unnormalised), column by column as the engine does for vocabulary-sized rows."
    import torch
    from influence_nb import pbrf
    return sum(torch.stack([jt(pbrf._out_hvp(h, j(v), 'ce', p))[0] for v in V]) for h, p, jt, j in ps)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--repeats', type=int, default=5)
    ap.add_argument('--out', default=str(OUT))
    a = ap.parse_args(argv)
    import torch
    torch.set_num_threads(1); warnings.filterwarnings('ignore')
    from influence_nb import evaluate as ev, pbrf
    from influence_nb.modules import find_modules, layer_param_names
    stored = json.loads((ROOT / 'nbs' / 'results' / 'validation.json').read_text())['problems']['lm']
    prob = ev.against_pbrf('lm', stored)
    model, names = prob['model'], layer_param_names(find_modules(prob['model'], prob['modules']))
    ways, rows = ('boolean', 'index_select', 'all positions'), []
    with pbrf.exact_mode(model):
        for bs in (8, 25):
            fp = pbrf.FlatProblem(model, names, prob['fit'], 'ce', bs)
            V = torch.randn(5, fp.P, dtype=fp.dtype, generator=torch.Generator().manual_seed(0))
            ps = {w: pieces(fp, w) for w in ways}
            ref = product(ps['boolean'], V)
            times = {w: [] for w in ways}
            for _ in range(a.repeats):
                for w in ways:
                    t = time.process_time(); r = product(ps[w], V); times[w].append(time.process_time() - t)
                    assert (r - ref).norm() <= 1e-5 * ref.norm(), f'{w} differs from boolean'
            best = {w: min(v) for w, v in times.items()}
            rows.append(dict(batch=bs, dtype=str(fp.dtype), columns=len(V), seconds=best, times=times,
                             boolean_over_all_positions=best['boolean'] / best['all positions'],
                             index_select_over_all_positions=best['index_select'] / best['all positions']))
    Path(a.out).write_text(json.dumps(dict(torch=torch.__version__, threads=1, timing='process CPU s, best of repeats',
                                           problem='lm (c)', rows=rows), indent=1) + '\n')
    print('| batch | boolean (s) | index_select (s) | all positions (s) | boolean / all | index_select / all |')
    print('|---|---|---|---|---|---|')
    for r in rows:
        s = r['seconds']
        print(f"| {r['batch']} | {s['boolean']:.3f} | {s['index_select']:.3f} | {s['all positions']:.3f} | "
              f"{r['boolean_over_all_positions']:.2f} | {r['index_select_over_all_positions']:.2f} |")
    return 0


if __name__ == '__main__':
    sys.exit(main())
