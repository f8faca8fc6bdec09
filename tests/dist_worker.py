"""Worker for tests/test_distributed.py: fit EK-FAC factors on a tiny model and compute pairwise, self and scan
scores, either alone (`python tests/dist_worker.py OUT CORPUS`) or as every rank of
`torchrun --standalone --nproc_per_node N tests/dist_worker.py OUT CORPUS` (gloo on CPU). Rank 0 writes
everything to OUT/results.safetensors so the test can compare a single process with N.
`dist_worker.py --refusals OUT` runs calls that one process refuses and another would not (`refusals`)."""
import inspect, json, os, sys
from pathlib import Path
import torch
import torch.distributed as dist
from safetensors.torch import save_file

torch.set_num_threads(1)
import influence_nb as inf
from influence_nb.kfac import dist_info
import influence_nb.search as search
from influence_nb.search import scan, read_scores

_convert, BM25_READ = search._convert, []
def _spy(items, *args, **kw):
    "Note the records the BM25 pass converts (tokenizes) in this process: called from `_prefilter`'s `docs`."
    if any(f.function == 'docs' for f in inspect.stack()[1:4]): BM25_READ.extend(it.index for it in items)
    return _convert(items, *args, **kw)
search._convert = _spy


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    train = inf.as_sequences([torch.randint(1, 32, (int(torch.randint(4, 16, (1,), generator=g)),), generator=g)
                              for _ in range(37)])                       # 37: shards of unequal size
    queries = inf.as_sequences([{'input_ids': torch.randint(1, 32, (8,), generator=g),
                                 'labels': [-100] * 5 + torch.randint(1, 32, (3,), generator=g).tolist()} for _ in range(3)])
    return train, queries


def gathered(obj, world):
    if world == 1: return [obj]
    got = [None] * world; dist.all_gather_object(got, obj); return got


def text(s): return torch.tensor(list(s.encode()), dtype=torch.uint8)


def candidates(model, f, queries, corpus_path, rank, world) -> dict:
    "Scans with BM25 candidates: each process converts only its share in the first pass; bad records count and stop as in one."
    BM25_READ.clear()
    s = scan(model, f, queries, corpus_path, k=4, candidates=6, chunk_size=8, batch_size=4, progress=False)
    res = {'cand_indices': s.indices, 'cand_scores': s.scores, 'cand_n_train': torch.tensor(s.n_train)}
    for r, got in enumerate(gathered(sorted(BM25_READ), world)): res[f'bm25_read_{r}'] = torch.tensor(got, dtype=torch.long)
    bad = Path(corpus_path).with_name('bad.jsonl')       # the corpus with bad lines among its records
    s = scan(model, f, queries, bad, k=4, candidates=6, chunk_size=8, batch_size=4, progress=False, on_bad_record='skip')
    res.update({'skip_indices': s.indices, 'skip_n_skipped': torch.tensor(s.n_skipped), 'skip_first': text(s.first_skipped)})
    try: scan(model, f, queries, bad, k=4, candidates=6, chunk_size=8, batch_size=4, progress=False); msg = 'no error'
    except (ValueError, RuntimeError) as e: msg = f'{type(e).__name__}: {e}'
    for r, m in enumerate(gathered(msg, world)): res[f'raise_{r}'] = text(m)
    return res


def main(out, corpus_path):
    if int(os.environ.get('WORLD_SIZE', '1')) > 1: dist.init_process_group('gloo')
    rank, world = dist_info()
    out = Path(out)
    model = inf.tiny_model('gpt2', layers=2).double()
    train, queries = data()
    f = inf.fit_factors(model, train, 'ekfac', batch_size=4, progress=False)
    res = {}
    for n in f.modules:
        for key in ('A', 'S', 'Lambda'): res[f'{n}::{key}'] = f.tensors[n][key]
    res['pairwise'] = inf.pairwise_scores(model, f, queries, train, batch_size=4, progress=False).total
    res['self'] = inf.self_scores(model, f, train, batch_size=4, progress=False)
    res['grouped'] = inf.pairwise_scores(model, f, queries, train, batch_size=4, progress=False, query_groups=[0, 1, 0]).total
    s1 = scan(model, f, queries, train, k=5, chunk_size=10, batch_size=3, progress=False)
    s2 = scan(model, f, queries, corpus_path, k=6, query_rank=1, refine=True, chunk_size=8, batch_size=4,
              scores_path=out/f'scores-{world}', checkpoint=out/f'scan-{world}.ckpt', checkpoint_every=8, progress=False)
    res.update({'scan_indices': s1.indices, 'scan_scores': s1.scores, 'refined_indices': s2.indices,
                'refined_scores': s2.scores})
    if world > 1:   # every rank holds the same top-k: check it here
        for t in (s1.indices, s2.indices):
            ref = t.clone(); dist.broadcast(ref, 0)
            assert torch.equal(ref, t), f"rank {rank} disagrees with rank 0 on the scan result"
    res.update(candidates(model, f, queries, corpus_path, rank, world))
    kept = s2.indices.flatten().tolist()                # the records' ids, noted as the scan went, on every rank
    assert s2.record_ids == {i: f'd{i}' for i in kept if i % 3 == 0}, (rank, s2.record_ids)
    res['refined_id_indices'] = torch.tensor(sorted(s2.record_ids))
    if rank == 0:
        ids = read_scores(out/f'scores-{world}').index.get_level_values('id')
        res['scan_all_ids'] = torch.tensor([int(x[1:]) if x else -1 for x in ids])
        res['scan_all_scores'] = torch.tensor(read_scores(out/f'scores-{world}').to_numpy())
        save_file({k: v.contiguous() for k, v in res.items()}, str(out/'results.safetensors'))
    if world > 1: dist.barrier(); dist.destroy_process_group()


class ShardError(ValueError): "A caller's own error (a ValueError), met in the loop over a pass, in process 0 only."

def _refused_in_body(rank, call):
    "`call()` with `contract_scores`, which `pairwise_scores` calls in its loop over the scoring pass, refusing in process 0."
    import influence_nb.scores as scores_module
    orig = scores_module.contract_scores
    def refusing(*a, **k):
        if rank == 0: raise ShardError('refused in the loop over the pass, in process 0 only')
        return orig(*a, **k)
    scores_module.contract_scores = refusing
    try: return call()
    finally: scores_module.contract_scores = orig

def refusals(out):
    "Calls where only process 0 of 2 meets what is refused; each process writes every call's error to OUT/refusals-RANK.json."
    if int(os.environ.get('WORLD_SIZE', '1')) > 1: dist.init_process_group('gloo')
    rank, world = dist_info()
    model = inf.tiny_model('gpt2', layers=2).double()
    train, queries = data()
    f = inf.fit_factors(model, train, 'ekfac', batch_size=4, progress=False)
    total = lambda z, b: z.logsumexp(-1).sum() * torch.ones(len(z), dtype=z.dtype)     # each row its batch's total
    nan = inf.tiny_model('gpt2', layers=2).double()
    with torch.no_grad(): nan.transformer.wpe.weight[3] = float('nan')                  # position 3: in sequence 0 only
    calls = {'pairwise': lambda: inf.pairwise_scores(model, f, queries, train, batch_size=2, progress=False, measurement=total),
             'self': lambda: inf.self_scores(model, f, train[:3], batch_size=3, progress=False, measurement=total),
             'scan': lambda: scan(model, f, queries, train, k=2, batch_size=2, progress=False, measurement=total),
             'fit': lambda: inf.fit_factors(nan, inf.as_sequences([[1, 2, 3, 4], [4, 5, 6], [7, 8, 9]]), 'ekfac', progress=False)}
    m32 = inf.tiny_model('gpt2', layers=2)                                                 # float32: V / 1e-45 overflows
    fd = inf.fit_factors(m32, train, 'diagonal', batch_size=8, progress=False)
    for n in fd.tensors: fd.tensors[n]['diag'].zero_()                                     # one query or sequence: in process 0 only
    calls['precondition'] = lambda: inf.pairwise_scores(m32, fd, queries[:1], train[:2], damping=1e-45, progress=False)
    calls['overflow'] = lambda: inf.self_scores(m32, fd, train[:1], damping=1e-45, progress=False)
    calls['body'] = lambda: _refused_in_body(rank, lambda: inf.pairwise_scores(model, f, queries, train, batch_size=2, progress=False))
    got = {}                                     # 3 queries or sequences, 2 processes: process 0 has 2, process 1 has 1
    for name, call in calls.items():
        try: call(); got[name] = 'no error'
        except Exception as e: got[name] = f'{type(e).__name__}: {e}'
    Path(out, f'refusals-{rank}.json').write_text(json.dumps(got))
    if world > 1: dist.barrier(); dist.destroy_process_group()


if __name__ == '__main__':
    if sys.argv[1] == '--refusals': refusals(sys.argv[2])
    else: main(sys.argv[1], sys.argv[2])
    # Every result is on disk and every process has passed the last barrier: leave without the interpreter's teardown.
    # Once in CI (session 34) the refusals run's process 1 died there or in the group's teardown with SIGABRT, "terminate
    # called without an active exception", no Python frame on its stack; 4 reruns here did not repeat it, and the cause
    # inside torch's gloo threads is not established. What the tests check is read from the files written above.
    sys.stdout.flush(); sys.stderr.flush(); os._exit(0)
