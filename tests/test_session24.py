"""Session 24: calls a model makes without gradients, and factors bound to how often each layer runs.

A call under the model's own `torch.no_grad` adds nothing to a weight's gradient and is left out (`03_modules`); a call
inside an autograd Function's forward (a reentrant checkpoint) has a gradient the hooks cannot see and stays refused,
whichever library's Function it is. Every score is checked against autograd over the tracked weights.
"""
import warnings
from types import SimpleNamespace
import pytest, torch
from torch import nn
import influence_nb as inf
import randdata

V = randdata.VOCAB


class Reentrant(torch.autograd.Function):
    "A hand-written reentrant checkpoint, as DeepSpeed's is: the forward runs `fn` without gradients, the backward reruns it."
    @staticmethod
    def forward(ctx, fn, x):
        ctx.fn = fn; ctx.save_for_backward(x)
        with torch.no_grad(): return fn(x)
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_()
        with torch.enable_grad(): y = ctx.fn(x)
        return None, torch.autograd.grad(y, x, g)[0]


class LM(nn.Module):
    "`how`: 'plain', 'nograd' (block 0 also runs once under no_grad, HRM-like), 'idle' (an indexer only under no_grad), 'custom'."
    def __init__(self, how, d=8):
        super().__init__(); torch.manual_seed(0)
        self.how, self.emb, self.head = how, nn.Embedding(V, d), nn.Linear(d, V)
        self.fc = nn.ModuleList([nn.Linear(d, d), nn.Linear(d, d)]); self.idx = nn.Linear(d, 1)
        self.double()
    def forward(self, input_ids, attention_mask=None, **kw):
        x = self.emb(input_ids)
        if self.how == 'nograd':
            with torch.no_grad(): z = torch.tanh(self.fc[0](x))
            x = x + z
        w = 1.0
        if self.how == 'idle':
            with torch.no_grad(): w = torch.sigmoid(self.idx(x))
        for f in self.fc:
            x = x + (Reentrant.apply(f, x) if self.how == 'custom' else torch.tanh(f(x))) * w
        return SimpleNamespace(logits=self.head(x))


def dots(m, names, queries, train):
    params = [m.get_parameter(f'{n}.{p}') for n in names for p in ('weight', 'bias')]
    return randdata.autograd_grads(m, params, queries) @ randdata.autograd_grads(m, params, train).T


@pytest.mark.parametrize('how', ['nograd', 'idle'])
def test_calls_without_gradients_add_nothing(how):
    "Identity scores over the calls with gradients equal autograd; a layer run only without gradients adds 0, with a warning."
    m = LM(how)
    train, queries = randdata.rand_seqs(5, lo=4, hi=9, top=V), randdata.rand_queries(2, length=6, completion=2, top=V)
    names = ['fc.0', 'fc.1'] + (['idx'] if how == 'idle' else [])
    f = inf.fit_factors(m, train, 'identity', modules=names, progress=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        s = inf.pairwise_scores(m, f, queries, train, batch_size=3, per_layer=True, progress=False)
    want = dots(m, ['fc.0', 'fc.1'], queries, train)
    torch.testing.assert_close(s.total.double(), want, rtol=1e-10, atol=1e-12)
    said = [str(x.message) for x in w if 'ran only under `torch.no_grad`' in str(x.message)]
    if how == 'idle':
        assert float(s.per_layer['idx'].abs().max()) == 0 and len(said) == 2 and said[0].startswith("Layers ['idx'] ran only")  # query and train passes
        ek = inf.fit_factors(m, train, 'ekfac', modules=names, fisher='empirical', progress=False)   # no curvature there: warned, damped model-wide
        assert torch.isfinite(inf.pairwise_scores(m, ek, queries, train, progress=False).total).all()
    else: assert not said


def test_a_reentrant_checkpoint_of_ones_own_is_refused():
    "An autograd Function that runs its layers without gradients and again in the backward (DeepSpeed's checkpoint) has a\n    gradient the hooks cannot see: refused as torch's reentrant checkpoint is, not scored 0."
    m = LM('custom')
    train = randdata.rand_seqs(3, lo=4, hi=7, top=V)
    with pytest.raises(ValueError, match=r"ran without gradients .* checkpoint with `use_reentrant=False`"):
        inf.fit_factors(m, train, 'kfac', modules=['fc.0', 'fc.1'], progress=False)


def test_scan_warns_when_the_training_side_runs_a_layer_another_number_of_times():
    "A reviewer: only the queries' pass compared calls, so a changed depth that showed on the training side alone went unsaid;\n    `pairwise_scores` (`tests/test_review_s24.py`) and `scan` now watch that pass too."
    class Depth(nn.Module):   # fc.0 runs once on batches of up to 8 tokens, twice on longer ones
        def __init__(self, d=8):
            super().__init__(); torch.manual_seed(0)
            self.emb, self.fc, self.head = nn.Embedding(V, d), nn.ModuleList([nn.Linear(d, d)]), nn.Linear(d, V); self.double()
        def forward(self, input_ids, attention_mask=None, **kw):
            x = self.emb(input_ids)
            for _ in range(1 if input_ids.shape[1] <= 8 else 2): x = x + torch.tanh(self.fc[0](x))
            return SimpleNamespace(logits=self.head(x))
    m = Depth()
    short, long = randdata.rand_seqs(4, lo=4, hi=8, top=V), randdata.rand_seqs(4, lo=10, hi=12, top=V, seed=1)
    queries = randdata.rand_queries(2, length=6, completion=2, top=V)
    f = inf.fit_factors(m, short, 'ekfac', modules=['fc.0'], fisher='empirical', progress=False)
    assert f.info['calls'] == {'fc.0': [1]}
    with pytest.warns(UserWarning, match=r"Layer 'fc.0' ran 2 times in a forward pass here, and 1 in every"):
        inf.scan(m, f, queries, long, k=2, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter('error'); inf.scan(m, f, queries, short, k=2, progress=False)


INDEXED = """
import torch
from torch import nn
class Indexed(nn.Module):   # an indexer run only under torch.no_grad weighs each token's MLP output
    def __init__(self):
        super().__init__(); torch.manual_seed(0)
        self.wte, self.idx = nn.Embedding(2048, 8), nn.Linear(8, 1)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8)); self.lm_head = nn.Linear(8, 2048)
    def forward(self, idx, targets=None):
        x = self.wte(idx); x = x.cumsum(1) / torch.arange(1, idx.shape[1] + 1)[:, None]
        with torch.no_grad(): w = torch.sigmoid(self.idx(x))
        return self.lm_head(x + w * self.mlp(x)), None
def build(): return Indexed()
"""


def test_the_command_line_says_once_that_a_layer_has_no_gradient(tmp_path):
    "`fit-factors --modules all` on a model with an indexer run under no_grad: fitted, the indexer named once (both passes\n    warn it: the command line printed the same note twice), and `score` equals the API's EK-FAC scores without the indexer."
    import json
    (tmp_path/'m.py').write_text(INDEXED)
    (tmp_path/'c.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in ['Boats sail on the river.', 'A potter sells jars.']))
    (tmp_path/'q.jsonl').write_text(json.dumps({'prompt': 'A potter', 'completion': ' sells'}) + '\n')
    base = ['--model', f'{tmp_path}/m.py:build', '--tokenizer', inf.data_dir()/'tokenizer']
    rc, out, err = randdata.cli_run('fit-factors', *base, '--data', tmp_path/'c.jsonl', '--out', tmp_path/'f', '--modules', 'all')
    assert rc == 0, err
    assert err.count("note: Layers ['idx'] ran only under `torch.no_grad`") == 1, err
    f = inf.Factors.load(tmp_path/'f')
    assert f.modules == ['idx', 'mlp.0', 'mlp.2']
    rc, out, err = randdata.cli_run('score', *base, '--data', tmp_path/'c.jsonl', '--factors', tmp_path/'f', '--queries',
                                    tmp_path/'q.jsonl', '--out', tmp_path/'s.parquet')
    assert rc == 0, err
    import pandas as pd
    from transformers import AutoTokenizer
    got = pd.read_parquet(tmp_path/'s.parquet')
    ns = {}; exec(INDEXED, ns); m = ns['build']()
    tok = AutoTokenizer.from_pretrained(inf.data_dir()/'tokenizer')
    train = inf.tokenize(tok, ['Boats sail on the river.', 'A potter sells jars.'])
    q = inf.tokenize_pairs(tok, [('A potter', ' sells')])
    want = inf.pairwise_scores(m, inf.fit_factors(m, train, modules=['mlp.0', 'mlp.2'], progress=False), q, train, progress=False)
    torch.testing.assert_close(torch.tensor(got.iloc[:, 0].to_numpy()).double(), want.total[0].double(), rtol=1e-5, atol=1e-7)
