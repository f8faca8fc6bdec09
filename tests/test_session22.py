"""Session 22: models held or built the ways the command line could not take before: a wrapper holding two language models,
a nanoGPT-style model given as the function that builds it (`module:function`), its `config.block_size` as the context."""
import json, os, subprocess, sys
import pytest, torch, torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM
import influence_nb as inf
from influence_nb.data import model_context, data_dir

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
