"""Small random sequences, prompt/completion queries and tanh networks, and the tracked parameter names of a model:
the one definition the test files share.

Token ids are drawn from [1, top): `top=VOCAB - 1` by default (the reliability and property tests), `top=VOCAB` where
a test file has always used the whole vocabulary (test_search, test_engine, test_architectures). The draws happen in
the same order as in the definitions they replace, so every test sees the data it saw before.
"""
import torch
import influence_nb as inf
from influence_nb.modules import layer_param_names

VOCAB = 32


def rand_seqs(n, lo=4, hi=12, seed=0, top=VOCAB - 1, prompt=0):
    "`n` sequences of random ids in [1, top), lengths drawn from [lo, hi); the first `prompt` tokens are not scored."
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, top, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g)
        out.append({'input_ids': ids, 'labels': torch.cat([torch.full((prompt,), -100), ids[prompt:]])} if prompt else ids)
    return inf.as_sequences(out)


def rand_queries(n, seed=1, length=6, completion=2, top=VOCAB - 1):
    "`n` queries of `length` random tokens whose last `completion` tokens are the measured completion."
    g = torch.Generator().manual_seed(seed)
    return inf.as_sequences([{'input_ids': torch.randint(1, top, (length,), generator=g),
                              'labels': [-100] * (length - completion) + torch.randint(1, top, (completion,), generator=g).tolist()}
                             for _ in range(n)])


def tanh_mlp(widths, seed=0):
    "A float64 MLP: Linear layers of `widths` (input, hidden..., output) with Tanh between, initialised after `torch.manual_seed(seed)`."
    torch.manual_seed(seed)
    layers = [m for d_in, d_out in zip(widths, widths[1:]) for m in (torch.nn.Linear(d_in, d_out), torch.nn.Tanh())]
    return torch.nn.Sequential(*layers[:-1]).double()                   # no Tanh after the output layer


def param_names(model, modules):
    "The parameter names of the layers `modules` selects (`inf.find_modules`), in the order the engine lays them out."
    return layer_param_names(inf.find_modules(model, modules))


def loss_backward(model, s):
    "Backpropagate one sequence's summed loss (into `.grad`, and into tensors a forward hook retained), grads zeroed first."
    model.zero_grad()
    logits = model(input_ids=s['input_ids'][None]).logits[0]
    torch.nn.functional.cross_entropy(logits[:-1], s['labels'][1:], ignore_index=-100, reduction='sum').backward()


def autograd_grads(model, params, seqs):
    "Per-sequence gradients of the summed loss over the leaf tensors `params`, by plain autograd (the brute force): `[n, P]`."
    out = []
    for s in seqs:
        loss_backward(model, s)
        out.append(torch.cat([p.grad.reshape(-1) for p in params]))
    model.zero_grad()
    return torch.stack(out)


def check_per_expert_ekfac(f, per_layer, tr, qs):
    """EK-FAC factors `f` and per-layer scores of its expert layers against a reference from routed pieces: `tr`, `qs` hold,
    per training / query sequence, `{expert layer: (inputs [rows, d_in], output gradients [rows, d_out])}` of the tokens
    routed to it. A is per routed token, S per sequence, Λ from the rotated per-sequence gradients, damping 0.1 × mean Λ."""
    names = [n for n in f.modules if n.endswith(']')]
    assert set(names) == set(tr[0])                                    # every expert layer the reference routed, no other
    for n in names:
        A = sum(p[n][0].T @ p[n][0] for p in tr) / max(sum(len(p[n][0]) for p in tr), 1)
        S = sum(p[n][1].T @ p[n][1] for p in tr) / len(tr)
        for k, ref in (('A', A), ('S', S)):
            assert torch.allclose(f.tensors[n][k], ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()) + 1e-300), (n, k)
        QA, QS = torch.linalg.eigh(A).eigenvectors, torch.linalg.eigh(S).eigenvectors
        G = [p[n][1].T @ p[n][0] for p in tr]                          # DW_n = Σ_routed ds aᵀ
        lam = sum((QS.T @ g @ QA) ** 2 for g in G) / len(tr)
        denom = lam + 0.1 * lam.mean()
        want = torch.tensor([[float((QS @ ((QS.T @ (p[n][1].T @ p[n][0]) @ QA) / denom) @ QA.T * g).sum()) for g in G] for p in qs],
                            dtype=torch.float64)
        assert float((per_layer[n] - want).abs().max()) <= 1e-4 * float(want.abs().max()) + 1e-12, n


def pearson(a, b):
    "Pearson correlation of two tensors of any shape (flattened), in float64."
    return float(torch.corrcoef(torch.stack([a.double().flatten(), b.double().flatten()]))[0, 1])


def cli_run(*argv):
    "`influence-nb` through `cli.main` (what the console script calls): (exit code, stdout, stderr)."
    import contextlib, io
    from influence_nb.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def model_folder(d, **kw):
    "A random tiny GPT-2 with the project tokenizer saved as `d/'model'` (what the command-line tests load); returns it."
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(inf.data_dir()/'tokenizer')
    inf.tiny_model('gpt2', vocab=len(tok), **kw).save_pretrained(d/'model')
    tok.save_pretrained(d/'model')
    return d/'model'


def tiny_gemma3n(vocab=VOCAB, seed=0):
    "A float32 Gemma 3n text model (two blocks, AltUp with two inputs, a LAuReL of rank 4), random init."
    from transformers import Gemma3nTextConfig, AutoModelForCausalLM
    cfg = Gemma3nTextConfig(vocab_size=vocab, vocab_size_per_layer_input=vocab, hidden_size=32, hidden_size_per_layer_input=8,
                            intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            layer_types=['sliding_attention', 'full_attention'], sliding_window=16, num_kv_shared_layers=0,
                            activation_sparsity_pattern=[0.0, 0.0], laurel_rank=4, altup_num_inputs=2)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def tracked_params(layers):
    "The parameter names behind tracked layers, each once (an expert slice stands for its whole 3-D weight)."
    out = []
    for layer in layers:
        for n, _ in layer.params():
            n = n.rsplit('[', 1)[0] if n.endswith(']') else n
            if n not in out: out.append(n)
    return out
