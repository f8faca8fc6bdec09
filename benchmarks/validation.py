"""How close do influence approximations get to the PBRF, and do their scores predict retraining?

Reproduces every number of nbs/20_validation.ipynb and nbs/22_lds.ipynb into one file,
benchmarks/results/validation.json. Run from the repository root:

    python benchmarks/validation.py                               # every task (about an hour of CPU on one thread)
    python benchmarks/validation.py --tasks regression,lds        # some of them; the others in the file are kept
    python benchmarks/validation.py --out /tmp/v.json             # write elsewhere

Problems (Grosse et al. 2023, Figs. 6-7, at small scale; and the linear datamodeling score of Park et al. 2023):
  regression      a tanh MLP on scikit-learn's bundled diabetes data (squared error, through `RegressorAsLM`)
  classification  a tanh MLP on scikit-learn's bundled 8x8 digits (softmax cross-entropy, through `ClassifierAsLM`)
  lm              the bundled gpt2-s, fact queries, one tracked MLP layer (the PBRF solved for all 100 points)
  exact           for the two MLPs: exact damped-GGN influence, full and layer-block-diagonal, against the PBRF
                  (rebuilds each MLP from its seed; needs the MLP problems in the file)
  lds             gpt2-s fine-tuned on random half-subsets of a training sample; Spearman of the retrained models'
                  completion log-probabilities against each method's summed scores
  lds_text        the same with held-out validation records as queries (whole-record log-probability) and a
                  random sample with nothing planted

Every influence method goes through the same code path, `inf.fit_factors(strategy=...)` + `inf.pairwise_scores`
(strategies ekfac, kfac, diagonal, identity = gradient dot product, lissa, cg), at one absolute damping per problem.
The PBRF ground truth is `influence_nb.pbrf.pbrf_scores` (central differences of proximal Bregman solves). Each
training point's PBRF result is appended to benchmarks/results/.cache/pbrf_<task>.jsonl as soon as it is solved, so an
interrupted run resumes where it stopped (a line is used only if the model, the data and every setting that
changes the answer are the same).
Wall times are seconds on one CPU thread (`torch.set_num_threads(1)`); on a shared machine only ratios are meaningful.
"""
from __future__ import annotations
import argparse, copy, datetime, json, os, platform, random, sys, tempfile, time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from scipy.stats import pearsonr, spearmanr

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / 'results' / 'validation.json'
CACHE = HERE / 'results' / '.cache'                                    # per-point PBRF results of unfinished runs (git-ignored)
sys.path.insert(0, str(ROOT))                                          # run from a checkout without installing

import influence_nb as inf                                             # noqa: E402
from influence_nb.modules import find_modules                          # noqa: E402
from influence_nb import pbrf                                          # noqa: E402

SCHEMA_VERSION = 1
PROBLEMS = ('regression', 'classification', 'lm')
TASKS = ('regression', 'classification', 'exact', 'lm', 'lds', 'lds_text')   # 'exact' needs the two MLP problems in the file
LDS_TASKS = ('lds', 'lds_text')

# The configurations. Each problem's dict is stored with its results, so the file says how it was made.
SAMPLED = ('ekfac', dict(fisher_samples=100))                          # EK-FAC with 100 label draws per token
MLP_METHODS = {'ekfac': ('ekfac', None), 'ekfac-s100': SAMPLED, 'kfac': ('kfac', None), 'diagonal': ('diagonal', None),
               'identity': ('identity', None),
               'lissa-100': ('lissa', dict(depth=100, lissa_batch=64)),
               'lissa-1000': ('lissa', dict(depth=1000, lissa_batch=64)),
               'cg': ('cg', dict(tol=1e-6))}
CONFIGS = {
    'regression': dict(dataset='sklearn diabetes', hidden=32, n_fit=300, n_points=100, n_queries=10, steps=300, lr=3e-3,
                       damping_rel=1.0, sweep_rel=[0.1, 1.0, 10.0], eps=1e-5, rtol=1e-8, seed=0),
    'classification': dict(dataset='sklearn digits', hidden=32, n_fit=100, n_points=100, n_queries=10, steps=300, lr=3e-3,
                           damping_rel=10.0, sweep_rel=[1.0, 10.0, 100.0], eps=1e-5, rtol=1e-8, seed=0,
                           methods={'ekfac': ('ekfac', None), 'ekfac-s100': SAMPLED, 'kfac': ('kfac', None),
                                    'diagonal': ('diagonal', None), 'identity': ('identity', None), 'lissa-100': ('lissa', dict(depth=100, lissa_batch=64)),
                                    'lissa-300': ('lissa', dict(depth=300, lissa_batch=64)), 'cg': ('cg', dict(tol=1e-6))}),
    'lm': dict(model='gpt2-s', layer='transformer.h.1.mlp.c_proj', n_queries=5, per_fact=4, n_fit=100,
               logp_window=[-3.0, -0.3], max_length=64, damping_rel=10.0, eps=1e-5, rtol=1e-5, batch_size=25, seed=0,
               methods={'ekfac': ('ekfac', None), 'ekfac-s100': SAMPLED, 'kfac': ('kfac', None), 'diagonal': ('diagonal', None),
                        'identity': ('identity', None), 'lissa-100': ('lissa', dict(depth=100, lissa_batch=10)),
                        'cg': ('cg', dict(tol=1e-6))}),
    'lds': dict(model='gpt2-s', n_queries=25, records_per_fact=4, n_sample=500, n_subsets=50, alpha=0.5, seeds=[0],
                epochs=3, lr=3e-4, batch_size=32, weight_decay=0.0, selection_seed=0, subset_seed=1,
                logp_window=[-3.0, -0.3], damping=None, fisher='true',
                methods={'ekfac': ('ekfac', 'mlp'), 'kfac': ('kfac', 'mlp'), 'diagonal': ('diagonal', 'mlp'),
                         'identity': ('identity', 'mlp'), 'ekfac (all layers)': ('ekfac', 'all')}),
}
# The same LDS with a benchmark closer to Kronfluence's (GPT-2 on WikiText-2): no planted records, and each query is a
# whole held-out validation record, measured by its total log-probability.
CONFIGS['lds_text'] = dict(CONFIGS['lds'], queries='validation records', records_per_fact=0, logp_window=None)

now = lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
rnd = lambda t, d=9: np.round(np.asarray(t, dtype=np.float64), d).tolist()


# ---------------------------------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------------------------------
def correlations(scores: dict, truth) -> dict:
    "Pearson and Spearman of each method's scores `[n_q, n_points]` with `truth`: per query (averaged) and pooled."
    t = np.asarray(truth, dtype=np.float64)
    out = {}
    for name, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        if s.shape != t.shape: raise ValueError(f"scores of {name!r} have shape {s.shape}, the truth {t.shape}")
        out[name] = dict(pearson=float(np.mean([pearsonr(s[q], t[q])[0] for q in range(len(t))])),
                         spearman=float(np.mean([spearmanr(s[q], t[q])[0] for q in range(len(t))])),
                         pearson_pooled=float(pearsonr(s.ravel(), t.ravel())[0]),
                         spearman_pooled=float(spearmanr(s.ravel(), t.ravel())[0]))
    return out


def lds(actual, predicted) -> np.ndarray:
    "Per-query linear datamodeling score: Spearman across subsets of `actual` [J, Q] against `predicted` [J, Q]."
    actual, predicted = np.asarray(actual, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    return np.array([spearmanr(actual[:, q], predicted[:, q])[0] for q in range(actual.shape[1])])


def mean_eigenvalue(factors) -> float:
    "Mean EK-FAC eigenvalue over all tracked layers: an estimate of the mean diagonal of G (trace / size)."
    return float(torch.cat([factors.eigenvalues(n).flatten() for n in factors.modules]).mean())


def influence_methods(model, fit, points, queries, modules, methods: dict, damping_rel: float, batch_size=64, seed=0,
                      fit_ekfac=None):
    "Scores `{name: [n_q, n_points]}`, wall seconds `{name: s}` and λ = damping_rel × mean EK-FAC eigenvalue."
    train = [fit[i] for i in points]
    t0 = time.perf_counter()
    f_ek = fit_ekfac or inf.fit_factors(model, fit, 'ekfac', modules=modules, batch_size=batch_size, seed=seed,
                                        progress=False)
    t_ek = time.perf_counter() - t0
    lam = damping_rel * mean_eigenvalue(f_ek)
    scores, secs = {}, {}
    for name, (strategy, opts) in methods.items():
        t0 = time.perf_counter()
        plain = strategy == 'ekfac' and not opts                          # the EK-FAC fitted above
        kw = dict(fisher_samples=opts['fisher_samples']) if opts and 'fisher_samples' in opts else dict(solver=opts)
        f = f_ek if plain else inf.fit_factors(model, fit, strategy, modules=modules, batch_size=batch_size, seed=seed,
                                               progress=False, **kw)
        scores[name] = inf.pairwise_scores(model, f, queries, train, damping=lam, batch_size=batch_size,
                                           progress=False).total.double()
        secs[name] = time.perf_counter() - t0 + (t_ek if plain else 0.)
    return scores, secs, lam, f_ek


def pbrf_scores(model, param_names, fit, points, queries, lam, eps, rtol, batch_size, log=None, cache=None):
    """PBRF influence `[n_q, n_points]` of each point on each query (`influence_nb.pbrf.pbrf_scores`: two solves per
    point), the seconds of all solves, and a record of their outcomes. With `cache` (a JSON-lines file) each point is
    appended as soon as it is solved and an interrupted run resumes from there; the seconds include the earlier runs'."""
    r = pbrf.pbrf_scores(model, param_names, fit, queries, lam, points=points, eps=eps, rtol=rtol, batch_size=batch_size,
                         loss=getattr(model, 'pbrf_loss', 'ce'), cache=cache, progress=log is not None)
    return r.influence, r.seconds, r.summary()


def method_table(methods, scores, secs, truth_name):
    corr = correlations({k: v for k, v in scores.items()}, scores[truth_name])
    return {name: dict(strategy=methods[name][0] if name in methods else 'pbrf',
                       solver=methods[name][1] if name in methods else None,
                       seconds=float(secs[name]), **corr[name]) for name in scores}


# ---------------------------------------------------------------------------------------------------------------
# (a), (b): MLPs on scikit-learn's bundled data
# ---------------------------------------------------------------------------------------------------------------
def mlp_setup(task, cfg):
    "Train the MLP of `task` (deterministic given `cfg`); the wrapped model, its data and the scored points."
    from sklearn.datasets import load_diabetes, load_digits
    if task == 'regression':
        X, y = load_diabetes(return_X_y=True)
        X, y = torch.tensor((X - X.mean(0)) / X.std(0)), torch.tensor((y - y.mean()) / y.std())[:, None]
        d_out = 1
    else:
        X, y = load_digits(return_X_y=True)
        X, y = torch.tensor(X / 16.), torch.tensor(y)
        d_out = 10
    g = torch.Generator().manual_seed(cfg['seed'])
    perm = torch.randperm(len(X), generator=g)
    tr, te = perm[:cfg['n_fit']], perm[cfg['n_fit']:cfg['n_fit'] + cfg['n_queries']]
    torch.manual_seed(cfg['seed'])
    h = cfg['hidden']
    net = nn.Sequential(nn.Linear(X.shape[1], h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, d_out)).double()
    opt = torch.optim.Adam(net.parameters(), lr=cfg['lr'])
    lossf = ((lambda out, t: 0.5 * (out - t).pow(2).sum(1).mean()) if task == 'regression'
             else nn.functional.cross_entropy)
    for _ in range(cfg['steps']):                                      # full batch, mean loss
        opt.zero_grad(); lossf(net(X[tr]), y[tr]).backward(); opt.step()
    with torch.no_grad():
        losses = dict(fit_loss=float(lossf(net(X[tr]), y[tr])), test_loss=float(lossf(net(X[te]), y[te])))
    if task == 'regression':
        model = inf.RegressorAsLM(net, X, y)
        fit, queries = inf.RegressorAsLM.sequences(tr), inf.RegressorAsLM.sequences(te)
    else:
        model = inf.ClassifierAsLM(net, X)
        fit, queries = inf.ClassifierAsLM.sequences(tr, y[tr]), inf.ClassifierAsLM.sequences(te, y[te])
    points = sorted(torch.randperm(cfg['n_fit'], generator=g)[:cfg['n_points']].tolist())
    return dict(model=model, net=net, X=X, y=y, tr=tr, te=te, fit=fit, queries=queries, points=points,
                name=f'MLP {X.shape[1]}-{h}-{h}-{d_out} tanh', **losses)


def mlp_problem(task, cfg, log=print):
    "Train the MLP of `task`, score it with every method and the PBRF; a damping sweep against CG."
    t_start = time.perf_counter()
    su = mlp_setup(task, cfg)
    model, net, X, fit, queries, points, te = (su[k] for k in ('model', 'net', 'X', 'fit', 'queries', 'points', 'te'))
    fit_loss, test_loss = su['fit_loss'], su['test_loss']
    n = cfg['n_fit']
    methods = {k: tuple(v) for k, v in cfg.get('methods', MLP_METHODS).items()}
    scores, secs, lam, f_ek = influence_methods(model, fit, points, queries, 'all', methods, cfg['damping_rel'],
                                                batch_size=n, seed=cfg['seed'])
    log(f"{task}: λ = {lam:.3g}; " + ', '.join(f'{k} {v:.1f} s' for k, v in secs.items()))
    names = [nm for l in find_modules(model, 'all') for nm, _ in l.params()]
    truth, t_pbrf, record = pbrf_scores(model, names, fit, points, queries, lam, cfg['eps'], cfg['rtol'], n, log=log,
                                        cache=CACHE / f'pbrf_{task}.jsonl')
    log(f"{task}: PBRF {t_pbrf:.0f} s, {record}")
    scores['pbrf'], secs['pbrf'] = truth, t_pbrf
    dev_cg = float((truth - scores['cg']).abs().max() / truth.abs().max())
    # damping sweep: the cheap methods against CG, which equals the PBRF's derivative (checked above at the main λ)
    sweep = []
    for rel in cfg['sweep_rel']:
        meths = {k: methods[k] for k in ('ekfac', 'kfac', 'diagonal', 'identity', 'cg')}
        s, _, lam_r, _ = influence_methods(model, fit, points, queries, 'all', meths, rel, batch_size=n,
                                           seed=cfg['seed'], fit_ekfac=f_ek)
        c = correlations(s, s['cg'])
        sweep.append(dict(damping_rel=rel, damping=lam_r, **{k: dict(pearson=v['pearson'], spearman=v['spearman'])
                                                              for k, v in c.items() if k != 'cg'}))
        log(f"{task}: sweep ×{rel:g}: " + ', '.join(f"{k} {v['pearson']:.3f}" for k, v in c.items()))
    return dict(written=now(), torch=torch.__version__, config=cfg, truth='pbrf',
                model=su['name'], n_params=sum(p.numel() for p in net.parameters()),
                tracked='all', fit_loss=fit_loss, test_loss=test_loss, damping=lam,
                damping_rule=f"{cfg['damping_rel']:g} x mean EK-FAC eigenvalue over all tracked layers",
                train_idx=points, query_idx=te.tolist(), n_points=len(points), n_queries=len(te),
                methods=method_table(methods, scores, secs, 'pbrf'),
                pbrf=dict(seconds=t_pbrf, solver=record, eps=cfg['eps'], rtol=cfg['rtol'], max_rel_dev_from_cg=dev_cg),
                damping_sweep=sweep, scores={k: rnd(v) for k, v in scores.items()},
                total_seconds=time.perf_counter() - t_start)


def exact_reference(task, cfg, stored, log=print):
    "Exact damped-GGN influence of the MLP of `task`, full and layer-block-diagonal, against the stored PBRF."
    from influence_nb.theory import influence_from_grads, param_blocks
    t0 = time.perf_counter()
    su = mlp_setup(task, cfg)
    net, X, y, tr = su['net'], su['X'], su['y'], su['tr']
    names = [n for n, _ in net.named_parameters()]
    ps = list(net.parameters()); sizes = [p.numel() for p in ps]
    theta = torch.cat([p.detach().reshape(-1) for p in ps])
    rows = torch.cat([tr, su['te']])                                   # the fit data, then the queries
    X, y = X[rows], y[rows]
    at = lambda th: torch.func.functional_call(net, {n: t.view(p.shape) for n, t, p in zip(names, th.split(sizes), ps)}, (X,))
    J = torch.func.jacrev(at)(theta)                                   # [n, d_out, P]
    with torch.no_grad(): out = net(X)                                 # [n, d_out]
    if task == 'regression':
        H = torch.eye(out.shape[1], dtype=out.dtype).expand(len(X), -1, -1)   # Hessian of ½‖h − y‖² in h
        dlogp = -(out - y)                                             # ∇_h log p = −∇_h ½‖h − y‖²
    else:
        p = out.softmax(-1)
        H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]        # Hessian of the cross-entropy in the logits
        dlogp = nn.functional.one_hot(y, out.shape[1]).to(out.dtype) - p
    n_fit, P = len(tr), J.shape[-1]
    HJ = torch.einsum('noq,nqp->nop', H[:n_fit], J[:n_fit])            # [n_fit, d_out, P]
    G = J[:n_fit].reshape(-1, P).T @ HJ.reshape(-1, P) / n_fit         # [P, P] mean GGN over the fit data
    grads = torch.einsum('nop,no->np', J, dlogp)                       # [n, P] ∇ log p of every example
    gq, gt = grads[n_fit:], grads[torch.tensor(su['points'])]
    offsets = np.cumsum([0] + sizes)
    blocks = [torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in b]) for b in param_blocks(names)]
    lam = stored['damping']
    S = dict(exact_full=influence_from_grads(gq, gt, G, lam), exact_block_diagonal=influence_from_grads(gq, gt, G, lam, blocks),
             identity=gq @ gt.T)
    same = float(np.abs(S['identity'].numpy() - np.array(stored['scores']['identity'])).max()
                 / np.abs(np.array(stored['scores']['identity'])).max())
    c = correlations({k: v for k, v in S.items() if k != 'identity'}, stored['scores']['pbrf'])
    log(f"{task}: exact full {c['exact_full']['pearson']:.3f}, block-diagonal {c['exact_block_diagonal']['pearson']:.3f} "
        f"(rebuilt model: dot products within {same:.1e} of the stored ones)")
    return dict(written=now(), rebuilt_identity_max_rel_dev=same, seconds=time.perf_counter() - t0,
                **{k: dict(pearson=v['pearson'], spearman=v['spearman']) for k, v in c.items()})


# ---------------------------------------------------------------------------------------------------------------
# (c): the smallest bundled language model
# ---------------------------------------------------------------------------------------------------------------
class FrozenTrunk(nn.Module):
    "GPT-2 logits as a function of the last block's MLP output projection alone; everything below it is computed once."
    def __init__(self, model, seqs):
        super().__init__()
        self.config = model.config                                      # context length etc., for input checks
        block = model.transformer.h[-1]
        self.c_proj, self.ln_f = copy.deepcopy(block.mlp.c_proj), copy.deepcopy(model.transformer.ln_f)
        self.register_buffer('wte', model.lm_head.weight.detach().clone())      # [V, d] the tied LM head
        seqs = list({tuple(s['input_ids'].tolist()): s for s in seqs}.values())
        T = max(len(s['input_ids']) for s in seqs)
        R = torch.zeros(len(seqs), T, model.config.n_embd)                      # residual stream entering the MLP
        A = torch.zeros(len(seqs), T, block.mlp.c_proj.nx)                      # input of c_proj
        grab, self.index = {}, {}
        hooks = [block.ln_2.register_forward_hook(lambda m, a, o: grab.__setitem__('r', a[0])),
                 block.mlp.c_proj.register_forward_hook(lambda m, a, o: grab.__setitem__('a', a[0]))]
        try:
            with torch.no_grad():
                for i, s in enumerate(seqs):
                    ids = s['input_ids']
                    model(input_ids=ids[None])
                    R[i, :len(ids)], A[i, :len(ids)] = grab['r'][0], grab['a'][0]
                    self.index[tuple(ids.tolist())] = i
        finally:
            for hk in hooks: hk.remove()
        self.register_buffer('R', R); self.register_buffer('A', A)

    def forward(self, input_ids, attention_mask=None, **kw):
        B, T = input_ids.shape
        lens = attention_mask.sum(1).tolist() if attention_mask is not None else [T] * B
        rows = torch.tensor([self.index[tuple(input_ids[b, :int(n)].tolist())] for b, n in enumerate(lens)])
        x = self.R[rows, :T] + self.c_proj(self.A[rows, :T])                   # [B, T, d]
        return type('Out', (), {'logits': self.ln_f(x) @ self.wte.T})()         # [B, T, V]


def check_bundled(name):
    "The bundled model must be the regenerated one (recipe of 3.5 epochs); refuse a stale checkpoint."
    log_path = ROOT / 'data' / 'models' / name / 'train_log.json'
    recipe = json.loads(log_path.read_text()).get('recipe', {})
    if recipe.get('epochs') != 3.5:
        raise RuntimeError(f"{log_path} has recipe epochs {recipe.get('epochs')!r}, expected 3.5: stale model?")
    return recipe


def pick_queries_and_sample(model, tok, n_queries, per_fact, n_sample, logp_window, seed):
    "Fact queries the model half-knows, and a training sample: `per_fact` records per query fact + random others."
    from influence_nb.cli import completion_logprobs
    from influence_nb.corpus import load_corpus, load_queries
    records = load_corpus('train')
    cands = [q for q in load_queries('fact', 'en') if 'forward' in (q['orders_in_training'] or [])]
    lp = completion_logprobs(model, inf.tokenize_pairs(tok, cands))
    rng = random.Random(seed)
    lo, hi = logp_window
    pool = [i for i in range(len(cands)) if lo < lp[i] < hi]; rng.shuffle(pool)
    queries = [cands[i] for i in pool[:n_queries]]
    by_fact = {}
    for j, r in enumerate(records):
        for f in r['fact_ids']: by_fact.setdefault(f, []).append(j)
    qf = {q['fact_id'] for q in queries}
    relevant = sorted({j for q in queries for j in rng.sample(by_fact[q['fact_id']], min(per_fact, len(by_fact[q['fact_id']])))})
    others = [j for j, r in enumerate(records) if not qf & set(r['fact_ids'])]
    sample = relevant + rng.sample(others, n_sample - len(relevant))
    rng.shuffle(sample)
    return records, queries, sample, relevant


def lm_problem(cfg, log=print):
    "gpt2-s, one tracked layer: every method against the PBRF, solved for every training point."
    from influence_nb.cli import load_bundled
    from influence_nb.data import collate
    from influence_nb.ekfac import fingerprint
    t_start = time.perf_counter()
    recipe = check_bundled(cfg['model'])
    model, tok = load_bundled(cfg['model'])
    records, queries, chosen, relevant = pick_queries_and_sample(model, tok, cfg['n_queries'], cfg['per_fact'], cfg['n_fit'],
                                                                 cfg['logp_window'], cfg['seed'])
    fit = inf.tokenize(tok, [records[j]['text'] for j in chosen], max_length=cfg['max_length'])
    qseqs = inf.tokenize_pairs(tok, queries)
    points = list(range(len(fit)))
    methods = {k: tuple(v) for k, v in cfg['methods'].items()}
    ft = FrozenTrunk(model, fit + qseqs)                               # the same function of the tracked layer, cheaper
    b = collate(fit[:8])
    with torch.no_grad():
        diff = (ft(b['input_ids'], b['attention_mask']).logits
                - model(input_ids=b['input_ids'], attention_mask=b['attention_mask']).logits)
    trunk_dev = float((diff * b['attention_mask'][..., None]).abs().max())
    scores, secs, lam, _ = influence_methods(ft, fit, points, qseqs, ['c_proj'], methods, cfg['damping_rel'],
                                             batch_size=cfg['batch_size'], seed=cfg['seed'])
    log(f"lm: λ = {lam:.3g}; " + ', '.join(f'{k} {v:.1f} s' for k, v in secs.items()))
    fp = fingerprint(find_modules(model, 'all'))
    truth, t_pb, record = pbrf_scores(ft, ['c_proj.weight', 'c_proj.bias'], fit, points, qseqs, lam, cfg['eps'],
                                      cfg['rtol'], cfg['batch_size'], log=log, cache=CACHE / 'pbrf_lm.jsonl')
    scores['pbrf'], secs['pbrf'] = truth, t_pb
    dev = float((truth - scores['cg']).abs().max() / truth.abs().max())
    log(f"lm: PBRF on {len(points)} points: {t_pb:.0f} s, max deviation from CG {dev:.2e} of the largest; {record}")
    n_tok = sum(int(s['attention_mask'].sum()) for s in fit)
    return dict(written=now(), torch=torch.__version__, config=cfg, model_recipe=recipe,
                truth='pbrf',
                model=cfg['model'], n_params=sum(p.numel() for _, p in find_modules(model, [cfg['layer']])[0].params()),
                tracked=[cfg['layer']], fit_tokens=n_tok, damping=lam,
                damping_rule=f"{cfg['damping_rel']:g} x mean EK-FAC eigenvalue",
                model_fingerprint=fp, query_ids=[q['id'] for q in queries],
                sample_ids=[records[j]['id'] for j in chosen], relevant=[chosen.index(j) for j in relevant],
                train_idx=points, query_idx=list(range(len(queries))), n_points=len(points), n_queries=len(queries),
                methods=method_table(methods, scores, secs, 'pbrf'), frozen_trunk_max_logit_dev=trunk_dev,
                pbrf=dict(seconds=t_pb, solver=record, eps=cfg['eps'], rtol=cfg['rtol'], max_rel_dev_from_cg=dev),
                scores={k: rnd(v) for k, v in scores.items()}, total_seconds=time.perf_counter() - t_start)


# ---------------------------------------------------------------------------------------------------------------
# LDS on gpt2-s
# ---------------------------------------------------------------------------------------------------------------
def finetune(base, ids, subset, seed, epochs, lr, batch_size, weight_decay):
    "A copy of `base` fine-tuned on the token-id lists `ids[subset]` (AdamW, mean token loss per batch)."
    from influence_nb.train import collate_ids, lm_loss
    m = copy.deepcopy(base).train()
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=weight_decay)
    order_rng = random.Random(seed)
    for _ in range(epochs):
        order = list(subset); order_rng.shuffle(order)
        for s in range(0, len(order), batch_size):
            ii, mask, labels = collate_ids([ids[k] for k in order[s:s + batch_size]])
            loss = lm_loss(m, ii, mask, labels)
            opt.zero_grad(); loss.backward(); opt.step()
    return m.eval()


def lds_problem(cfg, log=print):
    "Fine-tune gpt2-s on random halves of a sample; LDS of each method's summed scores (computed once, on the full sample)."
    from influence_nb.cli import load_bundled, completion_logprobs
    from influence_nb.ekfac import fingerprint
    t_start = time.time()
    recipe = check_bundled(cfg['model'])
    base, tok = load_bundled(cfg['model'])
    if cfg.get('queries', 'facts') == 'facts':
        records, queries, sample, relevant = pick_queries_and_sample(base, tok, cfg['n_queries'], cfg['records_per_fact'],
                                                                     cfg['n_sample'], cfg['logp_window'], cfg['selection_seed'])
        qseqs = inf.tokenize_pairs(tok, queries)
    else:                                                               # held-out records, all their tokens measured
        from influence_nb.corpus import load_corpus
        records, held_out = load_corpus('train'), load_corpus('validation')
        rng = random.Random(cfg['selection_seed'])
        queries = rng.sample(held_out, cfg['n_queries'])
        sample, relevant = rng.sample(range(len(records)), cfg['n_sample']), []
        qseqs = inf.tokenize(tok, [q['text'] for q in queries], max_length=base.config.n_positions)
    texts = [records[j]['text'] for j in sample]
    ids = tok(texts).input_ids                                          # token-id lists for fine-tuning
    train = inf.tokenize(tok, texts, max_length=base.config.n_positions)   # the same sequences for the engine
    N, Q = len(sample), len(queries)
    ft = {k: cfg[k] for k in ('epochs', 'lr', 'batch_size', 'weight_decay')}
    log(f"lds: {Q} queries, {N} sequences ({len(relevant)} state a query fact)")
    t0 = time.time()
    full = finetune(base, ids, range(N), cfg['seeds'][0], **ft)
    t_full = time.time() - t0
    lp_base, lp_full = completion_logprobs(base, qseqs), completion_logprobs(full, qseqs)
    log(f"lds: full-sample fine-tune {t_full:.0f} s; mean log p {lp_base.mean():.3f} -> {lp_full.mean():.3f}")
    scores, seconds = {}, {}
    for name, (strategy, modules) in cfg['methods'].items():
        t0 = time.time()
        f = inf.fit_factors(full, train, strategy, modules=modules, fisher=cfg['fisher'], batch_size=16, seed=0, progress=False)
        sc = inf.pairwise_scores(full, f, qseqs, train, damping=cfg['damping'], batch_size=16, progress=False).total
        scores[name], seconds[name] = sc.double(), time.time() - t0       # [Q, N]
        log(f"lds: {name} fit + score {seconds[name]:.1f} s")
    sub_rng = random.Random(cfg['subset_seed'])
    subsets = [sorted(sub_rng.sample(range(N), int(cfg['alpha'] * N))) for _ in range(cfg['n_subsets'])]
    masks = torch.zeros(len(subsets), N, dtype=torch.float64)
    for j, s in enumerate(subsets): masks[j, s] = 1.
    actual = torch.zeros(len(cfg['seeds']), len(subsets), Q, dtype=torch.float64)   # [seeds, J, Q]
    t0 = time.time()
    for j, s in enumerate(subsets):
        for k, seed in enumerate(cfg['seeds']):
            actual[k, j] = completion_logprobs(finetune(base, ids, s, seed, **ft), qseqs)
        if (j + 1) % 10 == 0: log(f"lds: retrained {j + 1}/{len(subsets)} subsets ({time.time() - t0:.0f} s)")
    t_retrain = time.time() - t0
    predicted = {name: masks @ sc.T for name, sc in scores.items()}     # [J, Q]: Σ_{n ∈ S_j} τ(q, n)
    mean_actual = actual.mean(0)
    bits = lambda row: format(int(''.join('1' if b else '0' for b in row.bool().tolist()), 2), f'0{(N + 3) // 4}x')
    methods = {}
    for name, p in predicted.items():
        per_q = lds(mean_actual.numpy(), p.numpy())
        methods[name] = dict(strategy=cfg['methods'][name][0], modules=cfg['methods'][name][1], lds=float(per_q.mean()),
                             sem=float(per_q.std(ddof=1) / np.sqrt(len(per_q))), per_query=rnd(per_q),
                             seconds=float(seconds[name]))
    return dict(written=now(), torch=torch.__version__, config=cfg, model_recipe=recipe,
                model_fingerprint=fingerprint(find_modules(base, 'all')), query_ids=[q['id'] for q in queries],
                sample_ids=[records[j]['id'] for j in sample], relevant=[sample.index(j) for j in relevant],
                methods=methods, subsets_hex=[bits(m) for m in masks], lp_base=rnd(lp_base, 6), lp_full=rnd(lp_full, 6),
                actual=rnd(actual, 6), predicted={k: rnd(v, 9) for k, v in predicted.items()},
                seconds=dict(finetune_full=t_full, retrain_all=t_retrain,
                             per_model=t_retrain / actual.shape[0] / len(subsets), total=time.time() - t_start))


# ---------------------------------------------------------------------------------------------------------------
# claims: what the notebooks say about the numbers, evaluated on the file (the notebooks and tests/ assert STATED)
# ---------------------------------------------------------------------------------------------------------------
def _best_lissa(methods):
    "The LiSSA variant with the largest depth (the most accurate one run)."
    lissa = {k: v for k, v in methods.items() if v['strategy'] == 'lissa'}
    return max(lissa, key=lambda k: lissa[k]['solver']['depth'])


def claims(res) -> dict:
    "`{name: dict(holds=bool, detail=str, text=str)}` for every claim or target the notebooks discuss."
    out, P = {}, res.get('problems', {})
    def add(name, holds, detail, text): out[name] = dict(holds=bool(holds), detail=detail, text=text)
    mlps = [k for k in ('regression', 'classification') if k in P]
    for k in mlps:
        m = P[k]['methods']
        add(f'target_ekfac_pearson_0.9_{k}', m['ekfac']['pearson'] >= 0.9, f"EK-FAC Pearson {m['ekfac']['pearson']:.3f}",
            f'target: EK-FAC vs PBRF Pearson >= 0.9 on {k}')
        sweep = sorted(P[k]['damping_sweep'], key=lambda r: r['damping_rel'])
        ek = [r['ekfac']['pearson'] for r in sweep]
        add(f'ekfac_rises_with_damping_{k}', all(b > a for a, b in zip(ek, ek[1:])),
            'EK-FAC Pearson vs CG ' + ', '.join(f"at x{r['damping_rel']:g}: {e:.3f}" for r, e in zip(sweep, ek)),
            f'{k}: EK-FAC agrees better with the truth as the damping grows')
        if 'exact' in P[k]:
            bd = P[k]['exact']['exact_block_diagonal']['pearson']
            add(f'block_diagonal_meets_0.9_{k}', bd >= 0.9, f"exact layer-block-diagonal influence: Pearson {bd:.3f}",
                f'{k}: exact influence with only the layer-diagonal blocks of G correlates >= 0.9 with the PBRF')
    for k in P:
        dev, sv = P[k]['pbrf']['max_rel_dev_from_cg'], P[k]['pbrf']['solver']
        add(f'pbrf_derivative_is_cg_{k}', dev < 1e-3 and sv['failed'] == 0, f'max |PBRF - CG| / max |PBRF| = {dev:.1e}, '
            f"{sv['failed']} failed of {sv['solves']} solves",
            f'{k}: the PBRF finite difference equals damped-GGN influence (CG) to 1e-3')
        m = P[k]['methods']
        li = _best_lissa(m)
        gap, ratio = m[li]['pearson'] - m['ekfac']['pearson'], m[li]['seconds'] / m['ekfac']['seconds']
        add(f'target_ekfac_near_lissa_{k}', gap <= 0.05 and ratio >= 10,
            f"{li} Pearson {m[li]['pearson']:.3f} vs EK-FAC {m['ekfac']['pearson']:.3f} (gap {gap:+.3f}); time ratio {ratio:.0f}x",
            f'target: on {k}, EK-FAC within 0.05 of LiSSA\'s Pearson at >= 10x less time')
        add(f'ekfac_beats_dot_{k}', m['ekfac']['pearson'] > m['identity']['pearson'],
            f"EK-FAC {m['ekfac']['pearson']:.3f} vs dot product {m['identity']['pearson']:.3f}",
            f'{k}: EK-FAC correlates better with the PBRF than the gradient dot product')
        if 'ekfac-s100' in m:
            add(f'ekfac_samples_help_{k}', m['ekfac-s100']['pearson'] > m['ekfac']['pearson'] + 0.02,
                f"EK-FAC with 100 label draws per token {m['ekfac-s100']['pearson']:.3f} vs one draw {m['ekfac']['pearson']:.3f}",
                f'{k}: 100 label draws per token raise EK-FAC\'s Pearson by more than 0.02')
        add(f'ekfac_beats_diagonal_{k}', m['ekfac']['pearson'] > m['diagonal']['pearson'],
            f"EK-FAC {m['ekfac']['pearson']:.3f} vs diagonal {m['diagonal']['pearson']:.3f}",
            f'{k}: EK-FAC correlates better with the PBRF than the diagonal')
    for task in [t for t in LDS_TASKS if t in res]:
        tag = '' if task == 'lds' else '_text'                          # claim names: lds_* and lds_text_*
        on = '' if task == 'lds' else ' (held-out records, no planted facts)'
        L = {k: v['lds'] for k, v in res[task]['methods'].items()}
        add(f'target_lds{tag}_2x', L['ekfac'] >= 2 * L['identity'], f"EK-FAC LDS {L['ekfac']:.3f}, identity "
            f"{L['identity']:.3f}, ratio {L['ekfac'] / L['identity']:.2f}",
            f'target: EK-FAC LDS >= 2x the dot product (identity) LDS{on}')
        add(f'lds{tag}_2x_reachable', L['identity'] <= 0.5, f"identity LDS {L['identity']:.3f}: 2x would be "
            f"{2 * L['identity']:.3f}", f'a 2x ratio is possible at all{on}: the dot product\'s LDS is <= 0.5 '
            '(an LDS is a Spearman correlation, at most 1)')
        add(f'lds{tag}_all_positive', min(L.values()) > 0, f'smallest LDS {min(L.values()):.3f}',
            f'every method predicts retraining better than chance (LDS > 0){on}')
        per_q = {k: np.array(v['per_query']) for k, v in res[task]['methods'].items()}
        def beats(a, b, name, text):
            d = per_q[a] - per_q[b]
            se = d.std(ddof=1) / np.sqrt(len(d))
            add(name, d.mean() > 2 * se, f'paired difference {d.mean():+.3f} +- {se:.3f} (s.e.)', text + on)
        beats('ekfac', 'identity', f'lds{tag}_ekfac_beats_identity',
              'EK-FAC beats the dot product on the LDS by more than 2 standard errors of the paired difference')
        beats('ekfac', 'diagonal', f'lds{tag}_ekfac_beats_diagonal', 'EK-FAC beats the diagonal on the LDS (paired, > 2 s.e.)')
        beats('diagonal', 'identity', f'lds{tag}_diagonal_beats_identity',
              'the diagonal beats the dot product on the LDS (paired, > 2 s.e.)')
        beats('ekfac (all layers)', 'ekfac', f'lds{tag}_all_layers_beat_mlp',
              'EK-FAC over all linear layers beats EK-FAC over the MLPs alone on the LDS (paired, > 2 s.e.)')
        d = per_q['ekfac'] - per_q['kfac']
        add(f'lds{tag}_ekfac_close_to_kfac', abs(d.mean()) < 0.02, f'paired difference {d.mean():+.4f}',
            f'EK-FAC and K-FAC have LDS within 0.02 of each other{on}')
    return out


# What the notebooks' prose states about each claim (True: holds, False: does not). The notebooks and
# tests/test_validation.py assert that `claims(json)` agrees, so a rerun that changes a conclusion fails loudly.
STATED = {
    # 20_validation, (a) the regressor
    'target_ekfac_pearson_0.9_regression': False, 'ekfac_rises_with_damping_regression': True,
    'pbrf_derivative_is_cg_regression': True, 'target_ekfac_near_lissa_regression': False,
    'ekfac_beats_dot_regression': True, 'ekfac_beats_diagonal_regression': True, 'ekfac_samples_help_regression': False,
    # 20_validation, (b) the classifier
    'target_ekfac_pearson_0.9_classification': False, 'ekfac_rises_with_damping_classification': True,
    'pbrf_derivative_is_cg_classification': True, 'target_ekfac_near_lissa_classification': False,
    'ekfac_beats_dot_classification': True, 'ekfac_beats_diagonal_classification': True,
    'ekfac_samples_help_classification': True,
    'block_diagonal_meets_0.9_regression': True, 'block_diagonal_meets_0.9_classification': True,
    # 20_validation, (c) the language model
    'target_ekfac_near_lissa_lm': False, 'ekfac_beats_dot_lm': True, 'ekfac_beats_diagonal_lm': True,
    'pbrf_derivative_is_cg_lm': True, 'ekfac_samples_help_lm': False,
    # 22_lds
    'target_lds_2x': False, 'lds_2x_reachable': False, 'lds_all_positive': True, 'lds_ekfac_beats_identity': True, 'lds_ekfac_beats_diagonal': True,
    'lds_diagonal_beats_identity': True, 'lds_all_layers_beat_mlp': True, 'lds_ekfac_close_to_kfac': True,
    # 22_lds, the held-out-records benchmark
    'target_lds_text_2x': False, 'lds_text_2x_reachable': False, 'lds_text_all_positive': True,
    'lds_text_ekfac_beats_identity': True, 'lds_text_ekfac_beats_diagonal': True, 'lds_text_diagonal_beats_identity': True,
    'lds_text_all_layers_beat_mlp': True, 'lds_text_ekfac_close_to_kfac': True,
}


# ---------------------------------------------------------------------------------------------------------------
# the file
# ---------------------------------------------------------------------------------------------------------------
def save_json(obj, path):
    "Write JSON atomically (a reader never sees half a file)."
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile('w', dir=path.parent, suffix='.tmp', delete=False) as fh: json.dump(obj, fh)
    os.chmod(fh.name, 0o644); os.replace(fh.name, path)


def run(tasks, out=RESULTS, log=print, threads=1):
    "Run `tasks` and merge their results into the JSON file `out` (other tasks already there are kept)."
    bad = [t for t in tasks if t not in TASKS]
    if bad: raise ValueError(f"Unknown task(s) {bad}; choose from {TASKS}.")
    torch.set_num_threads(threads)
    out = Path(out)
    for task in tasks:
        if task == 'exact':
            P = json.loads(out.read_text())['problems'] if out.exists() else {}
            mlps = [k for k in ('regression', 'classification') if k in P]
            if not mlps: raise ValueError(f"task 'exact' needs 'regression' or 'classification' in {out}: run them first.")
            r = {k: exact_reference(k, P[k]['config'], P[k], log) for k in mlps}
        elif task in PROBLEMS: r = lm_problem(CONFIGS['lm'], log) if task == 'lm' else mlp_problem(task, CONFIGS[task], log)
        else: r = lds_problem(CONFIGS[task], log)
        res = json.loads(out.read_text()) if out.exists() else {}      # read late: another run may have written meanwhile
        res.setdefault('problems', {})
        if task == 'exact':
            for k, v in r.items(): res['problems'][k]['exact'] = v
        elif task in PROBLEMS: res['problems'][task] = r
        else: res[task] = r
        res.update(schema_version=SCHEMA_VERSION, updated=now(), torch=torch.__version__, python=platform.python_version(),
                   threads=threads, command='python benchmarks/validation.py', note=__doc__.split('\n')[0])
        res['problems'] = {k: res['problems'][k] for k in PROBLEMS if k in res['problems']}
        save_json(res, out)                                             # after every task: a crash loses one task only
        log(f"{task}: written to {out}")
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--tasks', default=','.join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument('--out', default=str(RESULTS), help='the JSON file to write (merged with what is there)')
    p.add_argument('--threads', type=int, default=1, help='torch threads (1: comparable timings on a shared machine)')
    a = p.parse_args(argv)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    return run([t.strip() for t in a.tasks.split(',') if t.strip()], a.out, lambda s: print(s, flush=True), a.threads)


if __name__ == '__main__':
    main()
