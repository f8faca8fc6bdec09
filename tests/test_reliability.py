"""Reliability (issue 9): every public entry point refuses bad input loudly at the boundary, stored artefacts are
whole and valid or refused, nothing is loaded with pickle, and a seed gives bit-identical results.

Row ids (D1, M2, F3, ...) refer to the table in tests/README.md."""
import ast, errno, json, os, socket, threading
from pathlib import Path
import pytest, torch
from torch import nn
import influence_nb as inf
import influence_nb.ekfac as ekfac_mod
import influence_nb.artefact as artefact_mod   # factor storage (locking, checksums, atomic writes) lives here
import influence_nb.search as search_mod
from influence_nb.ekfac import Factors
from influence_nb.search import scan, ScanResult

from randdata import VOCAB, rand_seqs, rand_queries

torch.set_num_threads(1)
CTX = 32
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope='module')
def env():
    m = inf.tiny_model('gpt2', layers=1, ctx=CTX)
    train, queries = rand_seqs(8), rand_queries(2)
    f = inf.fit_factors(m, train, 'ekfac', batch_size=4, progress=False)
    return m, f, train, queries


# ---------------------------------------------------------------------------------------------- data (D rows)
# every entry point that takes sequences, with the bad data put in the named argument
ENTRIES = {
    'fit_factors(train)': lambda m, f, tr, q, bad: inf.fit_factors(m, bad, 'ekfac', progress=False),
    'pairwise_scores(queries)': lambda m, f, tr, q, bad: inf.pairwise_scores(m, f, bad, tr, progress=False),
    'pairwise_scores(train)': lambda m, f, tr, q, bad: inf.pairwise_scores(m, f, q, bad, progress=False),
    'self_scores(train)': lambda m, f, tr, q, bad: inf.self_scores(m, f, bad, progress=False),
    'scan(queries)': lambda m, f, tr, q, bad: scan(m, f, bad, tr, k=2, progress=False),
    'scan(corpus)': lambda m, f, tr, q, bad: scan(m, f, q, bad, k=2, progress=False),
}

# (row, bad data, exception, message fragment); scan(corpus) names the bad record instead (see CORPUS_MSG)
BAD_DATA = [
    ('D1 empty', [], ValueError, 'empty'),
    ('D1 empty ids', [{'input_ids': []}], ValueError, 'is empty'),
    ('D2 not a mapping (int)', [3], TypeError, 'expected a mapping'),
    ('D2 not a mapping (None)', [None], TypeError, 'expected a mapping'),
    ('D2 a single mapping', {'input_ids': [1, 2, 3]}, TypeError, 'Wrap one sequence'),
    ('D2 no input_ids', [{'ids': [1, 2]}], ValueError, "no 'input_ids'"),
    ('D3 float ids', [{'input_ids': [1., 2., 3.]}], TypeError, 'must be integers'),
    ('D3 bool ids', [{'input_ids': torch.tensor([True, False, True])}], TypeError, 'must be integers'),
    ('D3 string ids', [{'input_ids': ['a', 'b']}], TypeError, 'could not be converted'),
    ('D3 2-D ids', [{'input_ids': [[1, 2, 3], [4, 5, 6]]}], ValueError, 'must be 1-D'),
    ('D3 0-D ids', [{'input_ids': torch.tensor(5)}], ValueError, 'must be 1-D'),
    ('D4 id >= vocab', [[1, 2, VOCAB]], ValueError, 'outside the model'),
    ('D4 negative id', [[1, -2, 3]], ValueError, 'outside the model'),
    ('D4 label >= vocab', [{'input_ids': [1, 2, 3], 'labels': [1, 2, 99]}], ValueError, "['labels'] holds 99"),
    ('D4 negative label', [{'input_ids': [1, 2, 3], 'labels': [1, 2, -3]}], ValueError, 'labels are token ids'),
    ('D5 labels length', [{'input_ids': [1, 2, 3], 'labels': [1, 2]}], ValueError, 'has length 2'),
    ('D5 mask length', [{'input_ids': [1, 2, 3], 'attention_mask': [1, 1]}], ValueError, 'has length 2'),
    ('D5 mask not 0/1', [{'input_ids': [1, 2, 3], 'attention_mask': [1, 2, 1]}], ValueError, 'only 0 and 1'),
    ('D5 mask hole', [{'input_ids': [1, 2, 3], 'attention_mask': [1, 0, 1]}], ValueError, 'contiguous'),
    ('D5 mask all 0', [{'input_ids': [1, 2, 3], 'attention_mask': [0, 0, 0]}], ValueError, 'all 0'),
    ('D6 no scored token', [{'input_ids': [1, 2, 3], 'labels': [-100] * 3}], ValueError, 'no scored token'),
    ('D6 one token', [[5]], ValueError, 'no scored token'),
    ('D7 longer than context', [list(range(1, VOCAB)) * 2], ValueError, 'context is 32'),
    ('D9 meta tensor', [{'input_ids': torch.ones(3, dtype=torch.long, device='meta')}], ValueError, 'meta tensor'),
]
# what scan(corpus) raises instead: per-record problems name the record (a record with no scored token too, since
# session 9: it used to be scanned with score 0, ranked above every negative score)
CORPUS_MSG = {'D1 empty': (ValueError, 'is empty'), 'D2 a single mapping': (TypeError, 'single dict'),
              'D6 no scored token': (ValueError, 'Bad corpus record at corpus[0]: the record has no scored token'),
              'D6 one token': (ValueError, 'Bad corpus record at corpus[0]: the record has no scored token')}


@pytest.mark.parametrize('entry', list(ENTRIES))
@pytest.mark.parametrize('row,bad,exc,msg', BAD_DATA, ids=[b[0] for b in BAD_DATA])
def test_bad_data_refused(env, entry, row, bad, exc, msg):
    m, f, tr, q = env
    if entry == 'scan(corpus)':
        exc, msg = CORPUS_MSG.get(row, (ValueError, 'Bad corpus record at corpus[0]'))
    with pytest.raises(exc, match=msg.replace('[', r'\[').replace(']', r'\]').replace('(', r'\(')):
        ENTRIES[entry](m, f, tr, q, bad)


def test_bad_record_named_by_position(env):
    "D: the error names which sequence of which argument is wrong."
    m, f, tr, q = env
    with pytest.raises(ValueError, match=r"train\[2\] has token id 40"):
        inf.pairwise_scores(m, f, q, tr[:2] + [[1, 40]], progress=False)
    with pytest.raises(ValueError, match=r"queries\[1\] has no scored token"):
        inf.pairwise_scores(m, f, [q[0], {'input_ids': [1, 2], 'labels': [-100, -100]}], tr, progress=False)


def test_D8_mixed_tensors_and_lists_equal(env):
    "D8: lists, tensors of any int dtype, tuples and mixtures give bit-identical scores."
    m, f, tr, q = env
    ref = inf.pairwise_scores(m, f, q, tr, progress=False).total
    mixed = [s['input_ids'].tolist() if i % 3 == 0 else
             {'input_ids': s['input_ids'].to(torch.int32), 'labels': s['labels'].tolist()} if i % 3 == 1 else
             {'input_ids': tuple(s['input_ids'].tolist()), 'attention_mask': torch.ones(len(s['input_ids']), dtype=torch.uint8)}
             for i, s in enumerate(tr)]
    mq = [{'input_ids': s['input_ids'].tolist(), 'labels': s['labels']} for s in q]
    assert torch.equal(inf.pairwise_scores(m, f, mq, mixed, progress=False).total, ref)


def test_D5_padding_is_removed(env):
    "D5: left or right padding (attention_mask 0 at the ends) scores exactly like the unpadded sequence."
    m, f, tr, q = env
    ref = inf.pairwise_scores(m, f, q, tr, progress=False).total
    padded = [{'input_ids': [0] * (i % 3) + s['input_ids'].tolist() + [0] * (i % 2),
               'attention_mask': [0] * (i % 3) + [1] * len(s['input_ids']) + [0] * (i % 2)} for i, s in enumerate(tr)]
    assert torch.equal(inf.pairwise_scores(m, f, q, padded, progress=False).total, ref)


@pytest.fixture(scope='module')
def toy_tok():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(['[UNK]', 'the', 'capital', 'of', 'is', 'paris', 'france'])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token='[UNK]')); tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token='[UNK]')


@pytest.mark.parametrize('call,exc,msg', [
    (lambda t: inf.tokenize(t, []), ValueError, '`texts` is empty'),
    (lambda t: inf.tokenize(t, ['the', 3]), TypeError, r'texts\[1\] is a int'),
    (lambda t: inf.tokenize(None, ['the']), TypeError, '`tokenizer` must be'),
    (lambda t: inf.tokenize_pairs(t, []), ValueError, '`pairs` is empty'),
    (lambda t: inf.tokenize_pairs(t, [('the capital', '')]), ValueError, 'empty completion'),
    (lambda t: inf.tokenize_pairs(t, [('the', 'is', 'paris')]), TypeError, r'pairs\[0\] must be'),
    (lambda t: inf.tokenize_pairs(t, ['the capital']), TypeError, r'pairs\[0\] must be'),
    (lambda t: inf.tokenize_pairs(None, [('the', ' paris')]), TypeError, '`tokenizer` must be'),
], ids=['texts empty', 'text not str', 'no tokenizer', 'pairs empty', 'empty completion', 'triple', 'bare str',
        'pairs no tokenizer'])
def test_D_tokenize_bad_input(toy_tok, call, exc, msg):
    with pytest.raises(exc, match=msg): call(toy_tok)


# ---------------------------------------------------------------------------------------- model (M rows)
def test_M1_no_supported_layers(env):
    m, f, tr, q = env
    bare = nn.Sequential(nn.Embedding(VOCAB, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match='no nn.Linear or Conv1D'): inf.fit_factors(bare, tr, progress=False)
    with pytest.raises(ValueError, match='no nn.Linear or Conv1D'): inf.pairwise_scores(bare, f, q, tr, progress=False)
    with pytest.raises(ValueError, match='no parameters'): inf.fit_factors(nn.Sequential(nn.ReLU()), tr, progress=False)
    with pytest.raises(TypeError, match='must be a torch nn.Module'): inf.fit_factors('gpt2', tr, progress=False)


def test_M2_unknown_modules_list_candidates(env):
    m, f, tr, q = env
    with pytest.raises(ValueError, match=r"no such module.*Candidates: \[.*'transformer.h.0.mlp.c_fc'"):
        inf.fit_factors(m, tr, modules=['transformer.h.0.mlp.c_fx'], progress=False)
    with pytest.raises(ValueError, match="not a Linear/Conv1D layer"):
        inf.fit_factors(m, tr, modules=['transformer.h.0.ln_1'], progress=False)
    with pytest.raises(ValueError, match="use 'mlp', 'all'"): inf.fit_factors(m, tr, modules='attention', progress=False)
    with pytest.raises(ValueError, match='empty list'): inf.fit_factors(m, tr, modules=[], progress=False)
    with pytest.raises(ValueError, match='twice'):
        inf.fit_factors(m, tr, modules=['transformer.h.0.mlp.c_fc'] * 2, progress=False)
    with pytest.raises(TypeError, match='list of layer names'): inf.fit_factors(m, tr, modules=3, progress=False)
    # factors of one architecture used on another: the names it lacks are listed
    llama = inf.tiny_model('llama', layers=1)
    with pytest.raises(ValueError, match=r"fitted on a model with modules \['transformer.h.0.mlp.c_fc'.*Candidates"):
        inf.pairwise_scores(llama, f, q, tr, progress=False)


def state(m):
    return ({k: v.clone() for k, v in m.state_dict().items()}, [x.training for x in m.modules()],
            [p.requires_grad for p in m.parameters()])


def same_state(m, st):
    sd, modes, flags = st
    return (all(torch.equal(sd[k], v) for k, v in m.state_dict().items()) and [x.training for x in m.modules()] == modes
            and [p.requires_grad for p in m.parameters()] == flags and all(p.grad is None for p in m.parameters())
            and sum(len(x._forward_hooks) + len(x._backward_hooks) for x in m.modules()) == 0)


def test_M3_training_mode_and_dropout(env, tmp_path):
    "M3: with dropout active (training mode), every call computes in eval mode and restores each module's mode."
    _, _, tr, q = env
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=CTX,
                                   resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)).eval()
    f = inf.fit_factors(m, tr, progress=False)
    ref = inf.pairwise_scores(m, f, q, tr, progress=False).total
    ref_self = inf.self_scores(m, f, tr, progress=False)
    m.train(); m.transformer.h[0].attn.eval()                      # a mixed state must come back as it was
    st = state(m)
    f2 = inf.fit_factors(m, tr, progress=False); assert same_state(m, st)
    assert all(torch.equal(f2.tensors[n][k], f.tensors[n][k]) for n in f.modules for k in f.tensors[n])
    assert torch.equal(inf.pairwise_scores(m, f, q, tr, progress=False).total, ref); assert same_state(m, st)
    assert torch.equal(inf.self_scores(m, f, tr, progress=False), ref_self); assert same_state(m, st)
    r = scan(m, f, q, tr, k=3, progress=False, checkpoint=tmp_path/'c.ckpt'); assert same_state(m, st)
    assert torch.equal(r.scores, ref.topk(3, dim=1).values)


def test_M4_device_and_dtype(env):
    m, f, tr, q = env
    with torch.device('meta'): meta = inf.tiny_model('gpt2', layers=1, ctx=CTX)
    with pytest.raises(ValueError, match="'meta' device"): inf.fit_factors(meta, tr, progress=False)
    with pytest.raises(ValueError, match="'meta' device"): inf.pairwise_scores(meta, f, q, tr, progress=False)
    half = inf.tiny_model('gpt2', layers=1, ctx=CTX); half.transformer.h[0].mlp.to('meta')
    with pytest.raises(ValueError, match="'meta' device"): inf.self_scores(half, f, tr, progress=False)
    # same weights in float64: the fingerprint (of float32 values) matches and the scores agree
    m64 = inf.tiny_model('gpt2', layers=1, ctx=CTX).double()
    s32 = inf.pairwise_scores(m, f, q, tr, progress=False).total
    s64 = inf.pairwise_scores(m64, f, q, tr, progress=False).total
    assert s64.dtype == torch.float64 and torch.allclose(s64.float(), s32, rtol=1e-3, atol=1e-4 * float(s32.abs().max()))
    # other weights in bfloat16 are other weights: refused by the fingerprint
    with pytest.raises(ValueError, match='fingerprint mismatch'):
        inf.pairwise_scores(inf.tiny_model('gpt2', layers=1, ctx=CTX).bfloat16(), f, q, tr, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_M4_model_on_gpu_data_on_cpu(env):
    m, f, tr, q = env
    ref = inf.pairwise_scores(m, f, q, tr, progress=False).total
    mc = inf.tiny_model('gpt2', layers=1, ctx=CTX).cuda()
    got = inf.pairwise_scores(mc, f, q, [{k: v.cuda() for k, v in s.items()} for s in tr], progress=False).total
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


# -------------------------------------------------------------------------------------- factors (F rows)
def test_F1_other_model_or_modules(env):
    m, f, tr, q = env
    other = inf.tiny_model('gpt2', layers=1, ctx=CTX, seed=1)
    for call in (lambda: inf.pairwise_scores(other, f, q, tr, progress=False), lambda: inf.self_scores(other, f, tr, progress=False),
                 lambda: scan(other, f, q, tr, progress=False)):
        with pytest.raises(ValueError, match='fingerprint mismatch'): call()
    with pytest.raises(ValueError, match='fitted for modules'): f.check(m, modules='all')
    b = m.transformer.h[0].mlp.c_proj.bias
    old = b.detach().clone()
    with torch.no_grad(): b[0] += 1e-3                                    # fine-tuned a little after fitting
    try:
        with pytest.raises(ValueError, match='fingerprint mismatch'): inf.pairwise_scores(m, f, q, tr, progress=False)
    finally:
        with torch.no_grad(): b.copy_(old)
    assert f.check(m)                                                     # restored: accepted again
    with pytest.raises(TypeError, match='must be an influence_nb Factors'): inf.pairwise_scores(m, 'f.json', q, tr)


def same_factors(a, b):
    return (a.strategy, a.modules, a.fingerprint, a.n_sequences) == (b.strategy, b.modules, b.fingerprint, b.n_sequences) and \
        all(a.tensors[n].keys() == b.tensors[n].keys() and all(torch.equal(a.tensors[n][k], b.tensors[n][k]) for k in a.tensors[n])
            for n in a.modules)


def _rewrite(d, edit_meta=None, edit_tensors=None, fix_sha=True):
    "Hand-edit saved factors: change the JSON and/or the tensors (keeping the embedded metadata), optionally fixing the checksum."
    from safetensors import safe_open
    from safetensors.torch import save_file, load_file
    jf, tf = Path(d)/'factors.json', Path(d)/'factors.safetensors'
    meta = json.loads(jf.read_text())
    if edit_tensors:
        with safe_open(str(tf), 'pt') as fh: header = fh.metadata()
        flat = load_file(str(tf)); edit_tensors(flat); save_file(flat, str(tf), metadata=header)
    if edit_meta: edit_meta(meta)
    if fix_sha: meta['sha256'] = artefact_mod.digest_file(tf)
    jf.write_text(json.dumps(meta))


@pytest.mark.parametrize('row,damage,msg', [
    ('F2 truncated', lambda d: (d/'factors.safetensors').write_bytes((d/'factors.safetensors').read_bytes()[:200]), 'truncated'),
    ('F2 byte flipped', lambda d: (d/'factors.safetensors').write_bytes(
        (lambda b: b[:300] + bytes([b[300] ^ 1]) + b[301:])((d/'factors.safetensors').read_bytes())), 'checksum'),
    ('F2 json truncated', lambda d: (d/'factors.json').write_text((d/'factors.json').read_text()[:40]), 'not valid JSON'),
    ('F2 json binary', lambda d: (d/'factors.json').write_bytes(b'\xff\xfe\x00'), 'not valid JSON'),
    ('F2 json a list', lambda d: (d/'factors.json').write_text('[1, 2]'), 'not factors metadata'),
    ('F2 json edited n_sequences', lambda d: _rewrite(d, lambda m: m.update(n_sequences=999), fix_sha=False), r"edited after saving: \['n_sequences'\]"),
    ('F2 json edited fingerprint', lambda d: _rewrite(d, lambda m: m.update(fingerprint='0' * 64)), r"edited after saving: \['fingerprint'\]"),
    ('F2 json field removed', lambda d: _rewrite(d, lambda m: m.pop('seed')), r"edited after saving: \['seed'\]"),
    ('F2 tensors replaced', lambda d: _rewrite(d, edit_tensors=lambda t: t.update({k: v * 2 for k, v in t.items()}), fix_sha=False), 'checksum'),
    ('F2 tensor dropped', lambda d: _rewrite(d, edit_tensors=lambda t: t.pop('transformer.h.0.mlp.c_fc::Lambda')),
     r"lacks tensor 'Lambda' of layer 'transformer.h.0.mlp.c_fc'"),
    ('F3 newer format', lambda d: _rewrite(d, lambda m: m.update(format_version=2)), 'upgrade it'),
    ('F3 bad format', lambda d: _rewrite(d, lambda m: m.update(format_version='1')), "format_version '1'"),
    ('F4 NaN in a tensor', lambda d: _rewrite(d, edit_tensors=lambda t: t['transformer.h.0.mlp.c_proj::QS'].__setitem__((0, 0), float('nan'))),
     r"layer 'transformer.h.0.mlp.c_proj' contain NaN/Inf in 'QS'"),
    ('F4 Inf in a tensor', lambda d: _rewrite(d, edit_tensors=lambda t: t['transformer.h.0.mlp.c_fc::Lambda'].__setitem__((1, 1), float('inf'))),
     r"layer 'transformer.h.0.mlp.c_fc' contain NaN/Inf in 'Lambda'"),
], ids=lambda x: x if isinstance(x, str) and x[:1] == 'F' else None)
def test_F2_F4_damaged_files_refused(env, tmp_path, row, damage, msg):
    m, f, tr, q = env
    f.save(tmp_path)
    damage(tmp_path)
    with pytest.raises(ValueError, match=msg): Factors.load(tmp_path)


def test_F2_missing_file(env, tmp_path):
    m, f, tr, q = env
    f.save(tmp_path); (tmp_path/'factors.json').unlink()
    with pytest.raises(FileNotFoundError, match='expected factors.json'): Factors.load(tmp_path)


@pytest.mark.parametrize('strategy', ['identity', 'diagonal', 'kfac', 'ekfac'])
def test_F2_roundtrip_is_exact(env, tmp_path, strategy):
    m, f, tr, q = env
    f = f if strategy == 'ekfac' else inf.fit_factors(m, tr, strategy, progress=False)
    g = Factors.load(f.save(tmp_path), covariances=True)
    assert same_factors(g, f) and g.info == f.info and g.n_tokens == f.n_tokens
    assert torch.equal(inf.pairwise_scores(m, g, q, tr, progress=False).total, inf.pairwise_scores(m, f, q, tr, progress=False).total)
    lean = Factors.load(tmp_path)          # the default leaves A and S (never used to precondition) on disk
    assert all(set(lean.tensors[n]) == set(f.tensors[n]) - {'A', 'S'} for n in f.modules)
    assert torch.equal(inf.pairwise_scores(m, lean, q, tr, progress=False).total, inf.pairwise_scores(m, f, q, tr, progress=False).total)


def test_F4_nan_in_memory_factors_named(env):
    m, f, tr, q = env
    bad = Factors(**{**f.__dict__, 'tensors': {n: {k: v.clone() for k, v in d.items()} for n, d in f.tensors.items()}})
    bad.tensors['transformer.h.0.mlp.c_proj']['Lambda'][0, 0] = float('nan')
    for call in (lambda: inf.pairwise_scores(m, bad, q, tr, progress=False), lambda: inf.self_scores(m, bad, tr, progress=False),
                 lambda: scan(m, bad, q, tr, progress=False)):
        with pytest.raises(ValueError, match=r"layer 'transformer.h.0.mlp.c_proj' contain NaN/Inf in 'Lambda'"): call()


def test_F5_singular_curvature_needs_positive_damping(env):
    "F5: K-FAC on 2 sequences of 3 tokens: A and S are singular. damping 0 is refused; a damping too small to regularise is caught."
    m, f, tr, q = env
    few = inf.as_sequences([[1, 2, 3], [4, 5, 6]])
    k = inf.fit_factors(m, few, 'kfac', progress=False)
    assert (k.tensors['transformer.h.0.mlp.c_fc']['lS'] < 1e-12).any()               # singular indeed
    with pytest.raises(ValueError, match='positive finite'): inf.pairwise_scores(m, k, q, few, damping=0., progress=False)
    with pytest.raises(ValueError, match='damping'): inf.pairwise_scores(m, k, q, few, damping=1e-300, progress=False)
    with pytest.raises(ValueError, match='damping'): inf.self_scores(m, k, few, damping=1e-300, progress=False)
    s = inf.pairwise_scores(m, k, q, few, progress=False).total                       # the default damping is fine
    assert torch.isfinite(s).all()


# -------------------------------------------------------------------------------------- numbers (N rows)
@pytest.fixture
def nan_on_token(env):
    "A hook that puts NaN into the embedding output wherever token VOCAB-1 appears (the test data never holds it; padding is 0) (weights unchanged: fingerprint matches)."
    m = env[0]
    h = m.transformer.wte.register_forward_hook(lambda mod, i, out: out.masked_fill((i[0] == VOCAB - 1)[..., None], float('nan')))
    yield m
    h.remove()


def test_N1_nan_in_activations_named(env, nan_on_token):
    m, f, tr, q = env
    bad = tr[:5] + [[1, 2, VOCAB - 1, 4]] + tr[5:]
    where = r"activations of layer 'transformer.h.0.mlp.c_fc' at batch \d+ \(sequences \[.*5.*\]\)"
    with pytest.raises(ValueError, match=where): inf.fit_factors(m, bad, progress=False)
    with pytest.raises(ValueError, match=where): inf.pairwise_scores(m, f, q, bad, progress=False)
    with pytest.raises(ValueError, match=where): inf.self_scores(m, f, bad, progress=False)
    with pytest.raises(ValueError, match="activations of layer 'transformer.h.0.mlp.c_fc'"): scan(m, f, q, bad, progress=False)


def test_N1_inf_in_gradients_named(env):
    m, f, tr, q = env
    m.influence_loss = lambda logits, labels, *a: logits.sum() * float('inf')     # a loss whose gradient overflows
    try:
        with pytest.raises(ValueError, match=r"output gradients of layer 'transformer.h.0.mlp.c_fc' at batch 0"):
            inf.fit_factors(m, tr, progress=False)
    finally: del m.influence_loss


@pytest.mark.parametrize('damping,exc', [(0, ValueError), (0., ValueError), (-1., ValueError), (float('nan'), ValueError),
                                         (float('inf'), ValueError), (True, TypeError), ('0.1', TypeError)])
def test_N2_damping(env, damping, exc):
    m, f, tr, q = env
    for call in (lambda: inf.pairwise_scores(m, f, q, tr, damping=damping, progress=False),
                 lambda: inf.self_scores(m, f, tr, damping=damping, progress=False),
                 lambda: scan(m, f, q, tr, damping=damping, progress=False),
                 lambda: f.precondition(f.modules[0], torch.zeros(f.shapes[f.modules[0]]), damping)):
        with pytest.raises(exc, match='damping'): call()


@pytest.mark.parametrize('rank', [0, -1, 1.5, True, '4'])
def test_N3_query_rank_invalid(env, rank):
    m, f, tr, q = env
    with pytest.raises(ValueError, match='`query_rank` must be None'): inf.pairwise_scores(m, f, q, tr, query_rank=rank, progress=False)
    with pytest.raises(ValueError, match='`query_rank` must be None'): scan(m, f, q, tr, query_rank=rank, progress=False)


def test_N3_query_rank_above_layer_is_exact(env):
    "N3: a rank at or above min(d_out, d_in+1) of a layer is exact for it, so it is kept full rank — the same numbers."
    m, f, tr, q = env
    full = inf.pairwise_scores(m, f, q, tr, progress=False).total
    assert torch.equal(inf.pairwise_scores(m, f, q, tr, query_rank=10_000, progress=False).total, full)
    assert torch.equal(scan(m, f, q, tr, k=3, query_rank=10_000, progress=False).scores, full.topk(3, dim=1).values)


@pytest.mark.parametrize('kw', [dict(batch_size=0), dict(batch_size=2.0), dict(strategy='EKFAC'), dict(fisher='emp'),
                                dict(seed='0'), dict(seed=None), dict(fisher_samples=0), dict(fisher_samples=2.0),
                                dict(fisher_samples=True), dict(fisher_samples=2, fisher='empirical')])
def test_N_other_fit_arguments(env, kw):
    m, f, tr, q = env
    with pytest.raises((ValueError, TypeError), match=next(iter(kw)) if 'strategy' not in kw else 'strategy'):
        inf.fit_factors(m, tr, progress=False, **kw)


# -------------------------------------------------------------------------------------- storage (S rows)
def _saved_bytes(d):
    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}


def test_S1_not_writable(env, tmp_path, monkeypatch):
    m, f, tr, q = env
    blocker = tmp_path/'a_file'; blocker.write_text('x')                 # a "folder" that is a file: never writable
    with pytest.raises(OSError, match='Could not write factors'): f.save(blocker/'factors')
    with pytest.raises(OSError, match='`checkpoint`: cannot write'): scan(m, f, q, tr, checkpoint=blocker/'c.ckpt', progress=False)
    with pytest.raises(OSError, match='`scores_path`: cannot write'): scan(m, f, q, tr, scores_path=blocker/'s', progress=False)
    r = scan(m, f, q, tr, k=2, progress=False)
    with pytest.raises(OSError, match='`path`: cannot write'): r.save(blocker/'r.parquet')
    # a read-only folder (simulated: tests run as root, which ignores permissions): previous factors untouched
    f.save(tmp_path/'fac'); before = _saved_bytes(tmp_path/'fac')
    def denied(*a, **kw): raise PermissionError(errno.EACCES, 'Permission denied')
    monkeypatch.setattr(ekfac_mod.tempfile, 'mkstemp', denied)
    with pytest.raises(PermissionError, match='Could not write factors.*writable'): f.save(tmp_path/'fac')
    monkeypatch.undo()
    assert _saved_bytes(tmp_path/'fac') == before


def _enospc_after(real, n_bytes=64):
    "A writer that writes a partial file, then fails as a full disk does."
    def write(obj, path, *a, **kw):
        real(obj, path, *a, **kw)
        with open(path, 'r+b') as fh: fh.truncate(n_bytes)
        raise OSError(errno.ENOSPC, 'No space left on device')
    return write


def test_S2_disk_full_keeps_previous_factors(env, tmp_path, monkeypatch):
    m, f, tr, q = env
    f.save(tmp_path); before = _saved_bytes(tmp_path)
    f2 = inf.fit_factors(m, tr, 'kfac', progress=False)
    monkeypatch.setattr(artefact_mod, 'save_file', _enospc_after(artefact_mod.save_file))
    with pytest.raises(OSError, match='No space left on device.*unchanged') as e: f2.save(tmp_path)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    # the JSON stage failing too (disk full after the tensors were written)
    real_fsync, calls = artefact_mod._fsync, []
    def fsync(p):
        calls.append(p)
        if len(calls) == 2: raise OSError(errno.ENOSPC, 'No space left on device')
        real_fsync(p)
    monkeypatch.setattr(artefact_mod, '_fsync', fsync)
    with pytest.raises(OSError, match='No space left'): f2.save(tmp_path)
    monkeypatch.undo()
    assert _saved_bytes(tmp_path) == before                                 # the old pair, byte for byte, no temp files
    assert Factors.load(tmp_path).strategy == 'ekfac'


def test_S2_disk_full_during_scan_then_resume(env, tmp_path, monkeypatch):
    "A checkpoint write that fails leaves the previous checkpoint valid; resuming gives the uninterrupted result."
    m, f, tr, q = env
    corpus = rand_seqs(24, seed=5)
    kw = dict(k=4, chunk_size=4, batch_size=2, checkpoint_every=4, progress=False)
    clean = scan(m, f, q, corpus, scores_path=tmp_path/'clean', **kw)
    real, n = search_mod.save_file, []
    def flaky(*a, **k):
        n.append(1)
        if len(n) == 3: return _enospc_after(real)(*a, **k)
        return real(*a, **k)
    monkeypatch.setattr(search_mod, 'save_file', flaky)
    ck = tmp_path/'s.ckpt'
    with pytest.raises(OSError, match='No space left'): scan(m, f, q, corpus, checkpoint=ck, scores_path=tmp_path/'s', **kw)
    monkeypatch.undo()
    assert json.loads(ck.read_text())['n_records'] == 8                    # the 2nd checkpoint, intact
    r = scan(m, f, q, corpus, checkpoint=ck, scores_path=tmp_path/'s', **kw)
    assert torch.equal(r.indices, clean.indices) and torch.equal(r.scores, clean.scores)
    assert search_mod.read_scores(tmp_path/'s').equals(search_mod.read_scores(tmp_path/'clean'))
    # a scan result file: a failed overwrite keeps the old one
    p = clean.save(tmp_path/'r.parquet'); before = p.read_bytes()
    import pyarrow.parquet as pq
    monkeypatch.setattr(pq, 'write_table', _enospc_after(pq.write_table, 16))
    with pytest.raises(OSError, match='No space left'): r.save(p)
    monkeypatch.undo()
    assert p.read_bytes() == before and [x.name for x in tmp_path.glob('.tmp-*')] == []


def test_S3_two_writers_one_reader(env, tmp_path):
    "Two threads saving different factors to one folder while a third loads: every load is one whole, valid pair."
    m, f, tr, q = env
    g = inf.fit_factors(m, tr, 'kfac', progress=False)
    f.save(tmp_path)
    errors, seen = [], set()
    def write(x):
        try:
            for _ in range(6): x.save(tmp_path)
        except Exception as e: errors.append(e)
    def read():
        try:
            for _ in range(12): seen.add(Factors.load(tmp_path).strategy)
        except Exception as e: errors.append(e)
    ts = [threading.Thread(target=write, args=(f,)), threading.Thread(target=write, args=(g,)), threading.Thread(target=read)]
    for t in ts: t.start()
    for t in ts: t.join()
    assert errors == [] and seen <= {'ekfac', 'kfac'}
    last = Factors.load(tmp_path, covariances=True)
    assert (same_factors(last, f) or same_factors(last, g)) and sorted(p.name for p in tmp_path.iterdir()) == ['factors.json', 'factors.safetensors']


def test_S3_two_scans_one_checkpoint(env, tmp_path):
    "A scan refuses a checkpoint or scores folder that a live scan holds; a lock left by a dead process is taken over."
    m, f, tr, q = env
    ck = tmp_path/'c.ckpt'
    lock = tmp_path/'c.ckpt.lock'
    lock.write_text(json.dumps({'pid': os.getpid(), 'host': socket.gethostname()}))     # "another scan", alive
    with pytest.raises(ValueError, match='in use by another scan'): scan(m, f, q, tr, checkpoint=ck, progress=False)
    (tmp_path/'s').mkdir(); (tmp_path/'s'/'.lock').write_text(lock.read_text()); lock.unlink()
    with pytest.raises(ValueError, match='in use by another scan'): scan(m, f, q, tr, scores_path=tmp_path/'s', progress=False)
    (tmp_path/'s'/'.lock').unlink()
    lock.write_text(json.dumps({'pid': 2 ** 22 + 12345, 'host': socket.gethostname()}))   # no such process
    r = scan(m, f, q, tr, k=2, checkpoint=ck, progress=False)
    assert r.n_scanned == len(tr) and not lock.exists()


# --------------------------------------------------------------------------- no code execution from files (X)
PICKLERS = {'pickle', 'cPickle', '_pickle', 'dill', 'cloudpickle', 'joblib', 'shelve', 'marshal'}


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            fn = node.func
            name = (f'{fn.value.id}.{fn.attr}' if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name)
                    else fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, 'id', ''))
            yield name, node


def _kw_true(node, key):
    return any(k.arg == key and isinstance(k.value, ast.Constant) and k.value.value is True for k in node.keywords)


def test_X1_no_pickle_no_unsafe_torch_load():
    "X1: the package imports no pickler, never calls torch.load without weights_only=True, np.load(allow_pickle=True) or read_pickle."
    files = sorted((ROOT/'influence_nb').glob('*.py'))
    assert len(files) >= 10
    bad = []
    for p in files + sorted((ROOT/'tests').glob('*.py')) + sorted((ROOT/'benchmarks').glob('*.py')):
        tree = ast.parse(p.read_text(), str(p))
        in_pkg = p.parent.name == 'influence_nb'
        for node in ast.walk(tree):
            if in_pkg and isinstance(node, ast.Import):
                bad += [f'{p.name}: import {a.name}' for a in node.names if a.name.split('.')[0] in PICKLERS]
            if in_pkg and isinstance(node, ast.ImportFrom) and (node.module or '').split('.')[0] in PICKLERS:
                bad.append(f'{p.name}: from {node.module} import')
            if isinstance(node, ast.ImportFrom) and node.module == 'torch' and any(a.name == 'load' for a in node.names):
                bad.append(f'{p.name}: from torch import load (use torch.load(..., weights_only=True))')
        for name, node in _calls(tree):
            if name == 'torch.load' and not _kw_true(node, 'weights_only'):
                bad.append(f'{p.name}:{node.lineno}: torch.load without weights_only=True')
            if name in ('np.load', 'numpy.load') and any(k.arg == 'allow_pickle' and not (isinstance(k.value, ast.Constant)
                                                                  and k.value.value is False) for k in node.keywords):
                bad.append(f'{p.name}:{node.lineno}: np.load with allow_pickle')
            if in_pkg and name.split('.')[-1] in ('read_pickle', 'to_pickle', 'loads') and name.split('.')[0] in PICKLERS | {'pd', 'pandas'}:
                bad.append(f'{p.name}:{node.lineno}: {name}')
    assert bad == [], bad


def test_X1_the_checker_catches_violations():
    "The AST check above is not vacuous: it flags each kind of violation."
    src = "import pickle\nimport torch\nx = torch.load('f')\ny = torch.load('f', weights_only=False)\nz = torch.load('f', weights_only=True)\n"
    tree = ast.parse(src)
    flagged = [n.lineno for name, n in _calls(tree) if name == 'torch.load' and not _kw_true(n, 'weights_only')]
    assert flagged == [3, 4]
    assert any(isinstance(n, ast.Import) and n.names[0].name in PICKLERS for n in ast.walk(tree))


def test_X2_factor_files_hold_no_code(env, tmp_path):
    "X2: what `save` writes is a safetensors file (JSON header + raw bytes) and plain JSON — no pickle opcodes."
    m, f, tr, q = env
    f.save(tmp_path)
    raw = (tmp_path/'factors.safetensors').read_bytes()
    n = int.from_bytes(raw[:8], 'little')
    assert json.loads(raw[8:8 + n])['__metadata__']['format'] == 'influence_nb.factors'
    # the 8 bytes are the header's length (its low byte may be 0x80, pickle's PROTO opcode): a JSON header follows at once
    assert raw[8:9] == b'{' and not raw.startswith(b'PK\x03\x04') and b'\x80\x04\x95' not in raw[:16]   # no pickle, no torch zip
    json.loads((tmp_path/'factors.json').read_text())


# ------------------------------------------------------------------------------------------ determinism (R)
@pytest.mark.parametrize('strategy', ['diagonal', 'kfac', 'ekfac'])
def test_R1_same_seed_bit_identical(env, strategy):
    m, f, tr, q = env
    a = inf.fit_factors(m, tr, strategy, seed=7, batch_size=3, progress=False)
    b = inf.fit_factors(m, tr, strategy, seed=7, batch_size=3, progress=False)
    assert all(torch.equal(a.tensors[n][k], b.tensors[n][k]) for n in a.modules for k in a.tensors[n])
    sa, sb = (inf.pairwise_scores(m, x, q, tr, per_layer=True, per_token=True, progress=False) for x in (a, b))
    assert torch.equal(sa.total, sb.total) and torch.equal(sa.per_token, sb.per_token)
    assert torch.equal(inf.self_scores(m, a, tr, progress=False), inf.self_scores(m, b, tr, progress=False))
    if strategy != 'diagonal':       # the seed matters where labels are sampled
        c = inf.fit_factors(m, tr, strategy, seed=8, batch_size=3, progress=False)
        assert not torch.equal(c.tensors[a.modules[0]]['S'], a.tensors[a.modules[0]]['S'])


def test_R2_thread_count(env):
    """R2: at a fixed thread count, repeats are bit-identical; across 1 and 2 threads only the order of floating-point
    reductions (BLAS, LAPACK's eigh) changes, which moves the last bits (see tests/README.md for the measured numbers)."""
    m, _, tr, q = env
    out = {}
    try:
        for nt in (1, 2, 1, 2):
            torch.set_num_threads(nt)
            f = inf.fit_factors(m, tr, 'ekfac', seed=3, batch_size=4, progress=False)
            s = inf.pairwise_scores(m, f, q, tr, progress=False).total
            if nt in out:
                f0, s0 = out[nt]
                assert all(torch.equal(f.tensors[n][k], f0.tensors[n][k]) for n in f.modules for k in f.tensors[n])
                assert torch.equal(s, s0)
            out[nt] = (f, s)
    finally: torch.set_num_threads(1)
    (f1, s1), (f2, s2) = out[1], out[2]
    for n in f1.modules:       # the same batches summed by BLAS with 1 or 2 threads (bit-identical here; allow float32 rounding)
        for k in ('A', 'S'):
            a, b = f1.tensors[n][k], f2.tensors[n][k]
            assert (a - b).abs().max() <= 1e-6 * a.abs().max()
    assert torch.allclose(s2, s1, rtol=0, atol=1e-5 * float(s1.abs().max()))        # measured ≤ 1e-7 relative


# ------------------------------------------------------------------------------- scan's own arguments (S4)
@pytest.mark.parametrize('kw,exc,msg', [
    (dict(k=0), ValueError, '`k` must be an integer'), (dict(chunk_size=0), ValueError, '`chunk_size` must be'),
    (dict(batch_size=-1), ValueError, '`batch_size` must be'), (dict(checkpoint_every=1.5), ValueError, '`checkpoint_every` must be'),
    (dict(on_bad_record='ignore'), ValueError, "`on_bad_record` must be 'raise' or 'skip'"),
    (dict(corpus='no/such/corpus.jsonl'), FileNotFoundError, 'does not exist'),
    (dict(corpus=[{'text': 'words'}]), TypeError, 'pass `tokenizer=`'),
    (dict(corpus=iter([[1, 2, 3]]), query_rank=1, refine=True), ValueError, 'second time'),
], ids=['k', 'chunk_size', 'batch_size', 'checkpoint_every', 'on_bad_record', 'no file', 'text without tokenizer', 'one-shot refine'])
def test_S4_scan_arguments(env, kw, exc, msg):
    m, f, tr, q = env
    kw = {'corpus': tr, **kw}
    with pytest.raises(exc, match=msg): scan(m, f, q, kw.pop('corpus'), progress=False, **kw)


def test_S4_scan_result_files(env, tmp_path):
    m, f, tr, q = env
    with pytest.raises(FileNotFoundError, match='No scan result'): ScanResult.load(tmp_path/'none.parquet')
    p = scan(m, f, q, tr, k=2, progress=False).save(tmp_path/'r.parquet')
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ValueError, match='Could not read'): ScanResult.load(p)
    import pandas as pd
    pd.DataFrame({'a': [1]}).to_parquet(tmp_path/'other.parquet')
    with pytest.raises(ValueError, match='not a scan result'): ScanResult.load(tmp_path/'other.parquet')
    with pytest.raises(FileNotFoundError, match='No part-'): search_mod.read_scores(tmp_path)
    scan(m, f, q, tr, k=2, scores_path=tmp_path/'s', progress=False)
    part = next((tmp_path/'s').glob('part-*.parquet')); part.write_bytes(part.read_bytes()[:50])
    with pytest.raises(ValueError, match='part-000000.parquet'): search_mod.read_scores(tmp_path/'s')


# ------------------------------------------------- issue 16, areas 4–7 (scan outputs, arguments, context, containers)
def test_A4_resume_into_another_scores_path(env, tmp_path):
    "A resumed scan never writes fewer score rows than it scanned: another (empty) scores folder is refused, a moved one works."
    m, f, tr, q = env
    corpus = rand_seqs(12, seed=5)
    full = scan(m, f, q, corpus, k=3, chunk_size=2, progress=False)
    ck, s1 = tmp_path/'scan.ckpt', tmp_path/'s1'
    from test_properties import Flaky
    with pytest.raises(KeyboardInterrupt):
        scan(m, f, q, Flaky(corpus, 7), k=3, chunk_size=2, checkpoint=ck, checkpoint_every=2, scores_path=s1, progress=False)
    with pytest.raises(ValueError, match=r"`scores_path` .*s2 is empty, but checkpoint .* resumes after 3 chunks"):
        scan(m, f, q, corpus, k=3, chunk_size=2, checkpoint=ck, checkpoint_every=2, scores_path=tmp_path/'s2', progress=False)
    os.rename(s1, tmp_path/'moved')                                   # the same folder under another name: works
    r = scan(m, f, q, corpus, k=3, chunk_size=2, checkpoint=ck, checkpoint_every=2, scores_path=tmp_path/'moved', progress=False)
    assert torch.equal(r.indices, full.indices) and torch.equal(r.scores, full.scores) and r.n_scanned == 12
    rows = search_mod.read_scores(tmp_path/'moved')
    assert sorted(rows.index.tolist()) == list(range(12))            # every scanned record has its row


def test_A4_checkpoint_inside_scores_path(env, tmp_path):
    "A checkpoint inside the scores folder works through an interruption; colliding names and a directory are refused."
    m, f, tr, q = env
    corpus = rand_seqs(10, seed=6)
    full = scan(m, f, q, corpus, k=3, chunk_size=2, scores_path=tmp_path/'ref', progress=False)
    s = tmp_path/'out'; ck = s/'scan.ckpt'
    from test_properties import Flaky
    with pytest.raises(KeyboardInterrupt):
        scan(m, f, q, Flaky(corpus, 5), k=3, chunk_size=2, checkpoint=ck, checkpoint_every=2, scores_path=s, progress=False)
    r = scan(m, f, q, corpus, k=3, chunk_size=2, checkpoint=ck, checkpoint_every=2, scores_path=s, progress=False)
    assert torch.equal(r.indices, full.indices) and torch.equal(r.scores, full.scores)
    got, ref = search_mod.read_scores(s), search_mod.read_scores(tmp_path/'ref')
    assert got.sort_index().equals(ref.sort_index())
    for bad, msg in ((s/'scan.json', 'would overwrite'), (s/'part-9.json', 'would overwrite'), (s, 'same path'),
                     (tmp_path, 'is a directory')):
        with pytest.raises(ValueError, match=msg):
            scan(m, f, q, corpus, k=3, checkpoint=bad, scores_path=s if bad != tmp_path else None, progress=False)


@pytest.mark.parametrize('bad', [0, -1, True, False, 2.5, '8'])
def test_A5_max_length_refused(env, bad):
    tok = inf.load_tokenizer(inf.data_dir()/'tokenizer')
    with pytest.raises((ValueError, TypeError), match='`max_length`'): inf.tokenize(tok, ['a b c'], max_length=bad)
    m, f, tr, q = env
    with pytest.raises((ValueError, TypeError), match='`max_length`'): scan(m, f, q, ['a b c'], tokenizer=tok, max_length=bad, progress=False)


def test_A5_max_length_above_context(env):
    m, f, tr, q = env
    tok = inf.load_tokenizer(inf.data_dir()/'tokenizer')
    with pytest.raises(ValueError, match="exceeds the model's context 32"): scan(m, f, q, ['a b'], tokenizer=tok, max_length=33, progress=False)
    long = inf.tokenize(tok, [' '.join(['the'] * 60)], max_length=40)          # tokenize does not know the model ...
    with pytest.raises(ValueError, match=r"train\[0\] has 40 tokens but the model's context is 32"):   # ... the entry point does
        inf.pairwise_scores(m, f, q, [{'input_ids': s['input_ids'] % (VOCAB - 1)} for s in long], progress=False)   # tiny vocab


@pytest.mark.parametrize('query,err,msg', [(2, ValueError, 'out of range'), (-1, ValueError, 'out of range'),
                                           ('q0', TypeError, 'the string'), (True, TypeError, 'integer row index'),
                                           (0.0, TypeError, 'integer row index'), (None, TypeError, 'integer row index')])
def test_A5_top_query_index(env, query, err, msg):
    m, f, tr, q = env
    s = inf.pairwise_scores(m, f, q, tr, progress=False)
    r = scan(m, f, q, tr, k=3, progress=False)
    for obj in (s, r):
        with pytest.raises(err, match=msg): obj.top(query=query)
    assert s.top(query=1, k=3)['index'].tolist() == s.total[1].topk(3).indices.tolist()


@pytest.mark.parametrize('ctx', ['no_grad', 'inference_mode', 'train_mode'])
def test_A6_callers_context(env, ctx):
    "Under no_grad / inference_mode, or with the model in train mode, every entry point equals the plain call."
    import contextlib
    m, f, tr, q = env
    ref = (inf.pairwise_scores(m, f, q, tr, progress=False).total, inf.self_scores(m, f, tr, progress=False),
           scan(m, f, q, tr, k=3, progress=False).scores)
    cm = {'no_grad': torch.no_grad, 'inference_mode': torch.inference_mode, 'train_mode': contextlib.nullcontext}[ctx]
    if ctx == 'train_mode': m.train()
    try:
        with cm():
            got = (inf.pairwise_scores(m, f, q, tr, progress=False).total, inf.self_scores(m, f, tr, progress=False),
                   scan(m, f, q, tr, k=3, progress=False).scores)
    finally: m.eval()
    for a, b in zip(got, ref): assert torch.equal(a, b)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_A6_inference_tensors(env):
    m, f, tr, q = env
    with torch.inference_mode():
        q_inf = [{k: v.clone() for k, v in s.items()} for s in q]          # token tensors made under inference_mode
        m_inf = inf.tiny_model('gpt2', layers=1, ctx=CTX)
    assert torch.equal(inf.pairwise_scores(m, f, q_inf, tr, progress=False).total, inf.pairwise_scores(m, f, q, tr, progress=False).total)
    with pytest.raises(ValueError, match='`model` was created or loaded under torch.inference_mode'):
        inf.pairwise_scores(m_inf, f, q, tr, progress=False)


def _containers(seqs):
    "The same sequences in the containers users pass (padding where the container needs rectangles)."
    import numpy as np, pandas as pd, datasets
    from transformers import BatchEncoding
    ids = [s['input_ids'].tolist() for s in seqs]; L = max(map(len, ids))
    pad = {'input_ids': [x + [0] * (L - len(x)) for x in ids], 'attention_mask': [[1] * len(x) + [0] * (L - len(x)) for x in ids]}
    obj = np.empty(len(ids), dtype=object)
    for i, x in enumerate(ids): obj[i] = np.array(x)
    return {'list of lists': ids, 'DataFrame': pd.DataFrame({'input_ids': ids}), 'Series': pd.Series(ids, index=range(100, 100 + len(ids))),
            'HF Dataset': datasets.Dataset.from_dict({'input_ids': ids}), 'BatchEncoding lists': BatchEncoding(pad),
            'BatchEncoding pt': BatchEncoding({k: torch.tensor(v) for k, v in pad.items()}), 'numpy object 1-D': obj}


def test_A7_containers_equal_list_of_dicts(env):
    import numpy as np
    m, f, tr, q = env
    ref = inf.pairwise_scores(m, f, q, tr, progress=False).total
    ref_scan = scan(m, f, q, tr, k=3, progress=False)
    for name, c in _containers(tr).items():
        assert torch.equal(inf.pairwise_scores(m, f, q, c, progress=False).total, ref), name
        r = scan(m, f, q, c, k=3, progress=False)
        assert torch.equal(r.indices, ref_scan.indices) and torch.equal(r.scores, ref_scan.scores), name
    rect = [s['input_ids'][:4].tolist() for s in tr]                   # a 2-D int array: one sequence per row
    assert torch.equal(inf.pairwise_scores(m, f, q, np.array(rect), progress=False).total, inf.pairwise_scores(m, f, q, rect, progress=False).total)
    for flat in ([5, 6, 7], np.array([5, 6, 7])):                     # one sequence where a list of them goes: ambiguous
        with pytest.raises(TypeError, match='`train` looks like the token ids of ONE sequence'): inf.pairwise_scores(m, f, q, flat, progress=False)


# ------------------------------------------------ issue 16, areas 1, 2, 8: stale factors, reused layers, interrupted saves
def _copy(m):
    c = inf.tiny_model('gpt2', layers=1, ctx=CTX); c.load_state_dict(m.state_dict()); return c


def test_A1_stale_factors_refused_everywhere(env, tmp_path):
    "Factors are bound to every weight and the config, not only the tracked layers: any change is refused by every entry point."
    m, f, tr, q = env
    f.save(tmp_path); g = Factors.load(tmp_path)                          # the binding survives a save/load round trip
    calls = (lambda x, fa: inf.pairwise_scores(x, fa, q, tr, progress=False), lambda x, fa: inf.self_scores(x, fa, tr, progress=False),
             lambda x, fa: scan(x, fa, q, tr, k=2, progress=False), lambda x, fa: fa.check(x))
    edits = {'attention weight fine-tuned': ('transformer.h.0.attn.c_attn.weight', lambda t: t.add_(1e-3 * torch.randn_like(t))),
             'embedding edited': ('transformer.wte.weight', lambda t: t[3].mul_(1.01)),
             'final LayerNorm': ('transformer.ln_f.bias', lambda t: t.add_(1e-4))}
    for what, (name, edit) in edits.items():
        x = _copy(m)
        with torch.no_grad(): edit(dict(x.named_parameters())[name])
        assert inf.fingerprint(inf.find_modules(x, f.modules)) == f.fingerprint, what   # the tracked layers did not move
        for fa in (f, g):
            for call in calls:
                with pytest.raises(ValueError, match=rf"model fingerprint mismatch\): \['weights of {name}'\]"): call(x, fa)
    x = _copy(m); x.config.layer_norm_epsilon = 1e-2                      # same weights, another computation
    with pytest.raises(ValueError, match=r"\['config.layer_norm_epsilon'\] changed"): f.check(x)
    x = _copy(m); x.config.use_cache = False; x.config._name_or_path = 'elsewhere'   # fields that change nothing in eval mode
    x.config.pad_token_id, x.config.resid_pdrop = 5, 0.3
    assert f.check(x) and g.check(_copy(m).double())
    legacy = Factors(**{**f.__dict__, 'info': {k: v for k, v in f.info.items() if k != 'model_digest'}})
    with pytest.warns(UserWarning, match='no digest of the whole model'): legacy.check(m)


def test_A1_fingerprint_sampling_is_cheap_and_catches_training():
    "Beyond SAMPLE values a tensor is hashed on an odd-strided sample: a change of every value is caught, its cost is bounded."
    big = torch.randn(1500, 1401)
    vals = ekfac_mod._values(big, 4096)
    stride = -(-big.numel() // 4096) | 1
    assert len(vals) == 4 * len(big.view(-1)[::stride]) <= 4 * 4096 and stride % 2 == 1
    cols = {i % 1401 for i in range(0, big.numel(), stride)}
    assert len(cols) > 1000                                                  # the sample spreads over the columns
    assert ekfac_mod._values(big + 1e-7 * torch.randn_like(big), 4096) != vals   # a training-like change anywhere: caught
    assert ekfac_mod._values(big.double(), 4096) == vals                          # float64 copy of the same values: same
    small = big[:700]                                                             # 980,700 values <= SAMPLE = 2**20: all hashed
    assert ekfac_mod._values(small) == small.numpy().tobytes() and len(ekfac_mod._values(big)) == 4 * len(big.view(-1)[::3])


def test_A2_partly_shared_weights_refused(env):
    """A weight shared by layers that are not copies of one another (GPT-2's c_fc of two blocks, each keeping its own bias)
    is refused by every strategy; layers reused or tied whole are scored over all their calls (tests/test_reused_layers.py)."""
    m, f, tr, q = env
    solver = {'lissa': {'solver': {'depth': 2}}}
    part = inf.tiny_model('gpt2', layers=2, ctx=CTX); h = part.transformer.h; h[1].mlp.c_fc.weight = h[0].mlp.c_fc.weight
    for strategy in ('identity', 'diagonal', 'kfac', 'ekfac', 'lissa'):
        kw = dict(progress=False, **solver.get(strategy, {}))
        with pytest.raises(ValueError, match=r"Layer 'transformer.h.0.mlp.c_fc' shares its weight with \['transformer.h.1.mlp.c_fc.weight'\]"):
            inf.fit_factors(part, tr, strategy, **kw)
    one = ['transformer.h.0.mlp.c_proj', 'transformer.h.1.mlp.c_proj']       # its untied layers are fine
    ok = inf.fit_factors(part, tr, 'identity', modules=one, progress=False)
    assert torch.isfinite(inf.self_scores(part, ok, tr, progress=False)).all()
    assert not any(mod._forward_hooks for mod in part.modules())


class _Killed(BaseException): pass


@pytest.mark.parametrize('kill', [False, True], ids=['exception', 'killed'])
def test_A8_save_interrupted_at_every_step(env, tmp_path, monkeypatch, kill):
    "Stop `Factors.save` at each of its writes, flushes and renames: the folder always loads the old or the new factors."
    m, f, tr, q = env
    new = inf.fit_factors(m, tr[:5], 'kfac', progress=False)
    f.save(tmp_path)
    seen, k = [], 0
    while True:
        k += 1
        calls = [0]
        def step(fn):
            def wrapped(*a, **kw):
                calls[0] += 1
                if calls[0] == k: raise _Killed(getattr(fn, '__name__', 'step'))
                return fn(*a, **kw)
            return wrapped
        with monkeypatch.context() as mp:
            for name in ('save_file', '_fsync', '_fsync_dir'): mp.setattr(artefact_mod, name, step(getattr(artefact_mod, name)))
            mp.setattr(os, 'replace', step(os.replace)); mp.setattr(Path, 'write_text', step(Path.write_text))
            if kill: mp.setattr(artefact_mod, '_discard', lambda paths: None)      # a killed process cleans nothing up
            try: new.save(tmp_path); done = True
            except _Killed: done = False
        got = Factors.load(tmp_path, covariances=True)                        # never raises
        assert same_factors(got, f) or same_factors(got, new), k
        seen.append('new' if same_factors(got, new) else 'old')
        f.save(tmp_path)                                                      # tidies, and restores the old factors
        assert sorted(p.name for p in tmp_path.iterdir()) == ['factors.json', 'factors.safetensors']
        if done: break
    steps = seen[:-1]                                                         # the last round finished the save
    assert steps == ['old'] * 7 + ['new'] * 3   # 10 steps; the 7th is the JSON rename (the commit): stopped before it, old


def test_A8_committed_then_interrupted_first_save(env, tmp_path, monkeypatch):
    "A first save stopped after its commit (JSON in place, tensors under the pending name) still loads, and the next save tidies."
    m, f, tr, q = env
    real = os.replace
    def replace(a, b):
        if Path(b).name == 'factors.safetensors': raise _Killed('before the tidy step')
        return real(a, b)
    monkeypatch.setattr(os, 'replace', replace)
    with pytest.raises(_Killed): f.save(tmp_path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.factors.pending.safetensors', 'factors.json']
    assert same_factors(Factors.load(tmp_path, covariances=True), f)
    (tmp_path/'.factors.pending.safetensors').write_bytes(b'junk')             # a damaged pending file is not accepted
    with pytest.raises(ValueError, match='checksum'): Factors.load(tmp_path)


@pytest.mark.parametrize('ctx', ['no_grad', 'inference_mode'])
def test_A6_fit_factors_in_callers_context(env, ctx):
    "fit_factors under torch.no_grad() / torch.inference_mode() fits the same factors, bit for bit (area 6, 05_ekfac)."
    m, f, tr, q = env
    with getattr(torch, ctx)(): g = inf.fit_factors(m, tr, 'ekfac', batch_size=4, progress=False)
    assert torch.is_grad_enabled() and same_factors(g, f)
