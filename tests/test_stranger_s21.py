"""Session 21, a stranger's own model held the way users hold it: `torch.compile`, accelerate offloading, `DataParallel`, a
value-head wrapper, a nanoGPT-style model of their own. Each score is checked against autograd over the tracked weights
(`strategy='identity'`: the plain gradient dot product), and the model is left as found."""
import pytest, torch, torch.nn as nn, torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
import influence_nb as inf

V = 50


def gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)).eval()


def data(n=6, q=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    train = [{'input_ids': torch.randint(0, V, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g)} for _ in range(n)]
    queries = []
    for _ in range(q):
        ids = torch.randint(0, V, (8,), generator=g); lab = ids.clone(); lab[:5] = -100
        queries.append({'input_ids': ids, 'labels': lab})
    return train, queries


def autograd_scores(params, logits_fn, queries, train):
    "grad log p(completion_q) . grad log p(sequence_n) over `params`, in float64, one sequence at a time."
    def grad(s):
        lab = s.get('labels', s['input_ids'])[1:]
        lp = torch.log_softmax(logits_fn(s['input_ids'][None])[0, :-1].double(), -1)
        keep = lab != -100
        g = torch.autograd.grad(lp[keep].gather(-1, lab[keep][:, None]).sum(), params)
        return torch.cat([x.reshape(-1) for x in g]).double()
    return torch.stack([grad(s) for s in queries]) @ torch.stack([grad(s) for s in train]).T


def rel(a, b): return float((a.double() - b).abs().max() / b.abs().max())


def identity_scores(model, queries, train, **kw):
    f = inf.fit_factors(model, train, strategy='identity', modules='mlp', **kw)
    return inf.pairwise_scores(model, f, queries, train, **kw).total


def mlp_params(model): return [p for n, p in model.named_parameters() if '.mlp.' in n]


def state(model): return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize('how', ['torch.compile(model)', 'model.compile()'])
def test_a_compiled_model_scores_as_autograd(how):
    "A torch.compile'd graph left out the hooks' outputs: every gradient they took came out 0 (rel. error 1.01); now eager."
    m, (train, queries) = gpt2(), data()
    want = autograd_scores(mlp_params(m), lambda ids: m(ids).logits, queries, train)
    if how == 'model.compile()': m.compile(); cm = m
    else: cm = torch.compile(m)
    before = state(cm)
    assert rel(identity_scores(cm, queries, train), want) < 1e-5
    assert all(torch.equal(v, state(cm)[k]) for k, v in before.items()) and not cm.training


@pytest.mark.parametrize('strategy', ['ekfac', 'cg'])
def test_factors_serve_a_model_and_its_compiled_wrapper_alike(strategy, tmp_path):
    "Session 22: factors fitted on a model were refused on its torch.compile wrapper (its layers are '_orig_mod.<name>') and\n    back; both are now named as the plain model, so either's factors (saved and loaded too) give the other's scores."
    m, (train, queries) = gpt2(), data()
    cm, kw = torch.compile(m), dict(damping=1e-3) if strategy == 'cg' else {}
    plain = inf.fit_factors(m, train, strategy=strategy, modules='mlp')
    wrapped = inf.fit_factors(cm, train, strategy=strategy, modules='mlp')
    assert wrapped.modules == plain.modules == [n for n in inf.candidate_modules(cm) if '.mlp.' in n] and not plain.modules[0].startswith('_orig_mod')
    if strategy == 'ekfac': plain.save(tmp_path); plain = inf.Factors.load(tmp_path)
    want = inf.pairwise_scores(m, plain, queries, train, **kw).total
    assert torch.equal(inf.pairwise_scores(cm, plain, queries, train, **kw).total, want)
    assert torch.equal(inf.pairwise_scores(m, wrapped, queries, train, **kw).total, want)
    named = [n for n, _ in cm.named_modules() if n.endswith('mlp.c_fc')]   # what the wrapper's own names say
    assert named[0].startswith('_orig_mod.') and [x.name for x in inf.find_modules(cm, named)] == [n[10:] for n in named]


@pytest.mark.parametrize('how', ['cpu_offload', 'disk_offload'])
def test_an_offloaded_model_is_named_as_such(how, tmp_path):
    "accelerate's offloading leaves weights on 'meta' between passes; it was refused as a model with 'no weights loaded'."
    import accelerate
    m, (train, _) = gpt2(), data()
    m = accelerate.cpu_offload(m, execution_device='cpu') if how == 'cpu_offload' else \
        accelerate.disk_offload(m, str(tmp_path), execution_device='cpu')
    with pytest.raises(ValueError, match='is offloaded by accelerate'):
        inf.fit_factors(m, train, strategy='identity')


class ValueHead(nn.Module):
    "A user's RLHF-style wrapper: returns `(logits, values)` as a tuple, has no `config` and no `get_output_embeddings`."
    def __init__(self, lm):
        super().__init__(); self.lm, self.v_head = lm, nn.Linear(lm.config.hidden_size, 1)
    def forward(self, input_ids, attention_mask=None):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.logits, self.v_head(out.hidden_states[-1])[..., 0]


def test_a_value_head_wrapper_returning_a_tuple_scores_as_autograd():
    "It failed with AttributeError: 'tuple' object has no attribute 'dtype'."
    m, (train, queries) = gpt2(), data()
    want = autograd_scores(mlp_params(m), lambda ids: m(ids).logits, queries, train)
    assert rel(identity_scores(ValueHead(m), queries, train, batch_size=3), want) < 1e-5


class NanoBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__(); self.h = h
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.Module(); self.attn.c_attn = nn.Linear(d, 3 * d); self.attn.c_proj = nn.Linear(d, d)
        self.mlp = nn.Module(); self.mlp.c_fc = nn.Linear(d, 4 * d); self.mlp.c_proj = nn.Linear(4 * d, d)
    def forward(self, x):
        B, T, C = x.shape
        q, k, v = [t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in self.attn.c_attn(self.ln_1(x)).split(C, 2)]
        x = x + self.attn.c_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    "nanoGPT's shape: `forward(idx, targets=None) -> (logits, loss)`, `lm_head` tied to `wte`, no config, no `.generate`."
    def __init__(self, d=32, n_layer=2, h=4, block_size=32, last_only=False):
        super().__init__(); self.last_only = last_only
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(V, d), wpe=nn.Embedding(block_size, d),
                                              h=nn.ModuleList([NanoBlock(d, h) for _ in range(n_layer)]), ln_f=nn.LayerNorm(d)))
        self.lm_head = nn.Linear(d, V, bias=False); self.transformer.wte.weight = self.lm_head.weight
    def forward(self, idx, targets=None):
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.shape[1]))
        for b in self.transformer.h: x = b(x)
        x = self.transformer.ln_f(x)
        if self.last_only and targets is None: return self.lm_head(x[:, [-1]]), None   # nanoGPT's generation shortcut
        logits = self.lm_head(x)
        return logits, None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def test_a_nanogpt_style_model_scores_as_autograd_padded_or_not():
    "It failed with TypeError: forward() got an unexpected keyword argument 'input_ids'. It is run as `model(ids)`, without a\n    mask: exact on right-padded batches of a causal model (EK-FAC scores padded = unpadded)."
    torch.manual_seed(0); m = NanoGPT().eval()
    train, queries = data(n=8)
    want = autograd_scores(mlp_params(m), lambda ids: m(ids)[0], queries, train)
    assert rel(identity_scores(m, queries, train, batch_size=4), want) < 1e-5
    f = inf.fit_factors(m, train, strategy='ekfac', batch_size=4)
    a, b = (inf.pairwise_scores(m, f, queries, train, batch_size=bs).total for bs in (4, 1))
    assert rel(a, b.double()) < 1e-5
    names = [x.name for x in inf.find_modules(m, 'all')]      # the tied lm_head is the head, not a layer 'all' tracks
    assert 'lm_head' not in names and len(names) == 8


def test_logits_of_one_position_are_refused_by_shape():
    torch.manual_seed(0); m = NanoGPT(last_only=True).eval()
    train, _ = data()
    with pytest.raises(ValueError, match=r"returned logits of shape \(\d+, 1, 50\) .* logits at every position"):
        inf.fit_factors(m, train, strategy='ekfac')


def test_wrapped_models_keep_the_vocabulary_context_and_head_of_the_model_inside():
    "Without a `config` on top, token ids past the vocabulary, texts past a rotary model's context (silently scored) and the\n    LM head in modules='all' (a vocab × vocab factor) went unchecked."
    g = gpt2()
    for w in (nn.DataParallel(g), ValueHead(g)):
        with pytest.raises(ValueError, match=r"token id 60 outside the model's vocabulary \[0, 50\)"):
            inf.fit_factors(w, [{'input_ids': torch.tensor([1, 2, 60])}], strategy='identity')
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)).eval()
    with pytest.raises(ValueError, match="has 40 tokens but the model's context is 32"):
        inf.fit_factors(ValueHead(llama), [{'input_ids': torch.randint(0, V, (40,))}], strategy='identity')
    plain = [x.name for x in inf.find_modules(llama, 'all')]
    assert [x.name for x in inf.find_modules(nn.DataParallel(llama), 'all')] == [f'module.{n}' for n in plain]
    assert [x.name for x in inf.find_modules(ValueHead(llama), 'all')] == [f'lm.{n}' for n in plain] + ['v_head']


def test_a_trainer_output_folder_names_its_checkpoints(tmp_path):
    "`--model run/` (Trainer's output_dir, with checkpoint-*/ inside) was 'neither a bundled model … nor a Hub id'."
    for step in (9, 10, 100):
        (tmp_path/'run'/f'checkpoint-{step}').mkdir(parents=True); (tmp_path/'run'/f'checkpoint-{step}'/'config.json').write_text('{}')
    with pytest.raises(ValueError, match=r"is a Trainer output folder: .*checkpoint-100', the latest"):
        inf.load_model(tmp_path/'run')


def test_memory_estimates_find_shared_inputs_of_a_nanogpt_style_model():
    "`memory.shared_inputs` called the model as transformers does and, on `forward(idx)`, returned None (the estimate then\n    guessed which layers share an input); it runs the model as the passes do: c_attn alone reads ln_1's output, and so on."
    from influence_nb.memory import shared_inputs
    torch.manual_seed(0); m = NanoGPT().eval()
    got = shared_inputs(m, inf.find_modules(m, 'all'))
    assert got is not None and len(got) == 8 and all(got[n] == n for n in got)   # no two of nanoGPT's layers read one input
    g = gpt2()
    assert shared_inputs(g, inf.find_modules(g, 'all')) is not None


# --- session 21 review: wrappers of a model without `input_ids`, tuples led by hidden states, a head on a base model, the stance


@pytest.mark.parametrize('wrap', [nn.DataParallel, torch.compile])
def test_a_wrapped_nanogpt_style_model_is_called_as_the_model_inside(wrap):
    "`lm_call` read the wrapper's `(*args, **kwargs)` and called `forward(idx)` with input_ids=: TypeError."
    torch.manual_seed(0); m = NanoGPT().eval()
    train, queries = data()
    want = autograd_scores(mlp_params(m), lambda ids: m(ids)[0], queries, train)
    assert rel(identity_scores(wrap(m), queries, train, batch_size=3), want) < 1e-5


class HiddenFirst(nn.Module):
    "A wrapper returning `(hidden_states, logits)`: the first item has the shape of logits, [batch, T, d]."
    def __init__(self, lm): super().__init__(); self.lm = lm
    def forward(self, input_ids, attention_mask=None):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.hidden_states[-1], out.logits


def test_hidden_states_first_in_a_tuple_are_not_taken_for_logits():
    "The true-Fisher fit sampled its labels from softmax(hidden states) and fitted silently; scores then hit an IndexError."
    train, _ = data()
    with pytest.raises(ValueError, match=r"returned a \[batch, T, 32\] tensor for token ids up to 4\d: not logits"):
        inf.fit_factors(HiddenFirst(gpt2()), train, strategy='ekfac')


def test_a_head_on_a_transformers_base_model_is_the_head():
    "GPT2Model's `get_output_embeddings()` is None: `output_head` stopped there, and modules='all' tracked the vocab × vocab lm_head."
    from transformers import GPT2Model
    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = GPT2Model(GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4, n_positions=32))
            self.lm_head = nn.Linear(32, V, bias=False)
        def forward(self, input_ids, attention_mask=None):
            return self.lm_head(self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state)
    b = Backbone()
    from influence_nb.modules import output_head
    assert output_head(b) is b.lm_head and 'lm_head' not in [x.name for x in inf.find_modules(b, 'all')]


def test_captures_in_threads_give_the_compiler_stance_back():
    "set_stance is process-wide and restored what each block found: two captures interleaved in threads left 'force_eager'."
    import threading
    from torch._dynamo import eval_frame
    from influence_nb.modules import capture
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    def first():
        g = gpt2()
        with capture(g, inf.find_modules(g, 'mlp')): a_in.set(); b_in.wait(10)
        a_out.set()
    def second():
        a_in.wait(10); g = gpt2(1)
        with capture(g, inf.find_modules(g, 'mlp')): b_in.set(); a_out.wait(10)
    before = eval_frame._stance.stance
    ts = [threading.Thread(target=f) for f in (first, second)]
    for t in ts: t.start()
    for t in ts: t.join()
    assert eval_frame._stance.stance == before == 'default'


def test_a_torch_without_set_stance_refuses_only_compiled_models(monkeypatch):
    "`torch.compiler.set_stance` is torch >= 2.6 (pyproject allows 2.3): every capture raised AttributeError there."
    monkeypatch.delattr(torch.compiler, 'set_stance')
    m, (train, queries) = gpt2(), data()
    want = autograd_scores(mlp_params(m), lambda ids: m(ids).logits, queries, train)
    assert rel(identity_scores(m, queries, train), want) < 1e-5
    with pytest.raises(ValueError, match=r"is torch.compile'd, and this torch .* cannot run it eagerly"):
        inf.fit_factors(torch.compile(m), train, strategy='ekfac')
