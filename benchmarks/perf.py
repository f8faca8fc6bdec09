"""Speed, memory and agreement of influence_nb against a plain forward+backward pass and Kronfluence 1.0.1.

Run from the repository root (see benchmarks/README.md):

    python benchmarks/perf.py                 # W1 (Llama config, with Kronfluence) + W2 (bundled gpt2-l), 3 repeats
    python benchmarks/perf.py --quick         # a small smoke run (< 1 min), nothing written unless --out is given
    python benchmarks/perf.py --scaling       # time/memory against N, queries, sequence length, width
    python benchmarks/perf.py --profile       # torch.profiler of fit and scores on W1 -> benchmarks/profile_*.txt

Method. Every measured stage runs in a fresh Python subprocess (`--child`), so that one stage's allocator caches,
oneDNN kernels or Python garbage never leak into another's numbers. A child builds the model and data
deterministically, runs one warm-up forward+backward batch, calls `malloc_trim`, records its resident memory, resets
the kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0), runs the stage under
`time.perf_counter`, and reports `VmHWM - baseline` as the stage's peak memory (everything the stage allocated and
touched: torch tensors, Python objects, and Kronfluence's loaded factors). Wall time is the headline; process CPU
time is recorded too. Within one repeat, stages are interleaved (floor, ours, Kronfluence, ...) and the floor is
timed at the start and the end of the repeat; ratios use the mean of the two floors, so load drift on a shared
machine mostly cancels. The summary reports the median and the min-max spread of each ratio over repeats.
"""
from __future__ import annotations
import argparse, contextlib, copy, ctypes, datetime, gc, json, os, platform, re, shutil, subprocess, sys, tempfile, time
import warnings
from pathlib import Path
from statistics import median

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / 'results' / 'perf.json'

# ---------------------------------------------------------------------------------------------------------------
# workloads
# ---------------------------------------------------------------------------------------------------------------
W1 = dict(name='W1', kind='llama', layers=4, hidden=256, mlp=1024, vocab=2048, T=128, N=256, Q=16, batch=8,
          attn='sdpa', seed=0, modules='mlp')
W2 = dict(name='W2', kind='gpt2', model='gpt2-l', T=128, N=256, Q=16, batch=8, seed=0, modules='mlp')
QUICK = dict(name='quick', kind='llama', layers=2, hidden=64, mlp=256, vocab=256, T=32, N=32, Q=4, batch=8,
             attn='sdpa', seed=0, modules='mlp')
RANK = 32


def _log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# memory: peak RSS of a stage (child side)
# ---------------------------------------------------------------------------------------------------------------
def _status_kb(key):
    m = re.search(rf'{key}:\s+(\d+) kB', Path('/proc/self/status').read_text())
    return int(m.group(1)) if m else None


def _trim():
    gc.collect()
    with contextlib.suppress(Exception): ctypes.CDLL('libc.so.6').malloc_trim(0)


class PeakMemory:
    "Peak resident memory above the RSS at entry (VmHWM reset via clear_refs; ru_maxrss fallback)."
    def __enter__(self):
        import resource
        _trim()
        self.base_kb = _status_kb('VmRSS')
        try:
            Path('/proc/self/clear_refs').write_text('5'); self.method = 'VmHWM after clear_refs reset'
        except OSError:
            self.method = 'ru_maxrss (not resettable: includes setup)'
        self.ru0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc):
        import resource
        peak = _status_kb('VmHWM') if self.method.startswith('VmHWM') else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.peak_mb = peak / 1024
        self.delta_mb = max(0., (peak - self.base_kb) / 1024)
        self.base_mb = self.base_kb / 1024
        return False


# ---------------------------------------------------------------------------------------------------------------
# building a workload (child side)
# ---------------------------------------------------------------------------------------------------------------
def build(spec):
    "`(model, train, queries, module_names)` for a workload spec; deterministic."
    import torch
    import influence_nb as inf
    if spec['kind'] == 'llama':
        from transformers import LlamaConfig, AutoModelForCausalLM
        heads = max(1, spec['hidden'] // 64)
        cfg = LlamaConfig(vocab_size=spec['vocab'], hidden_size=spec['hidden'], intermediate_size=spec['mlp'],
                          num_hidden_layers=spec['layers'], num_attention_heads=heads, num_key_value_heads=heads,
                          max_position_embeddings=spec['T'], bos_token_id=0, eos_token_id=0, pad_token_id=0)
        torch.manual_seed(spec['seed'])
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=spec['attn']).eval()
        g = torch.Generator().manual_seed(spec['seed'] + 1)
        ids = torch.randint(0, spec['vocab'], (spec['N'], spec['T']), generator=g)
        train = [{'input_ids': r} for r in ids]
        qids = torch.randint(0, spec['vocab'], (spec['Q'], spec['T']), generator=g)
        queries = []
        for r in qids:                                   # prompt = first half (not measured), completion = second half
            lab = r.clone(); lab[:spec['T'] // 2] = -100
            queries.append({'input_ids': r, 'labels': lab})
    elif spec['kind'] == 'gpt2':
        import random
        from transformers import AutoModelForCausalLM, AutoTokenizer
        path = inf.data_dir() / 'models' / spec['model']
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tok = AutoTokenizer.from_pretrained(path)
        corpus = inf.data_dir() / 'corpus'
        rows = [json.loads(l) for l in (corpus / 'train.jsonl').read_text().splitlines() if l.strip()]
        random.Random(spec['seed']).shuffle(rows)
        train = inf.tokenize(tok, [r['text'] for r in rows[:spec['N']]], max_length=spec['T'])
        qs = [json.loads(l) for l in (corpus / 'queries.jsonl').read_text().splitlines() if l.strip()]
        qs = [q for q in qs if q.get('kind') == 'fact'][:spec['Q']]
        queries = inf.tokenize_pairs(tok, [(q['prompt'], q['completion']) for q in qs])
    else:
        raise ValueError(f"unknown workload kind {spec['kind']!r}")
    names = [l.name for l in inf.find_modules(model, spec['modules'])]
    return model, inf.as_sequences(train, 'train'), inf.as_sequences(queries, 'queries'), names


def summed_ce(logits, labels, sample=False):
    "Cross-entropy summed over scored tokens (labels aligned with inputs); sampled labels for the true Fisher."
    import torch, torch.nn.functional as F
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    if sample:
        with torch.no_grad():
            s = torch.multinomial(logits.softmax(-1).reshape(-1, logits.shape[-1]), 1).reshape(labels.shape)
            labels = torch.where(labels == -100, labels, s)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction='sum')


def warm_up(model, train, bs):
    "One forward+backward batch so first-call costs (kernel selection, weight packing) are outside every timer."
    import influence_nb as inf
    _, b = next(iter(inf.batches(train, bs, sort_by_length=True)))
    b = {k: v.to(next(model.parameters()).device) for k, v in b.items()}      # (a CUDA model: benchmarks/gpu.py)
    out = model(input_ids=b['input_ids'], attention_mask=b['attention_mask']).logits
    summed_ce(out, b['labels']).backward()
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------------------------
# Kronfluence side (child side)
# ---------------------------------------------------------------------------------------------------------------
def kron_available():
    try:
        import kronfluence  # noqa: F401
        from kronfluence.analyzer import Analyzer  # noqa: F401
        return getattr(kronfluence, '__version__', None) or _kron_version()
    except Exception:
        return None


def _kron_version():
    from importlib.metadata import version
    return version('kronfluence')


def kron_setup(model, names, workdir):
    import logging, torch
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.task import Task
    logging.getLogger('kronfluence').setLevel(logging.ERROR)
    warnings.filterwarnings('ignore', category=FutureWarning)

    class LMTask(Task):
        "Summed cross-entropy over scored tokens (as influence_nb); measurement = summed loss on completion tokens."
        def compute_train_loss(self, batch, model, sample=False):
            logits = model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits
            return summed_ce(logits, batch['labels'], sample)

        def compute_measurement(self, batch, model):
            logits = model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits
            return summed_ce(logits, batch['labels'])

        def get_influence_tracked_modules(self): return list(names)
        def get_attention_mask(self, batch): return batch['attention_mask']

    task = LMTask()
    model = prepare_model(model, task)
    an = Analyzer('bench', model, task, cpu=True, output_dir=str(Path(workdir) / 'kron'), disable_tqdm=True,
                  disable_model_save=True)
    return an


class SeqDataset:
    "Fixed-length sequences (W1 has no padding) as a map-style dataset for Kronfluence's DataLoader."
    def __init__(self, seqs): self.seqs = seqs
    def __len__(self): return len(self.seqs)
    def __getitem__(self, i):
        s = self.seqs[i]
        return {'input_ids': s['input_ids'], 'attention_mask': s['attention_mask'], 'labels': s['labels']}


def kron_fit(an, train, bs, fisher):
    from kronfluence.arguments import FactorArguments
    an.fit_all_factors(factors_name=fisher, dataset=SeqDataset(train), per_device_batch_size=bs,
                       factor_args=FactorArguments(strategy='ekfac', use_empirical_fisher=fisher == 'empirical'),
                       overwrite_output_dir=True)


def kron_scores(an, queries, train, bs, fisher, rank, damping, full_svd=False):
    from kronfluence.arguments import ScoreArguments
    name = f'{fisher}_{rank or "full"}'
    an.compute_pairwise_scores(scores_name=name, factors_name=fisher, query_dataset=SeqDataset(queries),
                               train_dataset=SeqDataset(train), per_device_query_batch_size=len(queries),
                               per_device_train_batch_size=bs,
                               score_args=ScoreArguments(damping_factor=damping, query_gradient_low_rank=rank,
                                                         use_full_svd=full_svd),
                               overwrite_output_dir=True)
    return name


def kron_load_scores(an, name):
    return an.load_pairwise_scores(name)['all_modules']


# ---------------------------------------------------------------------------------------------------------------
# stages (child side)
# ---------------------------------------------------------------------------------------------------------------
def stage_floor(model, train, queries, names, spec, workdir):
    "Plain forward + backward (parameter gradients) over the training set, summed loss, same batches."
    import influence_nb as inf
    for p in model.parameters(): p.requires_grad_(True)
    dev = next(model.parameters()).device
    for _, b in inf.batches(train, spec['batch'], sort_by_length=True):
        b = {k: v.to(dev) for k, v in b.items()}
        out = model(input_ids=b['input_ids'], attention_mask=b['attention_mask']).logits
        summed_ce(out, b['labels']).backward()
        model.zero_grad(set_to_none=True)


def stage_ours_fit(model, train, queries, names, spec, workdir, fisher='true'):
    import influence_nb as inf
    f = inf.fit_factors(model, train, strategy='ekfac', modules=names, fisher=fisher, batch_size=spec['batch'],
                        seed=0, progress=False)
    f.save(Path(workdir) / f'ours_factors_{fisher}')


def stage_ours_scores(model, train, queries, names, spec, workdir, fisher='true', rank=None, damping=None):
    import influence_nb as inf
    from safetensors.torch import save_file
    f = inf.Factors.load(Path(workdir) / f'ours_factors_{fisher}')
    s = inf.pairwise_scores(model, f, queries, train, damping=damping, query_rank=rank, batch_size=spec['batch'],
                            progress=False)
    save_file({'total': s.total.contiguous()}, str(Path(workdir) / f'ours_scores_{fisher}_{rank or "full"}.safetensors'))


def stage_ours_self(model, train, queries, names, spec, workdir, fisher='true'):
    "Self-influence of every training sequence (one rotation and a sum per layer, `06_scores`)."
    import influence_nb as inf
    f = inf.Factors.load(Path(workdir) / f'ours_factors_{fisher}')
    inf.self_scores(model, f, train, batch_size=spec['batch'], progress=False)


STAGES = {
    'floor': stage_floor,
    'ours_fit': stage_ours_fit,
    'ours_scores_full': lambda *a: stage_ours_scores(*a, rank=None),
    'ours_scores_r32': lambda *a: stage_ours_scores(*a, rank=RANK),
    'ours_self': stage_ours_self,
    'kron_fit': None, 'kron_scores_full': None, 'kron_scores_r32': None,   # built in `child` (need prepare_model)
}


def _child_setup(spec, threads):
    "What every measuring child does first: its thread count, quiet warnings, the workload built and warmed up."
    import torch
    torch.set_num_threads(threads)
    warnings.filterwarnings('ignore')
    model, train, queries, names = build(spec)
    warm_up(model, train, spec['batch'])
    return model, train, queries, names


def child(stage, spec, workdir, threads):
    "Run one stage in this (fresh) process; print `RESULT:{json}`."
    import torch
    model, train, queries, names = _child_setup(spec, threads)
    res = {'stage': stage}
    if stage.startswith('kron'):
        an = kron_setup(model, names, workdir)
        if stage == 'kron_fit': run = lambda: kron_fit(an, train, spec['batch'], 'true')
        else:
            rank = RANK if stage.endswith('r32') else None
            run = lambda: kron_scores(an, queries, train, spec['batch'], 'true', rank, None)
    elif stage == 'agree':
        return child_agree(model, train, queries, names, spec, workdir, threads)
    else:
        run = lambda: STAGES[stage](model, train, queries, names, spec, workdir)
    load0 = os.getloadavg()[0]
    with PeakMemory() as mem:
        c0, t0 = time.process_time(), time.perf_counter()
        out = run()
        res['seconds'] = time.perf_counter() - t0
        res['cpu_seconds'] = time.process_time() - c0
    if stage.startswith('kron_scores'):
        from safetensors.torch import save_file
        save_file({'total': kron_load_scores(an, out).contiguous()},
                  str(Path(workdir) / f'kron_scores_true_{"r32" if stage.endswith("r32") else "full"}.safetensors'))
    import influence_nb
    res.update(peak_mb=round(mem.delta_mb, 1), rss_before_mb=round(mem.base_mb, 1), rss_peak_mb=round(mem.peak_mb, 1),
               memory_method=mem.method, load1=load0, threads=torch.get_num_threads(), engine_file=influence_nb.__file__)
    print('RESULT:' + json.dumps(res), flush=True)


def pearson(a, b):
    "Pearson correlation of two tensors of any shape, on any device."
    import torch
    a, b = a.double().cpu().flatten(), b.double().cpu().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def child_agree(model, train, queries, names, spec, workdir, threads):
    """Equal settings on both sides: empirical Fisher, the same absolute damping, full SVD for rank 32.

    Also compares the factors themselves (eigenvalue-corrected Λ) to localise any disagreement."""
    import torch, influence_nb as inf
    out = {'stage': 'agree'}
    base = copy.deepcopy(model)
    f = inf.fit_factors(model, train, strategy='ekfac', modules=names, fisher='empirical', batch_size=spec['batch'],
                        seed=0, progress=False)
    damping = 0.1 * float(torch.stack([f.tensors[n]['Lambda'].mean() for n in names]).mean())
    out['damping'] = damping
    ours = {r: inf.pairwise_scores(model, f, queries, train, damping=damping, query_rank=r, batch_size=spec['batch'],
                                   progress=False).total for r in (None, RANK)}
    an = kron_setup(base, names, workdir)
    kron_fit(an, train, spec['batch'], 'empirical')
    kron = {r: kron_load_scores(an, kron_scores(an, queries, train, spec['batch'], 'empirical', r, damping, full_svd=True))
            for r in (None, RANK)}
    for r in (None, RANK):
        k = f'rank{r}' if r else 'full'
        a, b = ours[r].double(), kron[r].double()
        out[f'pearson_{k}'] = pearson(a, b)
        out[f'max_rel_diff_{k}'] = float((a - b).abs().max() / b.abs().max())
        out[f'sign_{k}'] = 'same' if (a * b).sum() > 0 else 'opposite'
    # our rank-32 against our full rank (truncation error alone)
    out['pearson_ours_rank32_vs_full'] = pearson(ours[RANK], ours[None])
    # factors: Λ (Kronfluence: mean over sequences of the rotated per-sequence gradients squared)
    stored = an.load_lambda_matrices('empirical') or {}
    lam, cnt = stored.get('lambda_matrix', {}), stored.get('num_lambda_processed', {})   # Kronfluence stores Σ_n and N
    rel = {}
    for n in names:
        if n in lam:
            a, b = f.tensors[n]['Lambda'].double(), lam[n].double() / float(cnt[n]) if n in cnt else lam[n].double()
            if a.shape != b.shape and a.T.shape == b.shape: b = b.T
            rel[n] = float((a - b).norm() / b.norm()) if a.shape == b.shape else f'shape {tuple(a.shape)} vs {tuple(b.shape)}'
    out['lambda_rel_err'] = rel
    print('RESULT:' + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------------------------------------
ENGINE = {}   # set by `snapshot_engine`: children import this frozen copy of influence_nb


def snapshot_engine(wd):
    """Copy influence_nb/ into the run's work folder and make every child import that copy, so that edits to the
    engine during a long run (other people export notebooks) cannot mix versions; returns the sources' hash."""
    src = ROOT / 'influence_nb'
    dst = Path(wd) / 'engine' / 'influence_nb'
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns('__pycache__'), dirs_exist_ok=True)
    from influence_nb.artefact import digest
    sha = digest(part for f in sorted(dst.glob('*.py')) for part in (f.name, f.read_bytes()))   # each file's name, then its bytes
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(['git', 'status', '--porcelain', '--', 'influence_nb'], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip())
    except Exception: commit, dirty = None, None
    ENGINE.update(path=str(dst.parent), sha256=sha[:16], git_commit=commit, engine_dirty=dirty,
                  snapshot_time=datetime.datetime.now().isoformat(timespec='seconds'))
    return dict(ENGINE)


def run_child(stage, spec, workdir, threads, timeout=3600):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE='1',
               TOKENIZERS_PARALLELISM='false', PYTHONWARNINGS='ignore')
    if ENGINE:
        env['PYTHONPATH'] = ENGINE['path'] + os.pathsep + env.get('PYTHONPATH', '')
        env.setdefault('INFLUENCE_NB_DATA', str(ROOT / 'data'))
    cmd = [sys.executable, str(Path(__file__).resolve()), '--child', stage, '--spec', json.dumps(spec),
           '--workdir', str(workdir), '--threads', str(threads)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    lines = [l for l in p.stdout.splitlines() if l.startswith('RESULT:')]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"stage {stage} failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(lines[-1][len('RESULT:'):])


def scores_corr(workdir):
    "Pearson correlation of our and Kronfluence's true-Fisher scores of the timing run (different pseudo-labels)."
    from safetensors.torch import load_file
    out = {}
    for k in ('full', 'r32'):
        a, b = Path(workdir) / f'ours_scores_true_{k if k == "full" else RANK}.safetensors', \
            Path(workdir) / f'kron_scores_true_{k}.safetensors'
        if a.exists() and b.exists(): out[k] = pearson(load_file(str(a))['total'], load_file(str(b))['total'])
    return out


def one_repeat(spec, threads, kron, workdir):
    "All stages of one workload, interleaved; floor at the start and at the end."
    order = ['floor', 'ours_fit'] + (['kron_fit'] if kron else []) + ['ours_scores_full'] + \
            (['kron_scores_full'] if kron else []) + ['ours_scores_r32'] + (['kron_scores_r32'] if kron else []) + \
            ['ours_self', 'floor']
    res = {}
    for i, st in enumerate(order):
        r = run_child(st, spec, workdir, threads)
        key = 'floor_end' if (st == 'floor' and i > 0) else st
        res[key] = r
        _log(f"  {spec['name']} {key:18s} {r['seconds']:8.2f} s  cpu {r['cpu_seconds']:8.2f} s  "
             f"peak +{r['peak_mb']:7.1f} MB  load {r['load1']:.1f}")
    return res


RATIOS = [  # name, numerator stage, denominator stage ('floor' = mean of the two floors)
    ('fit/floor', 'ours_fit', 'floor'), ('kron_fit/floor', 'kron_fit', 'floor'), ('fit/kron', 'ours_fit', 'kron_fit'),
    ('scores_full/floor', 'ours_scores_full', 'floor'), ('kron_scores_full/floor', 'kron_scores_full', 'floor'),
    ('scores_full/kron', 'ours_scores_full', 'kron_scores_full'),
    ('scores_r32/floor', 'ours_scores_r32', 'floor'), ('kron_scores_r32/floor', 'kron_scores_r32', 'floor'),
    ('scores_r32/kron', 'ours_scores_r32', 'kron_scores_r32'),
    ('scores_r32/scores_full', 'ours_scores_r32', 'ours_scores_full'),
    ('self/floor', 'ours_self', 'floor'),
]
MEM_RATIOS = [('fit_mem/kron', 'ours_fit', 'kron_fit'), ('scores_full_mem/kron', 'ours_scores_full', 'kron_scores_full'),
              ('scores_r32_mem/kron', 'ours_scores_r32', 'kron_scores_r32')]


def _floor(run, key='seconds'):
    return (run['floor'][key] + run['floor_end'][key]) / 2


def _get(run, st, key='seconds'):
    if st == 'floor': return _floor(run, key)
    return run[st][key] if st in run else None


def summarise(runs):
    "Medians and min-max spreads of times, peak memories and ratios over repeats."
    def stat(xs):
        xs = [x for x in xs if x is not None]
        if not xs: return None
        return {'median': round(median(xs), 4), 'min': round(min(xs), 4), 'max': round(max(xs), 4), 'n': len(xs),
                'values': [round(x, 4) for x in xs]}
    stages = sorted({k for r in runs for k in r})
    out = {'seconds': {}, 'cpu_seconds': {}, 'peak_mb': {}, 'ratios': {}, 'cpu_ratios': {}, 'memory_ratios': {}}
    for st in stages:
        out['seconds'][st] = stat([r[st]['seconds'] for r in runs if st in r])
        out['cpu_seconds'][st] = stat([r[st]['cpu_seconds'] for r in runs if st in r])
        out['peak_mb'][st] = stat([r[st]['peak_mb'] for r in runs if st in r])
    for name, a, b in RATIOS:
        v = [(_get(r, a) / _get(r, b)) if _get(r, a) and _get(r, b) else None for r in runs]
        if any(x is not None for x in v): out['ratios'][name] = stat(v)
        v = [(_get(r, a, 'cpu_seconds') / _get(r, b, 'cpu_seconds')) if _get(r, a) and _get(r, b) else None for r in runs]
        if any(x is not None for x in v): out['cpu_ratios'][name] = stat(v)
    for name, a, b in MEM_RATIOS:
        v = [(r[a]['peak_mb'] / r[b]['peak_mb']) if a in r and b in r and r[b]['peak_mb'] > 0 else None for r in runs]
        if any(x is not None for x in v): out['memory_ratios'][name] = stat(v)
    return out


def fmt_stat(s, digits=2):
    if s is None: return '—'
    if s['n'] == 1: return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def table(name, summ):
    "Markdown: one row per stage (time, ×floor, ×Kronfluence, peak memory)."
    lines = [f"### {name}", '', '| stage | seconds | × floor | × Kronfluence | peak memory (MB) |', '|---|---|---|---|---|']
    R = summ['ratios']
    rows = [('floor (forward+backward)', 'floor', None, None),
            ('influence_nb fit (EK-FAC, true Fisher)', 'ours_fit', 'fit/floor', 'fit/kron'),
            ('Kronfluence fit', 'kron_fit', 'kron_fit/floor', None),
            ('influence_nb scores, full rank', 'ours_scores_full', 'scores_full/floor', 'scores_full/kron'),
            ('Kronfluence scores, full rank', 'kron_scores_full', 'kron_scores_full/floor', None),
            (f'influence_nb scores, rank {RANK}', 'ours_scores_r32', 'scores_r32/floor', 'scores_r32/kron'),
            (f'Kronfluence scores, rank {RANK}', 'kron_scores_r32', 'kron_scores_r32/floor', None),
            ('influence_nb self-scores', 'ours_self', 'self/floor', None)]
    for label, st, rf, rk in rows:
        if st not in summ['seconds'] and st != 'floor': continue
        sec = summ['seconds'].get(st) if st != 'floor' else summ['seconds'].get('floor')
        mem = summ['peak_mb'].get(st)
        lines.append(f"| {label} | {fmt_stat(sec, 1)} | {fmt_stat(R.get(rf)) if rf else '1'} | "
                     f"{fmt_stat(R.get(rk)) if rk else ('1' if st.startswith('kron') else '—')} | {fmt_stat(mem, 0)} |")
    M = summ['memory_ratios']
    if M:
        lines += ['', 'Peak memory, influence_nb / Kronfluence: ' +
                  ', '.join(f"{k.split('_mem')[0]} {fmt_stat(v)}" for k, v in M.items())]
    if 'scores_r32/scores_full' in R:
        lines += [f"Rank {RANK} / full rank (influence_nb): {fmt_stat(R['scores_r32/scores_full'])}"]
    return '\n'.join(lines)


def load_results(path):
    try: return json.loads(Path(path).read_text())
    except Exception: return {}


def save_results(path, data):
    "Write `data` to `path` as indented JSON in one rename (influence_nb.artefact): a reader never sees half a file."
    from influence_nb.artefact import atomic_write
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=1), mode=0o644)


def meta(threads):
    import torch, transformers
    return {'date': datetime.datetime.now().isoformat(timespec='seconds'), 'threads': threads,
            'torch': torch.__version__, 'transformers': transformers.__version__, 'kronfluence': kron_available(),
            'python': platform.python_version(), 'cpus': os.cpu_count(), 'loadavg_start': os.getloadavg(),
            'memory_method': 'peak RSS above the stage-start RSS (VmHWM reset through /proc/self/clear_refs) '
                             'in a fresh subprocess per stage, after a warm-up batch and malloc_trim',
            'timing': 'wall clock (perf_counter) of the stage alone, fresh subprocess per stage; floor = mean of '
                      'the floors timed at the start and end of each repeat'}


def main_bench(args):
    kron = kron_available() is not None and not args.no_kron
    if not kron: _log('Kronfluence is not importable (pip install -e ".[bench]"): timing influence_nb only.')
    specs = [QUICK] if args.quick else [w for w in (W1, W2) if w['name'] in args.workloads]
    repeats = 1 if args.quick else args.repeats
    data = load_results(args.out) if args.out else {}
    data['meta'] = meta(args.threads); data.setdefault('workloads', {})
    tables = []
    with tempfile.TemporaryDirectory(prefix='influence_nb-perf-') as wd:
        if not args.inprocess: data['meta']['engine'] = snapshot_engine(wd)
        for spec in specs:
            use_kron = kron and spec['kind'] == 'llama'
            if args.quick and args.inprocess: runs = [inprocess_repeat(spec, args.threads, use_kron, wd)]
            else:
                runs = []
                for r in range(repeats):
                    _log(f"{spec['name']}: repeat {r + 1}/{repeats}")
                    runs.append(one_repeat(spec, args.threads, use_kron, wd))
                    runs[-1]['_corr_true_fisher'] = scores_corr(wd) if use_kron else {}
            summ = summarise([{k: v for k, v in r.items() if not k.startswith('_')} for r in runs])
            summ['pearson_true_fisher_vs_kron'] = runs[-1].get('_corr_true_fisher', {})
            agree = None
            if use_kron and not args.no_agree:
                _log(f"{spec['name']}: agreement at equal settings")
                agree = run_child('agree', spec, wd, args.threads) if not args.inprocess else inprocess_agree(spec, args.threads, wd)
                _log('  ' + json.dumps(agree))
            key = spec['name'] if args.threads == 1 else f"{spec['name']}@{args.threads}threads"   # one entry per thread count
            data['workloads'][key] = {'spec': spec, 'threads': args.threads, 'runs': runs, 'summary': summ, 'agreement': agree}
            tables.append(table(f"{spec['name']} ({describe(spec)}; {args.threads} threads, {len(runs)} repeat(s))", summ))
            if agree:
                tables.append(f"Agreement with Kronfluence (empirical Fisher, damping {agree['damping']:.3g} on both): "
                              f"Pearson r = {agree['pearson_full']:.6f} full rank, {agree[f'pearson_rank{RANK}']:.6f} "
                              f"rank {RANK}; max |Λ| rel. error {max([v for v in agree['lambda_rel_err'].values() if isinstance(v, float)] or [float('nan')]):.2e}")
            if args.out: save_results(args.out, data)
    data['meta']['loadavg_end'] = os.getloadavg()
    if args.out: save_results(args.out, data)
    print('\n\n'.join(tables))


def report(path):
    "Markdown tables from a results file (no measuring)."
    data = load_results(path)
    out = []
    m = data.get('meta', {})
    if m: out.append(f"threads {m.get('threads')}, torch {m.get('torch')}, kronfluence {m.get('kronfluence')}, "
                     f"load average {m.get('loadavg_start')} -> {m.get('loadavg_end')}, engine {m.get('engine', {}).get('git_commit')}"
                     f"{' (+uncommitted)' if m.get('engine', {}).get('engine_dirty') else ''} {m.get('engine', {}).get('sha256', '')}")
    for name, w in data.get('workloads', {}).items():
        s = w['summary']
        out.append(table(f"{name} ({describe(w['spec'])}; {len(w['runs'])} repeat(s)) — wall time", s))
        cpu = dict(s, seconds=s['cpu_seconds'], ratios=s['cpu_ratios'])
        out.append(table(f"{name} — process CPU time", cpu))
        a = w.get('agreement')
        if a: out.append('Agreement: ' + json.dumps({k: v for k, v in a.items() if k != 'stage'}))
        if s.get('pearson_true_fisher_vs_kron'): out.append(f"true-Fisher runs (independent pseudo-labels): Pearson {s['pearson_true_fisher_vs_kron']}")
    if 'scaling' in data: out.append(scaling_table(data['scaling']['rows']))
    if 'micro' in data:
        out.append('| hot spot | current ms | alternative ms | speed-up | alternative |\n|---|---|---|---|---|\n' + '\n'.join(
            f"| {r['what']} | {r['current_ms']:.1f} | {r['alternative_ms']:.1f} | {r['current_ms'] / r['alternative_ms']:.1f}× | {r['note']} |"
            for r in data['micro']['rows']))
    print('\n\n'.join(out))


def describe(spec):
    if spec['kind'] == 'llama':
        return (f"Llama config, {spec['layers']} layers, hidden {spec['hidden']}, MLP {spec['mlp']}, vocab {spec['vocab']}, "
                f"T={spec['T']}, N={spec['N']}, {spec['Q']} queries, batch {spec['batch']}, MLP layers tracked")
    return f"bundled {spec['model']}, N={spec['N']} corpus sequences (≤{spec['T']} tokens), {spec['Q']} fact queries, batch {spec['batch']}"


# --quick --inprocess: everything in one process (CI smoke test; memory numbers less clean) ------------------------
def inprocess_repeat(spec, threads, kron, wd):
    res = {}
    order = ['floor', 'ours_fit'] + (['kron_fit'] if kron else []) + ['ours_scores_full'] + \
            (['kron_scores_full'] if kron else []) + ['ours_scores_r32'] + (['kron_scores_r32'] if kron else []) + \
            ['ours_self', 'floor']
    import io
    for i, st in enumerate(order):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf): child(st, spec, wd, threads)
        r = json.loads([l for l in buf.getvalue().splitlines() if l.startswith('RESULT:')][-1][7:])
        res['floor_end' if (st == 'floor' and i > 0) else st] = r
        _log(f"  {spec['name']} {st:18s} {r['seconds']:8.2f} s")
    res['_corr_true_fisher'] = scores_corr(wd) if kron else {}
    return res


def inprocess_agree(spec, threads, wd):
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf): child('agree', spec, wd, threads)
    return json.loads([l for l in buf.getvalue().splitlines() if l.startswith('RESULT:')][-1][7:])


# ---------------------------------------------------------------------------------------------------------------
# scaling
# ---------------------------------------------------------------------------------------------------------------
SCALING_BASE = dict(W1, name='scaling', N=64)
SCALING_AXES = {'N': [32, 64, 128, 256], 'Q': [4, 16, 64], 'T': [32, 64, 128], 'hidden': [128, 256, 512]}


def main_scaling(args):
    data = load_results(args.out) if args.out else {}
    rows = []
    axes = {k: v for k, v in SCALING_AXES.items() if k in args.axes}
    with tempfile.TemporaryDirectory(prefix='influence_nb-scaling-') as wd:
        engine = snapshot_engine(wd)
        for axis, values in axes.items():
            for v in values:
                spec = dict(SCALING_BASE, **{axis: v})
                if axis == 'hidden': spec['mlp'] = 4 * v
                stages = ['ours_scores_full', 'ours_scores_r32'] if axis == 'Q' else \
                    ['floor', 'ours_fit', 'ours_scores_full', 'ours_scores_r32']
                if axis == 'Q': stages = ['floor', 'ours_fit'] + stages     # factors needed; floor for the ratio
                row = {'axis': axis, 'value': v, 'spec': spec}
                for st in stages:
                    r = run_child(st, spec, wd, args.threads)
                    row[st] = {k: r[k] for k in ('seconds', 'cpu_seconds', 'peak_mb', 'load1')}
                _log(f"  {axis}={v}: " + ', '.join(f"{st} {row[st]['seconds']:.1f}s/{row[st]['peak_mb']:.0f}MB" for st in stages))
                rows.append(row)
                data['scaling'] = {'base': SCALING_BASE, 'threads': args.threads, 'rows': rows, 'engine': engine,
                                   'date': datetime.datetime.now().isoformat(timespec='seconds')}
                if args.out: save_results(args.out, data)
    print(scaling_table(rows))


def scaling_table(rows):
    lines = ['| axis | value | floor s | fit s (× floor) | scores full s (× floor) | scores r32 s | fit MB | scores full MB | scores r32 MB |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        fl = r.get('floor', {}).get('seconds')
        def s(st):
            x = r.get(st, {}).get('seconds')
            if x is None: return '—'
            return f"{x:.1f}" + (f" ({x / fl:.2f})" if fl and st != 'ours_scores_r32' else '')
        m = lambda st: f"{r[st]['peak_mb']:.0f}" if st in r else '—'
        lines.append(f"| {r['axis']} | {r['value']} | {fl:.1f} | {s('ours_fit')} | {s('ours_scores_full')} | "
                     f"{s('ours_scores_r32')} | {m('ours_fit')} | {m('ours_scores_full')} | {m('ours_scores_r32')} |")
    return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------------------------
# profile
# ---------------------------------------------------------------------------------------------------------------
PHASES = {}   # label -> [calls, wall seconds, cpu seconds], filled by the wrappers of `_label_engine`


def _label_engine():
    """Wrap the engine's internal steps (monkeypatching this process only) so that each call is (a) a
    `torch.profiler.record_function` range and (b) timed into `PHASES` (inclusive wall and CPU time), which gives
    phase shares without the profiler's overhead: forward, loss + pseudo-label sampling, backward, covariance
    accumulation, eigendecomposition, Λ rotations, query gradients, preconditioning, contraction."""
    from torch.profiler import record_function
    from influence_nb import kfac, ekfac, scores, modules

    @contextlib.contextmanager
    def phase(label):
        c0, t0 = time.process_time(), time.perf_counter()
        with record_function(label): yield
        p = PHASES.setdefault(label, [0, 0., 0.])
        p[0] += 1; p[1] += time.perf_counter() - t0; p[2] += time.process_time() - c0

    def wrap(mod, name, label):
        f = getattr(mod, name)
        def g(*a, **k):
            with phase(label): return f(*a, **k)
        setattr(mod, name, g)

    def wrap_gen(mod, name, label):
        f = getattr(mod, name)
        def g(*a, **k):
            it = f(*a, **k)
            while True:
                with phase(label):
                    try: x = next(it)
                    except StopIteration: return
                yield x
        setattr(mod, name, g)

    for mod in (kfac, ekfac, scores): wrap_gen(mod, 'layer_passes', '#layer_passes: one batch (fwd, loss, bwd, masking)')
    for owner, name, label in (                                          # the phases timed, each under its label
            (kfac, 'summed_loss', '#loss: summed_loss (incl. pseudo-label sampling)'),
            (kfac, '_check_finite', '#layer_passes: _check_finite'),
            (modules.Capture, 'out_grads', '#backward: Capture.out_grads (autograd.grad)'),
            (ekfac, 'fit_covariances', '#fit: fit_covariances (pass 1)'),
            (ekfac, 'eigen', '#fit: eigen (float64 eigh)'),
            (ekfac, 'fit_lambda', '#fit: fit_lambda (pass 2)'),
            (ekfac, 'fingerprint', '#fingerprint'),
            (ekfac, 'check_factors_finite', '#check_factors_finite'),
            (ekfac.Factors, 'save', '#Factors.save'),
            (scores, 'prepare_queries', '#scores: prepare_queries (query pass, preconditioning, rank truncation)'),
            (scores, 'rotated_grads', '#scores: rotated_grads (query gradients in the eigenbasis)'),
            (scores, 'query_form', '#scores: query_form (finite check, rank truncation)'),
            (scores, 'contract_scores', '#scores: contract_scores'),
            (scores, 'seq_grads', '#scores: seq_grads (per-sequence gradient)'),
            (ekfac.Factors, 'check', '#scores: Factors.check (fingerprint)')):
        wrap(owner, name, label)
    return phase


def _phase_table(total_label):
    tot = PHASES.get(total_label, [1, 1., 1.])
    lines = [f"{'phase (inclusive; nested phases are also counted in their parents)':72s} {'calls':>6s} {'wall s':>8s} "
             f"{'cpu s':>8s} {'% cpu':>6s}"]
    for k, (n, w, c) in sorted(PHASES.items(), key=lambda kv: -kv[1][2]):
        lines.append(f"{k:72s} {n:6d} {w:8.2f} {c:8.2f} {100 * c / tot[2]:5.1f}%")
    return lines


def _profile_setup(which, spec, workdir, threads):
    "Model, data and (for `which='scores'`) fitted factors of a profiling child, warmed up: `(model, train, queries, names, fdir)`."
    import influence_nb as inf
    model, train, queries, names = _child_setup(spec, threads)
    fdir = Path(workdir) / 'ours_factors_true'
    if which == 'scores' and not (fdir / 'factors.json').exists():
        inf.fit_factors(model, train, modules=names, batch_size=spec['batch'], progress=False).save(fdir)
    return model, train, queries, names, fdir


def child_profile(which, spec, workdir, threads):
    """Phase timing of the engine at the workload's size (no profiler), then torch.profiler operator tables.
    The scores profiler run uses N=64 training sequences: torch.profiler's memory grew past 5 GB on the full
    scoring loop (its per-op records), and per-batch operators scale linearly in N anyway."""
    import torch, influence_nb as inf
    from torch.profiler import profile, ProfilerActivity
    model, train, queries, names, fdir = _profile_setup(which, spec, workdir, threads)
    phase = _label_engine()
    fwd = model.forward
    def labelled_forward(*a, **k):
        with phase('#forward: model.forward'): return fwd(*a, **k)
    model.forward = labelled_forward

    def work(n_train, tag=''):
        tr = train[:n_train]
        if which == 'fit':
            with phase(f'#TOTAL fit_factors{tag}'):
                inf.fit_factors(model, tr, modules=names, batch_size=spec['batch'], progress=False).save(Path(workdir) / 'prof')
            return [f'#TOTAL fit_factors{tag}']
        f = inf.Factors.load(fdir)
        out = []
        for r in (None, RANK):
            with phase(f'#TOTAL pairwise_scores rank={r}{tag}'):
                inf.pairwise_scores(model, f, queries, tr, query_rank=r, batch_size=spec['batch'], progress=False)
            out.append(f'#TOTAL pairwise_scores rank={r}{tag}')
        return out

    lines = [f"# influence_nb {which} profile — {describe(spec)}; {threads} thread(s)",
             f"# date {datetime.datetime.now().isoformat(timespec='seconds')}; load average {os.getloadavg()[0]:.1f} "
             f"on {os.cpu_count()} cores (shared machine: wall time is inflated by other work; CPU time is the "
             "better measure at 1 thread)", '']
    # 1. phase timing at full size, no profiler
    if which == 'fit':
        PHASES.clear(); totals = work(len(train))
        lines += [f'## Phases at full size (N={len(train)}), no profiler: wall and process CPU seconds', ''] + _phase_table(totals[0])
    else:
        f = inf.Factors.load(fdir)
        for r in (None, RANK):
            PHASES.clear()
            with phase(f'#TOTAL pairwise_scores rank={r}'):
                inf.pairwise_scores(model, f, queries, train, query_rank=r, batch_size=spec['batch'], progress=False)
            lines += [f'## Phases at full size (N={len(train)}, {len(queries)} queries, query_rank={r}), no profiler', '']
            lines += _phase_table(f'#TOTAL pairwise_scores rank={r}') + ['']
    # 2. operator tables from torch.profiler
    n_prof = len(train) if which == 'fit' else min(64, len(train))
    PHASES.clear()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        work(n_prof, ' (profiled)')
    wall = time.perf_counter() - t0
    ka = prof.key_averages()
    lines += ['', f'## torch.profiler operator tables (N={n_prof}{", both ranks" if which == "scores" else ""}; '
              f'profiled wall {wall:.1f} s incl. profiler overhead)', '',
              '### Top operators by self CPU time', '',
              ka.table(sort_by='self_cpu_time_total', row_limit=25, max_name_column_width=60),
              '', '### Top operators by self CPU time, grouped by input shapes', '',
              prof.key_averages(group_by_input_shape=True).table(sort_by='self_cpu_time_total', row_limit=30,
                                                                 max_name_column_width=40, max_shapes_column_width=80)]
    Path(args_out_profile(which)).write_text('\n'.join(lines) + '\n')
    print('RESULT:' + json.dumps({'stage': f'profile_{which}', 'seconds': wall}), flush=True)


def child_memprofile(which, spec, workdir, threads):
    """Peak resident memory of each engine phase (no profiler): the peak-RSS counter is reset when a phase starts and
    read when it ends. Phases are top-level engine functions (never nested), so resets do not interfere."""
    import torch, influence_nb as inf
    from influence_nb import ekfac, scores
    model, train, queries, names, fdir = _profile_setup(which, spec, workdir, threads)
    rows = []

    def wrap(obj, name, label):
        f = getattr(obj, name)
        def g(*a, **k):
            _trim(); rss0 = _status_kb('VmRSS'); Path('/proc/self/clear_refs').write_text('5'); t0 = time.perf_counter()
            out = f(*a, **k)
            rows.append((label, rss0 / 1024, _status_kb('VmHWM') / 1024, _status_kb('VmRSS') / 1024, time.perf_counter() - t0))
            return out
        setattr(obj, name, g)
    if which == 'fit':
        for n, l in (('fit_covariances', 'pass 1: fit_covariances'), ('eigen', 'eigen (per layer)'),
                     ('fit_lambda', 'pass 2: fit_lambda'), ('check_factors_finite', 'check_factors_finite'),
                     ('fingerprint', 'fingerprint')):
            wrap(ekfac, n, l)
        wrap(ekfac.Factors, 'save', 'Factors.save')
        _trim(); base = _status_kb('VmRSS') / 1024
        inf.fit_factors(model, train, modules=names, batch_size=spec['batch'], progress=False).save(Path(workdir) / 'mp')
    else:
        wrap(scores, 'prepare_queries', 'prepare_queries (query pass, preconditioning)')
        wrap(ekfac.Factors, 'check', 'Factors.check (fingerprint)')
        f0 = scores.prepare_queries
        def pq_then_reset(*a, **k):    # the scoring loop starts when prepare_queries returns
            out = f0(*a, **k); Path('/proc/self/clear_refs').write_text('5'); return out
        scores.prepare_queries = pq_then_reset
        _trim(); base = _status_kb('VmRSS') / 1024
        for r in (None, RANK):
            f = inf.Factors.load(fdir)
            rows.append((f'-- pairwise_scores query_rank={r}: Factors.load done', base, _status_kb('VmRSS') / 1024,
                         _status_kb('VmRSS') / 1024, 0.))
            s = inf.pairwise_scores(model, f, queries, train, query_rank=r, batch_size=spec['batch'], progress=False)
            rows.append((f'   scoring loop (rank={r})', float('nan'), _status_kb('VmHWM') / 1024, _status_kb('VmRSS') / 1024, 0.))
            del s, f; _trim()
    lines = [f"# peak memory per phase — influence_nb {which}, {describe(spec)}",
             f"# stage-start RSS {base:.0f} MB (model, data, warm-up); all values MB of resident memory",
             f"{'phase':55s} {'RSS at start':>12s} {'peak':>8s} {'peak-start':>10s} {'RSS at end':>10s} {'seconds':>8s}"]
    for label, r0, pk, r1, sec in rows:
        lines.append(f"{label:55s} {r0:12.0f} {pk:8.0f} {pk - r0:10.0f} {r1:10.0f} {sec:8.1f}")
    print('\n'.join(lines))
    print('RESULT:' + json.dumps({'stage': f'memprofile_{which}', 'rows': rows, 'base_mb': base}), flush=True)


def args_out_profile(which):
    return HERE / f'profile_{which}.txt'


def main_profile(args):
    with tempfile.TemporaryDirectory(prefix='influence_nb-profile-') as wd:
        engine = snapshot_engine(wd)
        for which in args.profile_what:
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE='1', PYTHONWARNINGS='ignore',
                       PYTHONPATH=engine['path'] + os.pathsep + os.environ.get('PYTHONPATH', ''),
                       INFLUENCE_NB_DATA=os.environ.get('INFLUENCE_NB_DATA', str(ROOT / 'data')))
            cmd = [sys.executable, str(Path(__file__).resolve()), '--child', f'profile_{which}', '--spec', json.dumps(W1),
                   '--workdir', wd, '--threads', str(args.threads)]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(ROOT))
            if p.returncode: raise RuntimeError(p.stderr[-4000:])
            # peak memory per phase (no profiler running), appended to the same file
            cmd[3] = f'memprofile_{which}'
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(ROOT))
            if p.returncode: raise RuntimeError(p.stderr[-4000:])
            mem = '\n'.join(l for l in p.stdout.splitlines() if not l.startswith('RESULT:'))
            with open(args_out_profile(which), 'a') as fh:
                fh.write('\n## Peak memory per phase (separate run, no profiler)\n\n' + mem + '\n')
                fh.write(f"\n# engine: git {engine['git_commit']}{' + uncommitted changes' if engine['engine_dirty'] else ''}, "
                         f"sources sha256 {engine['sha256']} (snapshot {engine['snapshot_time']})\n")
            _log(f"wrote {args_out_profile(which)}")


# ---------------------------------------------------------------------------------------------------------------
# micro-benchmarks of the engine's hot spots against alternatives (numbers for the README's suggestions)
# ---------------------------------------------------------------------------------------------------------------
def _cpu_ms(f, n=5):
    "Median process CPU time of `f()` in ms (one warm-up call); CPU time is steadier than wall on a shared machine."
    f()
    ts = []
    for _ in range(n):
        c0 = time.process_time(); f(); ts.append((time.process_time() - c0) * 1e3)
    return median(ts)


def _micro_adder(rows):
    "`add(what, cur, alt, note, check=None)`: assert the pair agrees (`check`), time both, append a row to `rows`."
    def add(what, cur, alt, note, check=None):
        if check is not None: check()
        a, b = _cpu_ms(cur), _cpu_ms(alt)
        rows.append((what, a, b, note))
        _log(f"  {what}: {a:.1f} ms -> {b:.1f} ms")
    return add


def _orth(n):
    "A random orthogonal float64 [n, n] matrix, column-major like the engine's eigenbasis Q."
    import torch
    x = torch.randn(n, n, dtype=torch.float64)
    return torch.linalg.eigh(x @ x.T)[1]


def _micro_pass1(add, a2, g2, o, i, shape, threads):
    "Pass 1 (covariances): float32 addmm_, a float64 accumulator through a buffer, and BLAS ssyrk on the wide side."
    import torch
    A64 = torch.zeros(i, i, dtype=torch.float64); A32 = torch.zeros(i, i); buf = torch.empty(i, i)
    add(f'pass 1: A += aᵀa per batch {shape}', lambda: A64.add_((a2.T @ a2).double().cpu()),
        lambda: A32.addmm_(a2.T, a2), 'float32 addmm_ into a preallocated buffer (convert once at the end)')
    add(f'pass 1: same, keeping a float64 accumulator {shape}', lambda: A64.add_((a2.T @ a2).double().cpu()),
        lambda: A64.add_(torch.mm(a2.T, a2, out=buf)), 'mm(out=buffer) then in-place add_ into float64')
    if o < i: return               # the 1024-wide side: a symmetric rank-k update computes one triangle (half the work)
    try:
        import numpy as np
        from scipy.linalg import blas
        from threadpoolctl import threadpool_limits
    except ImportError: return
    S32 = torch.zeros(o, o); SF = np.zeros((o, o), dtype=np.float32, order='F'); gF = g2.numpy().T
    def syrk():
        with threadpool_limits(threads): blas.ssyrk(1.0, gF, beta=1.0, c=SF, trans=0, lower=0, overwrite_c=1)
    def check_syrk():
        c = blas.ssyrk(1.0, gF, trans=0, lower=0); c = np.triu(c) + np.triu(c, 1).T
        torch.testing.assert_close(torch.from_numpy(c), g2.T @ g2, rtol=1e-4, atol=1e-3)
    add(f'pass 1: S += dᵀd, d_out={o} (torch addmm_ vs BLAS ssyrk)', lambda: S32.addmm_(g2.T, g2), syrk,
        'scipy.linalg.blas.ssyrk on a numpy view (CPU only): upper triangle, symmetrise once at the end', check=check_syrk)


def _micro_pass2(add, a, g, QA, QS, shape):
    "Pass 2 (Λ), per-sequence gradients and the finite check of one batch `a` [B, T, i], `g` [B, T, o]."
    import torch
    o, i = QS.shape[0], QA.shape[0]
    lam, lam32 = torch.zeros(o, i, dtype=torch.float64), torch.zeros(o, i)
    QA32, QS32 = QA.float().contiguous(), QS.float().contiguous()
    def lam_cur():
        rot = torch.einsum('bto,bti->boi', g @ QS.to(g.dtype), a @ QA.to(a.dtype))
        lam.add_((rot ** 2).sum(0).double().cpu())
    def lam_alt():
        rot = torch.bmm((g @ QS32).transpose(1, 2), a @ QA32)
        lam32.add_(rot.square_().sum(0))
    add(f'pass 2: Λ += Σ_b (Q_Sᵀ DW̄_b Q_A)² {shape}', lam_cur, lam_alt,
        'cached float32 contiguous Q, bmm instead of einsum, in-place square, float32 accumulator')
    add(f'seq_grads {shape}', lambda: torch.einsum('bto,bti->boi', g, a), lambda: torch.bmm(g.transpose(1, 2), a),
        'torch.bmm(outgᵀ, acts): einsum permutes its output into a fresh tensor',
        check=lambda: torch.testing.assert_close(torch.einsum('bto,bti->boi', g, a), torch.bmm(g.transpose(1, 2), a)))
    add(f'_check_finite of acts+outg {shape}',
        lambda: (bool(torch.isfinite(a).all()), bool(torch.isfinite(g).all())),
        lambda: bool(torch.isfinite(a.sum() + g.sum())), 'one reduction: a sum is non-finite iff an entry is (or overflows)')


def _top_r(P, r):
    "Rank-`r` factors (U·S, V) of the preconditioned queries P [q, o, i] by a full SVD: the engine's expression."
    import torch
    U, S, Vh = torch.linalg.svd(P, full_matrices=False)
    return U[..., :r] * S[:, None, :r], Vh[:, :r].transpose(-1, -2)


def _top_r_gram(P, r):
    "The same from the top-r eigenvectors of the small Gram matrix PᵀP (or PPᵀ), float64, exact up to rounding."
    import torch
    o, i = P.shape[-2:]
    if o >= i:
        W = torch.linalg.eigh(P.transpose(-1, -2) @ P)[1]               # [q, i, i]
        Vr = W[..., -r:].flip(-1); return P @ Vr, Vr
    W = torch.linalg.eigh(P @ P.transpose(-1, -2))[1]                   # [q, o, o]
    Ur = W[..., -r:].flip(-1); return Ur, P.transpose(-1, -2) @ Ur


def _micro_queries(add, QA, QS, B, q, r, shape):
    "Preconditioning `q` query gradients, their rank-`r` SVD, and the per-batch contraction of the \"grad\" path."
    import torch
    o, i = QS.shape[0], QA.shape[0]
    QA32, QS32 = QA.float().contiguous(), QS.float().contiguous()
    V = torch.randn(q, o, i, dtype=torch.float64); D = torch.rand(o, i, dtype=torch.float64) + .1
    D32, V32 = D.float(), V.float()
    add(f'precondition {q} queries {shape}', lambda: QS @ ((QS.T @ V @ QA) / D) @ QA.T,
        lambda: QS32 @ ((QS32.T @ V32 @ QA32) / D32) @ QA32.T, 'float32 rotations (Kronfluence default)')
    P = QS @ ((QS.T @ V @ QA) / D) @ QA.T
    def check_svd():
        U1, V1 = _top_r(P, r); U2, V2 = _top_r_gram(P, r)
        torch.testing.assert_close(U1 @ V1.transpose(-1, -2), U2 @ V2.transpose(-1, -2), rtol=1e-6, atol=1e-9)
    add(f'rank-{r} SVD of {q} preconditioned queries {shape}', lambda: _top_r(P, r), lambda: _top_r_gram(P, r),
        'top-r eigenvectors of the small Gram matrix PᵀP (float64): U·S = P·V_r', check=check_svd)
    U, Vr = _top_r(P, r); G = torch.randn(B, o, i)
    U32, Vr32 = U.float(), Vr.float(); Pd = (U32 @ Vr32.transpose(-1, -2))
    G32 = torch.randn(B, o, i); P32 = V.float()
    Pflat = P32.reshape(q, -1).contiguous()
    add(f'"grad" path contraction ⟨q̃, DW̄_b⟩ per batch {shape}', lambda: torch.einsum('qoi,boi->qb', P32, G32),
        lambda: Pflat @ G32.reshape(B, -1).T, 'one mm against the query matrix flattened once (einsum permutes/copies '
        'the 16 preconditioned queries in every batch)',
        check=lambda: torch.testing.assert_close(torch.einsum('qoi,boi->qb', P32, G32), Pflat @ G32.reshape(B, -1).T,
                                                 rtol=1e-4, atol=1e-2))
    add(f'rank-{r} "grad" contraction per batch {shape}',
        lambda: torch.einsum('qoi,boi->qb', U32 @ Vr32.transpose(-1, -2), G),
        lambda: torch.einsum('qoi,boi->qb', Pd, G), 'reconstruct U Vᵀ once, not in every batch')


def _micro_sampling(add, B, T, vocab=2048):
    "Pseudo-label sampling (true Fisher), one batch of W1: per-row multinomial against an inverse CDF."
    import torch
    from influence_nb.kfac import seq_generator
    logits = torch.randn(B, T - 1, vocab)
    gens = lambda: [seq_generator(0, 0, k) for k in range(B)]                 # the engine's per-sequence generators
    def samp_cur():
        probs = logits.softmax(-1); out = torch.empty(B, T - 1, dtype=torch.long)
        for k, gk in enumerate(gens()): out[k] = torch.multinomial(probs[k], 1, generator=gk)[:, 0]
        return out
    def samp_alt():
        cdf = logits.softmax(-1).cumsum_(-1)
        u = torch.stack([torch.rand(T - 1, generator=gk) for gk in gens()])[..., None] * cdf[..., -1:]
        return torch.searchsorted(cdf, u)[..., 0].clamp_max_(vocab - 1)
    add(f'pseudo-label sampling, one batch ({B}×{T - 1} tokens, vocab {vocab})', samp_cur, samp_alt,
        'inverse CDF: one uniform per token (per-sequence generators kept) + cumsum + searchsorted')


def micro(threads=1, B=8, T=128, q=16, r=RANK,
          shapes=((1024, 256), (256, 1024)), # (d_out, d_in) of the layers timed: W1's MLP matrices
         ):
    "Each row: the engine's current expression for one W1 layer, and the alternative; same result asserted."
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows = []; add = _micro_adder(rows)
    for o, i in shapes:
        shape = f'(o={o}, i={i})'
        a = torch.randn(B, T, i); g = torch.randn(B, T, o)                # [B, T, d_in], [B, T, d_out]
        _micro_pass1(add, a.reshape(-1, i), g.reshape(-1, o), o, i, shape, threads)
        QA, QS = _orth(i), _orth(o)
        _micro_pass2(add, a, g, QA, QS, shape)
        _micro_queries(add, QA, QS, B, q, r, shape)
    _micro_sampling(add, B, T)
    lines = ['| hot spot (one W1 layer / batch) | current (ms CPU) | alternative (ms CPU) | speed-up | alternative |',
             '|---|---|---|---|---|']
    for what, a, b, note in rows:
        lines.append(f'| {what} | {a:.1f} | {b:.1f} | {a / b:.1f}× | {note} |')
    return rows, '\n'.join(lines)


def main_micro(args):
    rows, md = micro(args.threads)
    if args.out:
        data = load_results(args.out)
        data['micro'] = {'threads': args.threads, 'date': datetime.datetime.now().isoformat(timespec='seconds'),
                         'rows': [{'what': w, 'current_ms': round(a, 2), 'alternative_ms': round(b, 2), 'note': n}
                                  for w, a, b, n in rows]}
        save_results(args.out, data)
    print(md)


# ---------------------------------------------------------------------------------------------------------------
def add_run_args(ap, results: Path):
    "The arguments every benchmark script shares: `--out`, and the hidden ones a stage's child process receives."
    ap.add_argument('--out', default=None, help=f'results JSON (default {results.relative_to(ROOT)}; --quick: none)')
    ap.add_argument('--child', default=None, help=argparse.SUPPRESS)
    ap.add_argument('--spec', default=None, help=argparse.SUPPRESS)
    ap.add_argument('--workdir', default=None, help=argparse.SUPPRESS)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--threads', type=int, default=2, help='torch.set_num_threads in every stage (default 2)')
    ap.add_argument('--repeats', type=int, default=3, help='repeats of every workload (default 3)')
    ap.add_argument('--workloads', default='W1,W2', help='comma-separated subset of W1,W2')
    ap.add_argument('--quick', action='store_true', help='small smoke run (< 1 min), one process, one repeat')
    ap.add_argument('--scaling', action='store_true', help='time/memory against N, queries, sequence length, width')
    ap.add_argument('--axes', default='N,Q,T,hidden', help='scaling axes to run (comma-separated)')
    ap.add_argument('--profile', action='store_true', help='write benchmarks/profile_fit.txt and profile_scores.txt')
    ap.add_argument('--profile-what', default='fit,scores')
    ap.add_argument('--micro', action='store_true', help='micro-benchmarks of hot spots against alternatives')
    ap.add_argument('--report', action='store_true', help='print the markdown tables of --out (or the default results file)')
    ap.add_argument('--no-kron', action='store_true', help='skip Kronfluence even when importable')
    ap.add_argument('--no-agree', action='store_true', help='skip the agreement check')
    add_run_args(ap, RESULTS)
    a = ap.parse_args(argv)
    a.workloads = [w.strip() for w in a.workloads.split(',') if w.strip()]
    a.axes = [w.strip() for w in a.axes.split(',') if w.strip()]
    a.profile_what = [w.strip() for w in a.profile_what.split(',') if w.strip()]
    a.inprocess = a.quick
    if a.out is None and not a.quick: a.out = str(RESULTS)
    if a.threads < 1: ap.error('--threads must be >= 1')
    return a


if __name__ == '__main__':
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    args = parse()
    if args.child:
        spec = json.loads(args.spec)
        if args.child.startswith('profile_'): child_profile(args.child[len('profile_'):], spec, args.workdir, args.threads)
        elif args.child.startswith('memprofile_'): child_memprofile(args.child[len('memprofile_'):], spec, args.workdir, args.threads)
        else: child(args.child, spec, args.workdir, args.threads)
    elif args.scaling: main_scaling(args)
    elif args.profile: main_profile(args)
    elif args.micro: main_micro(args)
    elif args.report: report(args.out)
    else: main_bench(args)
