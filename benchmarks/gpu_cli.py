"""The command line and the explorer on CUDA, against the CPU, on a user-shaped setup (a Llama folder, nested JSONL).

    python benchmarks/gpu_cli.py --out benchmarks/results/gpu_cli.json      # on a machine with CUDA

Runs `influence-nb fit-factors`, `score`, `scan --query-rank 8 --refine` and `explore --no-serve` with `--device cpu`,
`--device cuda` and `--device cuda --dtype bfloat16` on a random 2-block Llama saved with the bundled tokenizer, over
160 bundled records written as JSONL with a nested text field, and compares with the CPU run: covariances, scores,
the scan's top 10 and the explorer's table. Also CG and PCG on a `ClassifierAsLM` in float64 on both devices (its
Gauss–Newton products run the net once per example). Without CUDA it says so and exits 0.
`--extra-site DIR` appends a folder of pure-Python packages to sys.path (a machine without fastcore or ipywidgets).
"""
import argparse, sys, os, json, io, time, contextlib, tempfile, traceback, importlib.util
from pathlib import Path
p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument('--out', default=str(Path(__file__).resolve().parent/'results'/'gpu_cli.json'))
p.add_argument('--extra-site', default=None)
p.add_argument('--threads', type=int, default=8)
a = p.parse_args()
OUT = Path(a.out)
res = {'steps': {}, 'errors': {}, 'command': ' '.join(['python', 'benchmarks/gpu_cli.py'] + sys.argv[1:])}
def save(): OUT.parent.mkdir(parents=True, exist_ok=True); OUT.write_text(json.dumps(res, indent=1) + '\n')
res['have'] = {m: importlib.util.find_spec(m) is not None for m in ('pandas', 'pyarrow', 'matplotlib', 'safetensors', 'fastcore', 'tqdm',
                                                                   'tokenizers', 'transformers', 'ipywidgets', 'IPython')}
if a.extra_site: sys.path.append(str(Path(a.extra_site).resolve()))   # the machine's own packages win
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch, numpy as np
if not torch.cuda.is_available(): print('no CUDA device here: nothing to compare'); sys.exit(0)
import influence_nb as inf
from influence_nb.cli import main as cli
from influence_nb.search import ScanResult
import pandas as pd
res['env'] = dict(torch=torch.__version__, cuda=torch.cuda.is_available(), device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
torch.set_num_threads(a.threads)
tmp = Path(tempfile.mkdtemp())
tok = inf.load_tokenizer(inf.data_dir()/'tokenizer')
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(tmp/'model')
tok.save_pretrained(tmp/'model')
recs = [json.loads(l) for l in (inf.data_dir()/'corpus'/'train.jsonl').read_text().splitlines()[:160]]
(tmp/'c.jsonl').write_text(''.join(json.dumps({'doc': {'body': r['text']}}) + '\n' for r in recs))
qs = [json.loads(l) for l in (inf.data_dir()/'corpus'/'queries.jsonl').read_text().splitlines() if '"en"' in l][:4]
(tmp/'q.jsonl').write_text(''.join(json.dumps({k: q[k] for k in ('id', 'prompt', 'completion')}) + '\n' for q in qs))
def run(*argv):
    o, e = io.StringIO(), io.StringIO()
    t = time.time()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e): rc = cli([str(a) for a in argv])
    return rc, o.getvalue(), e.getvalue(), round(time.time() - t, 2)
M = ['--model', tmp/'model', '--text-field', 'doc.body', '--max-length', 48]
def side(dev, dtype=None):
    tag = dev + ('-' + dtype if dtype else ''); x = ['--device', dev] + (['--dtype', dtype] if dtype else [])
    out = {}
    out['fit'] = run('fit-factors', *M, '--data', tmp/'c.jsonl', '--out', tmp/f'f-{tag}', *x)
    out['score'] = run('score', *M, '--data', tmp/'c.jsonl', '--factors', tmp/f'f-{tag}', '--queries', tmp/'q.jsonl', '--out', tmp/f's-{tag}.parquet', *x)
    out['scan'] = run('scan', *M, '--corpus', tmp/'c.jsonl', '--factors', tmp/f'f-{tag}', '--queries', tmp/'q.jsonl', '--k', 10,
                      '--query-rank', 8, '--refine', '--out', tmp/f'r-{tag}.parquet', '--quiet', *x)
    out['explore'] = run('explore', '--model', tmp/'model', '--corpus', tmp/'c.jsonl', '--text-field', 'doc.body', '--queries', tmp/'q.jsonl',
                         '--factors', tmp/f'f-{tag}', '--no-serve', *x)
    res['steps'][tag] = {k: dict(rc=v[0], seconds=v[3], err=v[2][-600:]) for k, v in out.items()}
    save()
    return out
for dev, dt in (('cpu', None), ('cuda', None), ('cuda', 'bfloat16')):
    try: side(dev, dt)
    except Exception: res['errors'][f'{dev}-{dt}'] = traceback.format_exc()[-2000:]; save()
def cmp(tag):
    c = {}
    fa, fb = inf.Factors.load(tmp/'f-cpu', covariances=True), inf.Factors.load(tmp/f'f-{tag}', covariances=True)
    c['factors A,S max rel (Frobenius)'] = max(float((fb.tensors[n][k].double() - fa.tensors[n][k].double()).norm() / fa.tensors[n][k].double().norm())
                                                for n in fa.modules for k in ('A', 'S'))
    sa, sb = pd.read_parquet(tmp/'s-cpu.parquet'), pd.read_parquet(tmp/f's-{tag}.parquet')
    cols = [q['id'] for q in qs]
    a, b = sa[cols].to_numpy(float), sb[cols].to_numpy(float)
    c['score max rel diff'] = float(np.abs(a - b).max() / np.abs(a).max())
    c['score pearson'] = float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    ra, rb = ScanResult.load(tmp/'r-cpu.parquet'), ScanResult.load(tmp/f'r-{tag}.parquet')
    c['scan top-10 overlap per query'] = [len(set(x.tolist()) & set(y.tolist())) for x, y in zip(ra.indices, rb.indices)]
    c['scan top-10 identical order'] = [x.tolist() == y.tolist() for x, y in zip(ra.indices, rb.indices)]
    c['scan score max rel diff'] = float((ra.scores.double() - rb.scores.double()).abs().max() / ra.scores.double().abs().max())
    res['compare_' + tag] = c; save()
for tag in ('cuda', 'cuda-bfloat16'):
    try: cmp(tag)
    except Exception: res['errors']['cmp-' + tag] = traceback.format_exc()[-2000:]; save()
try:   # explore --no-serve tables: printed top ids
    res['explore_out'] = {t: run('explore', '--model', tmp/'model', '--corpus', tmp/'c.jsonl', '--text-field', 'doc.body', '--queries', tmp/'q.jsonl',
                                 '--factors', tmp/'f-cpu', '--no-serve', '--device', d)[1][-1500:] for t, d in (('cpu', 'cpu'), ('cuda', 'cuda'))}
    import re
    ids = {t: re.findall(r'(?m)^(\d+)\s+(\d+)\s', o) for t, o in res['explore_out'].items()}   # (rank, training id) rows
    res['explore same top ids'] = bool(ids['cpu']) and ids['cpu'] == ids['cuda']
except Exception: res['errors']['explore'] = traceback.format_exc()[-2000:]
save()
try:   # ClassifierAsLM: CG on CUDA (the net runs once per example when unwatched) against the CPU, float64
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5)).double()
    X, y = torch.randn(80, 16, dtype=torch.float64), torch.randint(0, 5, (80,))
    seqs = inf.ClassifierAsLM.sequences(range(80), y)
    out = {}
    for dev in ('cpu', 'cuda'):
        clf = inf.ClassifierAsLM(net, X).to(dev)
        for strat in ('cg', 'pcg'):
            f = inf.fit_factors(clf, seqs, strat, modules='all', progress=False, solver={'tol': 1e-10})
            out[dev, strat] = inf.pairwise_scores(clf, f, seqs[:6], seqs, damping=1e-2, progress=False).total.double().cpu()
    res['classifier_cg'] = {s: float((out['cuda', s] - out['cpu', s]).abs().max() / out['cpu', s].abs().max()) for s in ('cg', 'pcg')}
except Exception: res['errors']['classifier'] = traceback.format_exc()[-2000:]
save()
print(json.dumps({k: v for k, v in res.items() if k.startswith(('compare', 'classifier', 'explore same', 'errors', 'env'))}, indent=1))
