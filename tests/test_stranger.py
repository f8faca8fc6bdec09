"""Findings of the session-6 STRANGER review: the product used as a newcomer would, on models, tokenizers and corpora
the project did not make. Each test reproduces one finding on a tiny random model and fails until it is fixed; the
finding's number (S1–S11: S for stranger, not the F rows of the reliability table) is in the test's name and comment.
Every test asserts a property a user can rely on, not a value.
"""
import pytest, torch
import influence_nb as inf
from transformers import GPT2Config, GPT2LMHeadModel, MixtralConfig, MixtralForCausalLM

VOCAB = 40


def _seqs(n, lo=6, hi=14, seed=0):
    "`n` random training sequences of lengths in [lo, hi), ids in [3, VOCAB)."
    g = torch.Generator().manual_seed(seed)
    return inf.as_sequences([torch.randint(3, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g)
                             for _ in range(n)])


def _query(seed=7, prompt=5, completion=4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (prompt + completion,), generator=g)
    return inf.as_sequences([{'input_ids': ids, 'labels': torch.cat([torch.full((prompt,), -100), ids[prompt:]])}])


def _sparse_moe(experts=16):
    "A one-block Mixtral with top-1 routing over many experts: a short fit set leaves some experts without a token."
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_local_experts=experts,
                        num_experts_per_tok=1, router_jitter_noise=0., num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return MixtralForCausalLM(cfg).eval()


# Finding S1 (high): an MoE expert that no fit token was routed to has all-zero curvature; the default damping
# (0.1 × mean Λ = 0) is then replaced by 1e-12, so that expert's layer is preconditioned by 1/1e-12 and carries
# essentially all of the influence of any query and training sequence routed through it (measured: > 99.9 % of
# |scores|, per-layer values ~1e10 against ~1e4 for fitted layers). Expected: a ValueError naming the layer
# (fit on more data, pass `damping`, or leave the expert out), or a finite fallback that does not let a layer the
# fit knows nothing about dominate the scores.
def test_s1_unfitted_moe_expert_does_not_dominate_scores(one_thread):
    m = _sparse_moe()
    fit = _seqs(1, lo=5, hi=6)                                   # 5 tokens, 16 experts, top-1: most get none
    f = inf.fit_factors(m, fit, progress=False)
    empty = [n for n in f.modules if float(f.tensors[n]['Lambda'].abs().max()) == 0]
    fitted = [n for n in f.modules if n not in empty]
    assert empty and fitted                                      # the situation the finding is about
    train, q = _seqs(24, seed=1), _query()
    try:
        s = inf.pairwise_scores(m, f, q, train, per_layer=True, progress=False)
    except ValueError as e:                                       # a clear refusal is an acceptable fix
        assert any(n in str(e) for n in empty) and 'damping' in str(e), str(e)
        return
    worst_empty = max(float(s.per_layer[n].abs().max()) for n in empty)
    worst_fitted = max(float(s.per_layer[n].abs().max()) for n in fitted)
    assert worst_empty <= 100 * worst_fitted, (worst_empty, worst_fitted)
    ss = inf.self_scores(m, f, train, progress=False)
    assert torch.isfinite(ss).all()


# Finding S2 (medium): `per_token` of a padded training sequence is indexed after the padding is dropped, so
# `per_token[q, n, t]` is not the term of `train[n]['input_ids'][t]`: with left padding every value is shifted by the
# pad count, and the tensor is narrower than the sequences the user passed (token heatmaps drawn from the user's
# ids are misaligned or refused). Expected: per-token scores in the coordinates of the sequence as given (zeros on
# padding), as the total is (padding already leaves `total` unchanged).
def test_s2_per_token_scores_align_with_padded_input(one_thread):
    m = inf.tiny_model('llama', vocab=VOCAB)
    train, q = _seqs(6, seed=2), _query()
    f = inf.fit_factors(m, train, progress=False)
    plain = inf.pairwise_scores(m, f, q, train, per_token=True, progress=False)
    pad = 3
    padded = [{'input_ids': torch.cat([torch.zeros(pad, dtype=torch.long), s['input_ids']]),
               'attention_mask': torch.cat([torch.zeros(pad, dtype=torch.long), torch.ones(len(s['input_ids']), dtype=torch.long)])}
              for s in train]
    left = inf.pairwise_scores(m, f, q, padded, per_token=True, progress=False)
    torch.testing.assert_close(left.total, plain.total)                  # holds today
    assert left.per_token.shape[-1] >= max(len(s['input_ids']) for s in padded), left.per_token.shape
    for n, s in enumerate(train):
        L = len(s['input_ids'])
        assert float(left.per_token[0, n, :pad].abs().max()) == 0.           # nothing on the padding
        torch.testing.assert_close(left.per_token[0, n, pad:pad + L], plain.per_token[0, n, :L])


# Finding S3 (low): `completion_logprobs` (public; the CLI, the explorer and `lds` print or use it) runs the model
# in whatever mode it is in. A model built from a config (`GPT2LMHeadModel(GPT2Config(...))`) starts in training
# mode with dropout 0.1, so the log p it reports changes from call to call (measured -68.67 vs -68.46 nats), while
# `fit_factors` and `pairwise_scores` on the same model are deterministic. Expected: evaluated in eval mode (and
# the model's mode restored), as the scoring functions do.
def test_s3_completion_logprobs_ignores_dropout(one_thread):
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                                   bos_token_id=0, eos_token_id=0))
    assert m.training and m.config.resid_pdrop > 0                       # how transformers builds it
    q = _query()
    a, b = inf.completion_logprobs(m, q), inf.completion_logprobs(m, q)
    m.eval(); ref = inf.completion_logprobs(m, q); m.train()
    torch.testing.assert_close(a, ref)
    torch.testing.assert_close(b, ref)
    assert m.training                                                     # the caller's mode is left as it was


def _bf16_llama():
    return inf.tiny_model('llama', vocab=VOCAB, hidden=16).to(torch.bfloat16)


# Finding S4 (high): `scan` keeps its top-k scores in the model's dtype. On a bfloat16 model (what
# `from_pretrained` gives for most hub checkpoints, and what the CLI loads from a bf16 folder) the scan's scores are
# rounded to bfloat16 (3 significant digits: 4648.38 → 4640.0), so its top-k order differs from `pairwise_scores`
# on the same inputs, which returns float32 as the conventions say (99_api) (measured: top-20 overlap 19/20, order changed, rel. error
# 5e-3). Expected: scan scores in float32 (float64 for a float64 model), equal to `pairwise_scores`' top-k.
def test_s4_scan_of_bf16_model_matches_pairwise_in_float32(one_thread):
    m, train, q = _bf16_llama(), _seqs(30, seed=3), _query()
    f = inf.fit_factors(m, train, progress=False)
    s = inf.pairwise_scores(m, f, q, train, progress=False).total
    assert s.dtype == torch.float32                                       # holds today
    r = inf.scan(m, f, q, train, k=10, progress=False)
    assert r.scores.dtype == torch.float32, r.scores.dtype
    vals, idx = s.topk(10, dim=1)
    assert torch.equal(r.indices, idx)
    torch.testing.assert_close(r.scores, vals, rtol=1e-5, atol=0)


# Finding S5 (medium): `scan(..., scores_path=...)` on a bfloat16 model crashes after the first chunk with
# `TypeError: Got unsupported ScalarType BFloat16` (numpy has no bfloat16); the CLI reports it as a bad-input error
# (exit 2, "influence-nb scan: error: Got unsupported ScalarType BFloat16") and writes no result. Expected: the
# scores written (as float32) and equal to `pairwise_scores`.
def test_s5_scan_scores_path_of_bf16_model(one_thread, tmp_path):
    m, train, q = _bf16_llama(), _seqs(12, seed=4), _query()
    f = inf.fit_factors(m, train, progress=False)
    inf.scan(m, f, q, train, k=3, scores_path=tmp_path / 'scores', progress=False)
    table = inf.read_scores(tmp_path / 'scores').sort_index()
    s = inf.pairwise_scores(m, f, q, train, progress=False).total
    torch.testing.assert_close(torch.tensor(table['q0'].to_numpy()).float(), s[0], rtol=1e-5, atol=0)


def _wordlevel_tokenizer():
    "A word-level tokenizer trained here; like Qwen2's, it adds no BOS token."
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    words = ['the cat saw the dog', 'a dog saw the heron by the river', 'the heron slept']
    tk = Tokenizer(models.WordLevel(unk_token='[UNK]')); tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=['[PAD]', '[UNK]']))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token='[UNK]', pad_token='[PAD]')


# Finding S6 (low): `tokenize_pairs` with an empty prompt and a tokenizer that adds no BOS (Qwen2's, or one trained
# with `tokenizers`) labels every completion token, but the first one has nothing before it, so the model never
# predicts it: the query silently measures log p(completion[1:] | completion[0]) instead of log p(completion)
# (here 1 of 3 words is dropped). Expected: a ValueError naming the empty prompt (pass a prompt or a tokenizer that
# adds a BOS token), or every completion token measured.
def test_s6_empty_prompt_measures_the_whole_completion():
    tok = _wordlevel_tokenizer()
    completion = ' the dog slept'
    n_words = len(tok(completion, add_special_tokens=False)['input_ids'])
    try:
        q = inf.tokenize_pairs(tok, [('', completion)])
    except ValueError as e:
        assert 'prompt' in str(e), str(e)
        return
    assert inf.n_scored(q[0]) == n_words, (inf.n_scored(q[0]), n_words)


# Finding S7 (low): the share of influence per layer is defined twice and the two disagree when a query's summed
# influence is negative. `Scores.layer_shares()` divides by the negative total without a word (layers whose sums
# are -2 and -3 come out as 40 % and 60 %, as if they raised the completion; with mixed signs, shares such as
# -60 % and 160 %), while `viz.layer_shares` (behind `layer_bars`/`layer_heatmap`, and what the tour draws) returns
# NaN and warns. Expected: one definition (issue 18), the same numbers from both.
def test_s7_layer_shares_agree_between_scores_and_viz():
    import numpy as np, warnings
    from influence_nb.viz import layer_shares
    per_layer = {'l0': torch.tensor([[3., -5.], [1., 2.]]), 'l1': torch.tensor([[-4., 1.], [2., 1.]])}
    s = inf.Scores(per_layer['l0'] + per_layer['l1'], per_layer, n_train=10, modules=['l0', 'l1'])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        mine, drawn = s.layer_shares().to_numpy(), layer_shares(s).to_numpy()
    np.testing.assert_allclose(drawn[1], [1/2, 1/2])                   # a positive total: both agree today
    np.testing.assert_array_equal(mine, drawn)


# Finding S8 (low): on the command line, a bad corpus line stops `scan` with advice only Python can follow:
# "Fix or remove it, or pass on_bad_record='skip' ..."; the command's option is `--skip-bad-records`.
# Expected: the message names the option the user can type (exit code 2, as today).
def test_s8_cli_bad_record_message_names_the_cli_option(tmp_path, capsys, one_thread):
    import json
    from influence_nb.cli import main
    tok = _wordlevel_tokenizer()
    model = inf.tiny_model('llama', vocab=len(tok))
    model.save_pretrained(tmp_path / 'm'); tok.save_pretrained(tmp_path / 'm')
    good = ['the cat saw the dog', 'the heron slept by the river', 'a dog saw the heron']
    (tmp_path / 'good.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in good))
    (tmp_path / 'bad.jsonl').write_text((tmp_path / 'good.jsonl').read_text() + '{"text": "the cat\n')
    (tmp_path / 'q.jsonl').write_text(json.dumps({'id': 'q', 'prompt': 'the cat', 'completion': ' saw the dog'}) + '\n')
    assert main(['fit-factors', '--model', tmp_path / 'm', '--data', tmp_path / 'good.jsonl', '--out', tmp_path / 'f']) == 0
    capsys.readouterr()
    rc = main(['scan', '--model', tmp_path / 'm', '--factors', tmp_path / 'f', '--queries', tmp_path / 'q.jsonl',
               '--corpus', tmp_path / 'bad.jsonl', '--out', tmp_path / 'r.parquet', '--quiet'])
    err = capsys.readouterr().err
    assert rc == 2 and 'line 4' in err, err
    assert '--skip-bad-records' in err and "on_bad_record='skip'" not in err, err


# Finding S9 (low): `modules=['lm_head']` is refused as "'lm_head': 'not a Linear/Conv1D layer'", but the LM head of
# a Llama or GPT-2 *is* an `nn.Linear`; it is left out on purpose (modules="all": every Linear/Conv1D except the LM head).
# The reason given sends the user looking for a layer-type problem. Expected: the message says the LM head is
# not tracked (and why), as it does for unknown names ('no such module').
def test_s9_lm_head_refusal_gives_the_real_reason():
    m = inf.tiny_model('llama', vocab=VOCAB)
    assert isinstance(m.lm_head, torch.nn.Linear)
    with pytest.raises(ValueError) as e: inf.find_modules(m, ['lm_head'])
    assert 'not a Linear/Conv1D' not in str(e.value) and 'head' in str(e.value).replace("'lm_head'", ''), str(e.value)


# Finding S10 (low): `(prompt, completion)` string pairs passed straight to `pairwise_scores` (a natural first try,
# since `tokenize_pairs` takes exactly those) fail with "queries[0]['input_ids'] could not be converted to a tensor
# (too many dimensions 'str')", which neither says that text was given nor what to do; raw strings as `train` get a
# good message ("use `inf.tokenize(tokenizer, texts)`"). Expected: the same for pairs, naming `tokenize_pairs`.
def test_s10_text_pairs_as_queries_point_to_tokenize_pairs(one_thread):
    m, train = inf.tiny_model('llama', vocab=VOCAB), _seqs(3)
    f = inf.fit_factors(m, train, strategy='identity', progress=False)
    with pytest.raises((TypeError, ValueError), match='tokenize_pairs'):
        inf.pairwise_scores(m, f, [('The capital of France is', ' Paris')], train, progress=False)


# Finding S11 (medium): with a tokenizer whose post-processor appends EOS (`<s> $A </s>`: `add_eos_token=True`
# Llama tokenizers, many fine-tuned checkpoints), `tokenize_pairs` tokenizes the prompt with its special tokens and
# appends the completion after them, so the query reads "<s> the cat </s> saw the dog": the completion is measured
# after an end-of-document token, a context the training sequences ("<s> the cat saw the dog </s>") never have.
# Nothing warns. Expected: no EOS between prompt and completion (the query's ids are the training tokenization of
# prompt + completion without its trailing EOS), or a clear error.
def test_s11_query_has_no_eos_between_prompt_and_completion():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, processors
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.WordLevel(unk_token='[UNK]')); tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(['the cat saw the dog'], trainers.WordLevelTrainer(special_tokens=['[PAD]', '[UNK]', '<s>', '</s>']))
    tk.post_processor = processors.TemplateProcessing(single='<s> $A </s>', special_tokens=[('<s>', 2), ('</s>', 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token='[UNK]', pad_token='[PAD]', bos_token='<s>', eos_token='</s>')
    train = inf.tokenize(tok, ['the cat saw the dog'])[0]['input_ids']
    assert train[-1] == tok.eos_token_id                                  # the tokenizer does append EOS
    try:
        q = inf.tokenize_pairs(tok, [('the cat', ' saw the dog')])[0]
    except ValueError as e:
        assert 'eos' in str(e).lower(), str(e)
        return
    assert q['input_ids'].tolist() == train[:-1].tolist(), tok.convert_ids_to_tokens(q['input_ids'].tolist())
