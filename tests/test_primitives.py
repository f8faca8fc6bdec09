"""The storage primitives of `influence_nb.artefact` (digest, atomic files, JSON-lines caches) and the keys built on them.

Stored results are found by their keys: factor caches by `explorer.factor_cache_tag`, the PBRF and LDS JSON-lines
caches by `pbrf._digest` / `lds._digest`, scan checkpoints and score folders by `search._digest`, `_digest_chunk` and
`file_digest`. Each caller now hashes through `artefact.digest` but keeps its own key schema, so each schema is
rebuilt here from `hashlib`, `struct` and `numpy` alone: a change of even one byte of a key fails a test (and would
orphan every stored cache).
"""
import functools, hashlib, importlib, json, struct
import numpy as np, torch
import influence_nb as inf
from influence_nb import artefact
from influence_nb.ekfac import model_digest
from influence_nb.modules import tiny_model
from randdata import rand_seqs

search, explorer, lds, pbrf = (importlib.import_module(f'influence_nb.{m}') for m in ('search', 'explorer', 'lds', 'pbrf'))

BF16 = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
BF16_BYTES = struct.pack('<2H', 0x3F80, 0xC000)                   # bfloat16 1.0 and -2.0, little-endian


def raw(t) -> bytes:
    "A tensor's values as bytes, written out without `artefact.tensor_bytes`."
    return BF16_BYTES if t is BF16 else np.ascontiguousarray(t.detach().numpy()).tobytes()


def test_tensor_bytes_by_hand():
    x = torch.arange(6).reshape(2, 3)
    assert artefact.tensor_bytes(x.T) == struct.pack('<6q', 0, 3, 1, 4, 2, 5)   # values of the view, row-major
    assert artefact.tensor_bytes(BF16) == BF16_BYTES
    assert artefact.tensor_bytes(torch.tensor(7, dtype=torch.int32)) == struct.pack('<i', 7)   # 0-d


def test_search_digest_schema():
    "`search._digest`: blake2b-128; a tensor as str(dtype) then its bytes, anything else as repr; each part ends with '|'."
    parts = ['a', 3, None, [1, 'x'], torch.arange(6).reshape(2, 3).T, torch.randn(3, dtype=torch.float64),
             torch.tensor([True, False]), BF16]
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update((str(p.dtype).encode() + raw(p)) if isinstance(p, torch.Tensor) else repr(p).encode()); h.update(b'|')
    assert search._digest(*parts) == h.hexdigest()


def test_scan_chunk_and_file_digest_schema(tmp_path):
    "`_digest_chunk` ('index;' then ids|labels|mask| or 'skipped;') and `file_digest` (blake2b-128 of the bytes)."
    seqs = rand_seqs(3, seed=1)
    items = [search._Item(7 + j, {'n': j}, f'line {j}') for j in range(3)]
    chunk = [seqs[0], None, seqs[2]]
    h = hashlib.blake2b(digest_size=16)
    for it, s in zip(items, chunk):
        h.update(f'{it.index};'.encode())
        if s is None: h.update(b'skipped;')
        else:
            for k in ('input_ids', 'labels', 'attention_mask'): h.update(raw(s[k]) + b'|')
    assert search._digest_chunk(items, chunk) == h.hexdigest()
    blob = bytes(range(256)) * 9000                                 # 2.2 MiB: more than one 1 MiB block
    (tmp_path/'c.jsonl').write_bytes(blob)
    assert search.file_digest(tmp_path/'c.jsonl') == hashlib.blake2b(blob, digest_size=16).hexdigest()


def test_artefact_checksum_is_sha256_of_the_file(tmp_path):
    artefact.write(tmp_path, 'x', {'t': torch.arange(5.)}, {'n': 1}, 'test.x')
    meta = json.loads((tmp_path/'x.json').read_text())
    assert meta['sha256'] == hashlib.sha256((tmp_path/'x.safetensors').read_bytes()).hexdigest()


def test_factor_cache_tag_schema():
    "`sequences_digest`: sha256 of f'{k}:{len};' and int64 values per field; the tag adds the weights' digest."
    model = tiny_model('gpt2', vocab=32, layers=1)
    seqs = rand_seqs(4, seed=2, prompt=2)
    h = hashlib.sha256()
    for s in seqs:
        for k in ('input_ids', 'labels', 'attention_mask'):
            h.update(f'{k}:{len(s[k])};'.encode()); h.update(np.asarray(s[k].tolist(), dtype='<i8').tobytes())
    assert explorer.sequences_digest(seqs) == h.hexdigest()
    weights = hashlib.sha256(json.dumps(model_digest(model), sort_keys=True).encode()).hexdigest()
    assert explorer.factor_cache_tag('my model', model, seqs) == f"my_model-fit4-data{h.hexdigest()[:16]}-weights{weights[:16]}"


def test_lds_key_schema():
    "`lds._digest`: sha256 of the trainer|measure descriptions, then f'{dtype}{shape}' and bytes per tensor; 20 hex."
    model = tiny_model('gpt2', vocab=32, layers=1)
    train, queries = rand_seqs(3, seed=3), rand_seqs(2, seed=4)
    trainer, measure = functools.partial(lds.finetune, steps=2), inf.data.completion_logprobs
    h = hashlib.sha256(f"{lds._describe(trainer)}|{lds._describe(measure)}".encode())
    tensors = [t for _, t in sorted(model.state_dict().items())] + [s[k] for q in (train, queries) for s in q for k in ('input_ids', 'labels')]
    for t in tensors: h.update(f'{t.dtype}{tuple(t.shape)}'.encode() + raw(t))
    assert lds._digest(model, train, queries, trainer, measure) == h.hexdigest()[:20]


def test_pbrf_key_schema():
    "`pbrf._digest`: sha256 of the settings' JSON, then f'{dtype}{numel}' and bytes per tensor; 20 hex."
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(6, 3, dtype=torch.float64, generator=g), torch.randint(0, 2, (6,), generator=g)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh(), torch.nn.Linear(2, 2)).double()
    prob = pbrf.FlatProblem(net, None, (X, y), 'ce', 64, torch.float64)
    q = prob.examples((X[:2], y[:2]), 'query')
    settings = dict(names=prob.names, damping=0.1, eps=1e-5, dtype=torch.float64)
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for t in [prob.theta_s, *(prob.fixed[n] for n in sorted(prob.fixed)), X, y, X[:2], y[:2]]:
        h.update(f'{t.dtype}{t.numel()}'.encode() + raw(t))
    assert pbrf._digest(prob, q, **settings) == h.hexdigest()[:20]


def test_lds_cache_resumes_after_a_cut_line(tmp_path):
    "`retrain` through `cache_records`/`append_record`: a run killed mid-line recomputes only the model it lost."
    model = tiny_model('gpt2', vocab=32, layers=1)
    train, queries, calls = rand_seqs(4, seed=5), rand_seqs(2, seed=6), []
    def trainer(m, tr, subset, seed): calls.append((tuple(subset), seed)); return m
    measure = lambda m, qs: torch.tensor([float(len(calls)), -1.0])   # differs per model trained: shows what was reused
    cache, subsets = tmp_path/'sub'/'lds.jsonl', [[0, 1], [2, 3], [1, 2]]
    first = lds.retrain(model, train, queries, subsets, cache=cache, trainer=trainer, measure=measure, progress=False)
    lines = cache.read_text().splitlines()
    assert len(lines) == 3 and len(calls) == 3
    cache.write_text('\n'.join(lines[:2]) + '\n' + lines[2][:25])     # killed while writing the third record
    calls.clear()
    again = lds.retrain(model, train, queries, subsets, cache=cache, trainer=trainer, measure=measure, progress=False)
    assert calls == [((1, 2), 0)]
    assert np.array_equal(again[:, :2], first[:, :2]) and again[0, 2, 0] == 1.0
    assert [json.loads(x)['subset'] for x in cache.read_text().splitlines()[3:]] == [[1, 2]]   # a fresh line after the cut one
