"""Session 22: models held or built the ways the command line could not take before: a wrapper holding two language models,
a nanoGPT-style model given as the function that builds it (`module:function`), its `config.block_size` as the context."""
import json, os, subprocess, sys
import pytest, torch, torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM
import influence_nb as inf
from influence_nb.data import model_context, data_dir
import randdata

V = 60


def llama(layers, d, ctx, seed):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=ctx)).eval()


class Speculative(nn.Module):
    "A draft model registered first, the target model that computes the logits second."
    def __init__(self):
        super().__init__(); self.draft = llama(1, 16, 16, 0); self.target = llama(2, 32, 64, 1)
    def forward(self, input_ids, attention_mask=None): return self.target(input_ids=input_ids, attention_mask=attention_mask)


class Declared(Speculative):
    "The same wrapper saying which model runs."
    @property
    def config(self): return self.target.config
    def get_output_embeddings(self): return self.target.lm_head


def data(n=6, T=24, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (T,), generator=g).tolist() for _ in range(n)], [torch.randint(0, V, (10,), generator=g).tolist()]


def test_a_wrapper_holding_two_language_models_is_refused_naming_them():
    "Before: the draft's config (context 16) refused 24-token sequences the target takes, and 'all' tracked the target's head."
    train, _ = data()
    with pytest.raises(ValueError, match=r"holds 2 language models \(draft: LlamaForCausalLM, target: LlamaForCausalLM\).*"
                                         r"e\.g\. `model\.target`"):
        inf.fit_factors(Speculative(), train, strategy='identity')


def test_a_wrapper_that_declares_its_model_scores_as_that_model():
    train, queries = data()
    w = Declared()
    f = inf.fit_factors(w, train, strategy='ekfac', modules='mlp')
    assert f.modules == [f'target.model.layers.{i}.mlp.{p}' for i in (0, 1) for p in ('gate_proj', 'up_proj', 'down_proj')]
    g = inf.fit_factors(w.target, train, strategy='ekfac', modules='mlp')
    assert torch.equal(inf.pairwise_scores(w, f, queries, train).total, inf.pairwise_scores(w.target, g, queries, train).total)
    assert inf.find_modules(w, 'all')[-1].name == 'target.model.layers.1.mlp.down_proj'   # the target's head is never tracked
    with pytest.raises(ValueError, match='were not called in the model'):                     # 'all' reaches the idle draft
        inf.pairwise_scores(w, inf.fit_factors(w, train, strategy='identity', modules='all'), queries, train)


NANO = """import torch, torch.nn as nn
from dataclasses import dataclass
@dataclass
class GPTConfig: vocab_size: int = 2048; block_size: int = 16; n_embd: int = 8
class GPT(nn.Module):
    def __init__(self, c):
        super().__init__(); self.config = c; self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.mlp = nn.Sequential(nn.Linear(c.n_embd, 16), nn.Tanh(), nn.Linear(16, c.n_embd)); self.lm_head = nn.Linear(c.n_embd, c.vocab_size)
    def forward(self, idx, targets=None):
        x = self.wte(idx); x = x.cumsum(1) / torch.arange(1, idx.shape[1] + 1)[:, None]
        return self.lm_head(x + self.mlp(x)), None
def build(): torch.manual_seed(0); return GPT(GPTConfig())
"""


def test_a_nanogpt_block_size_is_its_context():
    "nanoGPT and minGPT keep their context in `config.block_size`; before, none was found and long sequences reached the model."
    ns = {}; exec(NANO, ns)
    m = ns['build']()
    assert model_context(m) == 16
    with pytest.raises(ValueError, match="has 20 tokens but the model's context is 16"):
        inf.fit_factors(m, [list(range(20))], strategy='identity')


def test_the_command_line_takes_module_function_from_the_working_directory(tmp_path):
    "`--model nano:build` imports `nano` from the working directory, as `python -m` would, in a fresh process."
    (tmp_path/'nano.py').write_text(NANO)
    (tmp_path/'fit.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in ['The capital of Zorvia is Pellin.',
                                                                                     'Boats sail on the river.', 'A potter sells jars.']))
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}
    args = ['fit-factors', '--model', 'nano:build', '--tokenizer', str(data_dir()/'tokenizer'), '--data', 'fit.jsonl', '--out', 'f']
    cli = [sys.executable, '-c', 'import sys; from influence_nb.cli import main; sys.exit(main())']
    r = subprocess.run([*cli, *args], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    f = inf.Factors.load(tmp_path/'f')
    ns = {}; exec(NANO, ns)
    model = ns['build']()
    assert f.modules == ['mlp.0', 'mlp.2'] and f.n_sequences == 3
    f.check(model)                                       # bound to the weights `build` makes
    bad = subprocess.run([*cli, *args[:2], 'nano:nothing', *args[3:]], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Cannot load the model function nano:nothing (AttributeError" in bad.stderr, bad.stderr


def autograd_identity(model, params, queries, train):
    "grad log p(query) . grad log p(sequence) over `params`, one sequence at a time (float64 sums)."
    def grad(ids):
        ids = torch.as_tensor(ids)[None]
        lp = torch.log_softmax(inf.data.logits_of(model(input_ids=ids), ids)[0, :-1].double(), -1)
        g = torch.autograd.grad(lp.gather(-1, ids[0, 1:, None]).sum(), params)
        return torch.cat([x.reshape(-1) for x in g]).double()
    return torch.stack([grad(q) for q in queries]) @ torch.stack([grad(s) for s in train]).T


def test_an_output_the_model_scales_in_place_is_scored_as_autograd():
    "Gemma 3n scales `per_layer_model_projection`'s output with `*=`: a leaf of ours, so every score pass crashed (autograd)."
    m = randdata.tiny_gemma3n(vocab=V)
    train, queries = data(n=4, T=9)
    names = ['model.per_layer_model_projection', 'model.layers.0.mlp.up_proj']
    f = inf.fit_factors(m, train, strategy='identity', modules=names)
    got = inf.pairwise_scores(m, f, queries, train).total
    want = autograd_identity(m, [m.get_submodule(n).weight for n in names], queries, train)
    assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-5
    inf.fit_factors(m, train, strategy='ekfac', modules=names)      # the covariance and eigenvalue passes run too


class ScaledInPlace(nn.Module):
    "A layer whose output the model changes in place after it has run, inside the graph (`*=`), and one it adds to in place."
    def __init__(self):
        super().__init__(); torch.manual_seed(0)
        self.emb, self.fc, self.proj, self.head = nn.Embedding(V, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, V)
    def forward(self, input_ids):
        x = self.emb(input_ids); h = torch.tanh(self.fc(x))
        h = self.proj(h)
        h *= 3.0                                                        # the layer's output, scaled in place
        h += x                                                          # and added to in place (Falcon's `mlp_output += attn`)
        return self.head(h.cumsum(1))


def test_an_output_changed_in_place_inside_the_graph_is_scored_as_autograd():
    "Before: `proj`'s output gradient was the scaled tensor's, so its scores were off by the factor 3, without a word."
    m, (train, queries) = ScaledInPlace().eval(), data(n=3, T=6)
    f = inf.fit_factors(m, train, strategy='identity', modules=['fc', 'proj'])
    want = autograd_identity(m, [m.fc.weight, m.fc.bias, m.proj.weight, m.proj.bias], queries, train)
    assert float((inf.pairwise_scores(m, f, queries, train).total.double() - want).abs().max() / want.abs().max()) < 1e-5
    f = inf.fit_factors(m, train, strategy='ekfac', modules=['fc', 'proj'], fisher='empirical')
    got = inf.pairwise_scores(m, f, queries, train, per_layer=True)
    assert torch.allclose(sum(got.per_layer.values()), got.total, rtol=1e-5, atol=1e-6)


CONFIG_PY = '''from transformers import LlamaConfig
class TinyConfig(LlamaConfig):
    model_type = "tiny_custom"
'''
MODELING_PY = '''from transformers import LlamaForCausalLM
from .configuration_tiny import TinyConfig
class TinyForCausalLM(LlamaForCausalLM):
    config_class = TinyConfig
'''


@pytest.fixture(scope='module')
def custom_folder(tmp_path_factory):
    "A model folder with its own code (`auto_map`), as `trust_remote_code` models are shipped, with the bundled tokenizer."
    import importlib.util
    d = tmp_path_factory.mktemp('custom')/'tiny'
    d.mkdir()
    (d/'configuration_tiny.py').write_text(CONFIG_PY); (d/'modeling_tiny.py').write_text(MODELING_PY)
    spec = importlib.util.spec_from_file_location('configuration_tiny', d/'configuration_tiny.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    tok = inf.load_tokenizer(data_dir()/'tokenizer')
    cfg = mod.TinyConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64)
    cfg.auto_map = {'AutoConfig': 'configuration_tiny.TinyConfig', 'AutoModelForCausalLM': 'modeling_tiny.TinyForCausalLM'}
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d); tok.save_pretrained(d)
    (d.parent/'fit.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in ['The capital of Zorvia is Pellin.',
                                                                                     'Boats sail on the river.']))
    return d


def test_a_folder_with_custom_code_is_refused_without_trust_and_loads_with_it(custom_folder):
    "Before: transformers' own refusal named an argument influence_nb did not take (and in a terminal asked y/N, twice)."
    with pytest.raises(ValueError, match=r"holds custom code .* pass `trust_remote_code=True` \(`--trust-remote-code`"):
        inf.load_model(custom_folder)
    m, tok = inf.load_model(custom_folder, trust_remote_code=True)
    assert type(m).__name__ == 'TinyForCausalLM' and not m.training and len(tok) == 2048
    want = LlamaForCausalLM.from_pretrained(custom_folder)                 # the same weights, read as a plain Llama
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), want.state_dict().values()))


def test_the_command_line_and_explorer_take_trust_remote_code(custom_folder):
    from influence_nb.cli import main
    from influence_nb.explorer import ExplorerSession, app_notebook
    args = ['fit-factors', '--model', custom_folder, '--data', custom_folder.parent/'fit.jsonl', '--out', custom_folder.parent/'f']
    assert main(args) == 2                                                   # refused, saying why (no prompt)
    assert main([*args, '--trust-remote-code']) == 0
    assert inf.Factors.load(custom_folder.parent/'f').modules == [f'model.layers.{i}.mlp.{p}' for i in (0, 1)
                                                                  for p in ('gate_proj', 'up_proj', 'down_proj')]
    with pytest.raises(ValueError, match='holds custom code'):
        ExplorerSession(model=custom_folder, corpus=custom_folder.parent/'fit.jsonl')
    s = ExplorerSession(model=custom_folder, corpus=custom_folder.parent/'fit.jsonl', trust_remote_code=True)
    assert type(s.model(s.custom)[0]).__name__ == 'TinyForCausalLM'
    nb = app_notebook(custom_folder.parent/'app.ipynb', model=str(custom_folder), trust_remote_code=True).read_text()
    assert 'trust_remote_code=True' in nb                                    # what `explore --trust-remote-code` serves


# Review of session 22's changes: what its own tests did not show.

class Checkpointed(nn.Module):
    "Two blocks run under non-reentrant activation checkpointing (recomputed during the backward), one scaling in place."
    def __init__(self, ckpt=True):
        super().__init__(); torch.manual_seed(0)
        self.emb, self.head, self.ckpt = nn.Embedding(V, 8), nn.Linear(8, V), ckpt
        self.blocks = nn.ModuleList([nn.ModuleDict(dict(fc=nn.Linear(8, 16), proj=nn.Linear(16, 8))) for _ in range(2)])
    def block(self, b, x):
        h = b['proj'](torch.tanh(b['fc'](x)))
        h *= 3.0                                                        # in place, as `ScaledInPlace`
        return x + h
    def forward(self, input_ids):
        from torch.utils.checkpoint import checkpoint
        x = self.emb(input_ids)
        for b in self.blocks: x = checkpoint(self.block, b, x, use_reentrant=False) if self.ckpt else self.block(b, x)
        return self.head(x.cumsum(1))


def test_a_model_with_activation_checkpointing_is_scored_as_autograd():
    "Before: the recomputation got the layer's output where the forward had got our leaf's copy: torch's CheckpointError."
    m, ref, (train, queries) = Checkpointed().eval(), Checkpointed(ckpt=False).eval(), data(n=3, T=6)
    names = [f'blocks.{i}.{p}' for i in (0, 1) for p in ('fc', 'proj')]
    want = autograd_identity(ref, [p for n in names for p in ref.get_submodule(n).parameters()], queries, train)
    got = inf.pairwise_scores(m, inf.fit_factors(m, train, strategy='identity', modules=names), queries, train).total
    assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-5
    f, g = (inf.fit_factors(x, train, strategy='ekfac', modules=names, fisher='empirical') for x in (m, ref))
    assert torch.allclose(inf.pairwise_scores(m, f, queries, train).total, inf.pairwise_scores(ref, g, queries, train).total, rtol=1e-4)


def test_a_compiled_models_layers_lie_in_its_blocks_in_the_explorer():
    "Before: `modules.blocks` named a torch.compile wrapper's blocks '_orig_mod.…', so every layer fell in 'other' (1 block)."
    from influence_nb.explorer import layer_blocks
    m = llama(2, 16, 32, 0)
    names = [x.name for x in inf.find_modules(torch.compile(m), 'mlp')]
    assert layer_blocks(names, torch.compile(m)) == layer_blocks(names, m) == [0, 0, 0, 1, 1, 1]


def test_a_process_failing_outside_a_record_stops_the_others_in_our_words(monkeypatch):
    "Before: a process whose BM25 pass failed other than at a record (failed_at None) left the others a bare TypeError."
    import torch.distributed as dist
    from influence_nb import search
    from influence_nb.tfidf import doc_terms
    mine = doc_terms([[1, 2]], [(1, [1, 2, 3])])
    gathered = [(None, None, 0, None, None), (mine, None, 0, None, None)]          # process 0 raised (say, out of memory)
    monkeypatch.setattr(dist, 'all_gather_object', lambda got, obj: got.__setitem__(slice(None), gathered))
    monkeypatch.setattr(search, 'dist_info', lambda: (1, 2))
    info = {'failed_at': None, 'n_skipped': 0, 'first_at': None}
    with pytest.raises(RuntimeError, match=r'^Process 0 of 2 stopped \(its error says why\); this process stops too\.$'):
        search._shared_terms(mine, None, info, {})
    monkeypatch.setattr(search, 'dist_info', lambda: (0, 2))
    with pytest.raises(MemoryError):                                                 # its own process raises its own error
        search._shared_terms(None, MemoryError('out of memory'), info, {})


def test_a_reentrant_checkpoint_is_refused_saying_what_to_do():
    "A reentrant checkpoint runs its forward without gradients: before, autograd's 'element 0 of tensors does not require grad'."
    from torch.utils.checkpoint import checkpoint
    class Reentrant(Checkpointed):
        def forward(self, input_ids):
            x = self.emb(input_ids)
            for b in self.blocks: x = checkpoint(self.block, b, x, use_reentrant=True)
            return self.head(x.cumsum(1))
    m, (train, _) = Reentrant().eval(), data(n=2, T=6)
    with pytest.raises(ValueError, match=r"ran without gradients .* checkpoint with `use_reentrant=False`"):
        inf.fit_factors(m, train, strategy='kfac', modules=['blocks.0.fc', 'blocks.1.fc'])


def test_the_explorer_runs_a_model_without_blocks():
    "A model with no list of blocks (a small model of one's own) was refused by the explorer ('a block number in every name');\n    `candidates=0` scored one sequence and `k` above 50 was cut to 50, silently (the widgets' bounds)."
    from influence_nb.explorer import explorer, layer_figure

    class Nano(nn.Module):
        def __init__(self):
            super().__init__(); self.wte, self.mlp, self.lm_head = nn.Embedding(2048, 8), nn.Linear(8, 8), nn.Linear(8, 2048)
        def forward(self, idx): return self.lm_head(torch.tanh(self.mlp(self.wte(idx))).cumsum(1))
    torch.manual_seed(0)
    m, texts = Nano(), ['a b c', 'c d', 'b c d e']
    app = explorer(m, data_dir()/'tokenizer', texts, queries=[('a b', ' c')], modules='all', fit_sample=0, candidates=0, k=3)
    r = app.run()                            # candidates=0: every sequence, as on the command line (the widget made it 1)
    assert len(r.candidates) == 3 and not r.prefiltered
    with pytest.raises(ValueError, match='`k` is at most 50 in the explorer'):   # (the widget cut 60 to 50, silently)
        explorer(m, data_dir()/'tokenizer', texts, modules='all', k=60)
    assert r.block_of == {'mlp': None} and [t.get_text() for t in layer_figure(r).axes[0].get_xticklabels()] == ['other']
    tok = inf.load_tokenizer(data_dir()/'tokenizer')
    f = inf.fit_factors(m, inf.tokenize(tok, texts), strategy='ekfac', modules='all', fisher='true')
    want = inf.pairwise_scores(m, f, inf.tokenize_pairs(tok, [('a b', ' c')]), inf.tokenize(tok, texts)).total[0]
    assert torch.allclose(torch.tensor(r.top.sort_values('id')['score'].to_numpy(), dtype=want.dtype), want, rtol=1e-4)


def test_explore_takes_the_apps_opening_settings(tmp_path, capsys):
    "`explore --candidates 0 --k 3 --strategy identity` opens the app so: every sequence, three shown, identity scores."
    from influence_nb.cli import main
    (tmp_path/'nano.py').write_text(NANO)
    texts = ['The capital of Zorvia is Pellin.', 'Boats sail on the river.', 'A potter sells jars.', 'Pellin is old.']
    (tmp_path/'c.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts))
    (tmp_path/'q.jsonl').write_text(json.dumps({'id': 'q', 'prompt': 'The capital of Zorvia is', 'completion': ' Pellin'}) + '\n')
    args = ['explore', '--model', f'{tmp_path}/nano.py:build', '--tokenizer', data_dir()/'tokenizer', '--corpus', tmp_path/'c.jsonl',
            '--queries', tmp_path/'q.jsonl', '--modules', 'all', '--fit-sample', 0, '--no-serve']
    assert main([*args, '--candidates', 0, '--k', 3, '--strategy', 'identity']) == 0
    rows = [l.split() for l in capsys.readouterr().out.splitlines() if l[:1].isdigit()]
    ns = {}; exec(NANO, ns)
    m, tok = ns['build'](), inf.load_tokenizer(data_dir()/'tokenizer')
    f = inf.fit_factors(m, inf.tokenize(tok, texts), strategy='identity', modules='all')
    want = inf.pairwise_scores(m, f, inf.tokenize_pairs(tok, [('The capital of Zorvia is', ' Pellin')]), inf.tokenize(tok, texts)).total[0]
    assert [int(r[1]) for r in rows] == want.topk(3).indices.tolist()              # rank, id (the index), score, ...
    assert main([*args, '--k', 60]) == 2 and '--k must be 1 to 50' in capsys.readouterr().err
