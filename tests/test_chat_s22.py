"""Conversations scored with a tokenizer that gives no offsets (a Python `PreTrainedTokenizer` subclass, shipped as a folder
with its own code and loaded with `trust_remote_code`), through the paths a user takes: `tokenize` on conversation records,
`scan` on a JSONL of them, the command line's `score` with `--text-field messages`. The reference is the slow tokenizer's
fast twin (same vocabulary, same pieces, same chat template), whose offsets `assistant_spans` reads: the tokens, the labels
and the scores must be the same. Identity scores over the slow tokenizer's sequences equal autograd on a tiny float64 Llama."""
import importlib.util, json, re
from contextlib import contextmanager
import pandas as pd
import pytest, torch
import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
import influence_nb as inf
import randdata
from influence_nb.data import IGNORE_INDEX, assistant_spans, chat_query

transformers.logging.set_verbosity_error()
CODE = r'''"Pieces (a word with the space before it, runs of whitespace or punctuation) looked up in vocab.json: no offsets."
import json, re
from transformers import PreTrainedTokenizer
PIECES = r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s*[\r\n]+|\s+(?!\S)|\s+"

class PieceTokenizer(PreTrainedTokenizer):
    vocab_files_names = {'vocab_file': 'vocab.json'}
    model_input_names = ['input_ids', 'attention_mask']
    def __init__(self, vocab_file, **kw):
        with open(vocab_file) as f: self.vocab = json.load(f)
        self.pieces = {i: t for t, i in self.vocab.items()}
        super().__init__(**kw)
    @property
    def vocab_size(self): return len(self.vocab)
    def get_vocab(self): return dict(self.vocab)
    def _tokenize(self, text, **kw): return re.findall(PIECES, text)
    def _convert_token_to_id(self, t): return self.vocab.get(t, self.vocab['<unk>'])
    def _convert_id_to_token(self, i): return self.pieces[i]
    def convert_tokens_to_string(self, ts): return ''.join(ts)
    def save_vocabulary(self, d, filename_prefix=None):
        import os; p = os.path.join(d, (filename_prefix + '-' if filename_prefix else '') + 'vocab.json')
        with open(p, 'w') as f: json.dump(self.vocab, f)
        return (p,)
'''
PIECES = r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s*[\r\n]+|\s+(?!\S)|\s+"
SPECIALS = ['<unk>', '<|bos|>', '<|pad|>', '<|system|>', '<|user|>', '<|assistant|>', '<|end|>', '<think>', '</think>']
KW = dict(bos_token='<|bos|>', eos_token='<|end|>', unk_token='<unk>', pad_token='<|pad|>',
          extra_special_tokens=['<|system|>', '<|user|>', '<|assistant|>', '<think>', '</think>'])
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{% if m['reasoning_content'] is defined and "
            "m['reasoning_content'] %}<think>\n{{ m['reasoning_content'] }}\n</think>\n\n{% endif %}{{ m['content'] }}<|end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
U = lambda c: {'role': 'user', 'content': c}
A = lambda c, **kw: {'role': 'assistant', 'content': c, **kw}
CONVS = [[{'role': 'system', 'content': 'answer briefly'}, U('what is the capital of france?'), A('paris'), U('and of italy?'), A('rome')],
         [U('what is the capital of peru?'), A('lima\n'), U('and of spain?'), A('madrid  ')],
         [U('say nothing'), A(''), U('what is the capital of japan?'), A('tokyo', reasoning_content='japan, so tokyo')],
         [U('what is the capital of egypt?'), A('<think>\nhmm, egypt\n</think>\n\ncairo')]]
QUERY = [U('what is the capital of france?'), A('paris')]
COLON = "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}\n{% endfor %}"   # no space after 'assistant:'
COLON_CONV = [U('say it'), A('(paris)')]
SPACED = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"  # ' paris': the reply's first token takes the space

def render(tok, conv): return tok.apply_chat_template(conv, tokenize=False)

@pytest.fixture(scope='module')
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp('chat_s22')
    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({'<unk>': 0}, unk_token='<unk>')), **KW)
    bare.chat_template = TEMPLATE                                          # renders the texts the vocabulary is made of
    split = '|'.join(map(re.escape, SPECIALS))
    texts = [render(bare, c) for c in CONVS + [QUERY]] + [bare.apply_chat_template(COLON_CONV, chat_template=COLON, tokenize=False)]
    texts += [bare.apply_chat_template(c, chat_template=SPACED, tokenize=False) for c in CONVS]
    words = sorted({p for t in texts for part in re.split(split, t) for p in re.findall(PIECES, part)})
    vocab = {t: i for i, t in enumerate(SPECIALS + words)}
    wl = Tokenizer(models.WordLevel(vocab, unk_token='<unk>')); wl.decoder = decoders.Fuse()
    wl.pre_tokenizer = pre_tokenizers.Split(Regex(PIECES), behavior='isolated')
    wl.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    fast = PreTrainedTokenizerFast(tokenizer_object=wl, **KW); fast.chat_template = TEMPLATE
    fast.save_pretrained(d/'fast')
    (d/'slow').mkdir(); (d/'slow'/'piece_tokenizer.py').write_text(CODE); (d/'slow'/'vocab.json').write_text(json.dumps(vocab))
    spec = importlib.util.spec_from_file_location('piece_tokenizer', d/'slow'/'piece_tokenizer.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    made = mod.PieceTokenizer(str(d/'slow'/'vocab.json'), **KW); made.chat_template = TEMPLATE; made.save_pretrained(d/'slow')
    cfg = json.loads((d/'slow'/'tokenizer_config.json').read_text())
    cfg['auto_map'] = {'AutoTokenizer': ['piece_tokenizer.PieceTokenizer', None]}   # a folder with its own tokenizer code
    (d/'slow'/'tokenizer_config.json').write_text(json.dumps(cfg))
    slow = inf.load_tokenizer(d/'slow', trust_remote_code=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                         bos_token_id=vocab['<|bos|>'], eos_token_id=vocab['<|end|>'],
                                         pad_token_id=vocab['<|pad|>'])).double()
    model.save_pretrained(d/'model')
    (d/'train.jsonl').write_text(''.join(json.dumps({'id': f'c{i}', 'messages': m}) + '\n' for i, m in enumerate(CONVS)))
    (d/'q.jsonl').write_text(json.dumps({'id': 'q1', 'messages': QUERY}) + '\n')
    return dict(dir=d, slow=slow, fast=fast, model=model.eval())

def labels_of(seqs): return [(s['input_ids'].tolist(), s['labels'].tolist()) for s in seqs]

def test_the_slow_tokenizer_gives_no_offsets_and_the_twins_tokens(case):
    slow, fast = case['slow'], case['fast']
    assert type(slow).__name__ == 'PieceTokenizer' and not slow.is_fast
    assert 'offset_mapping' not in slow('paris', return_offsets_mapping=True)         # ignored, silently: no offsets to read
    for c in CONVS: assert render(slow, c) == render(fast, c) and slow(render(slow, c))['input_ids'] == fast(render(fast, c))['input_ids']

def test_tokenize_on_conversation_records_gives_the_fast_twins_labels(case):
    slow, fast = case['slow'], case['fast']
    records = [{'id': i, 'messages': c} for i, c in enumerate(CONVS)]
    got, ref = inf.tokenize(slow, records, text_field='messages'), inf.tokenize(fast, records, text_field='messages')
    assert labels_of(got) == labels_of(ref) and labels_of(inf.as_sequences(got)) == labels_of(ref)
    scored = [fast.decode(s['input_ids'][s['labels'] != IGNORE_INDEX]) for s in got]
    assert scored == ['paris<|end|>rome<|end|>', 'lima\n<|end|>madrid  <|end|>', '<think>\njapan, so tokyo\n</think>\n\ntokyo<|end|>',
                      '<think>\nhmm, egypt\n</think>\n\ncairo<|end|>']
    for c in CONVS: assert assistant_spans(slow, c) == assistant_spans(fast, c)
    pairs = [{'prompt': c[:-1], 'completion': c[-1:]} for c in CONVS]                   # prompt-completion conversations
    assert labels_of(inf.tokenize(slow, pairs)) == labels_of(inf.tokenize(fast, pairs))
    a, b = chat_query(slow, QUERY), chat_query(fast, QUERY)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

def api_identity(case, tok):
    m, train = case['model'], inf.tokenize(tok, CONVS)
    f = inf.fit_factors(m, train, 'identity', batch_size=8, progress=False)
    return f, train, inf.as_sequences([chat_query(tok, QUERY)])

def test_identity_scores_of_a_slow_tokenizers_conversation_equal_autograd(case):
    m = case['model']
    f, train, q = api_identity(case, case['slow'])
    ps = [p for n, p in m.named_parameters() if n in randdata.param_names(m, 'mlp')]
    for p in ps: p.requires_grad_(True)
    got = inf.pairwise_scores(m, f, q, train[:1], progress=False).total[0]
    ref = (randdata.autograd_grads(m, ps, q) @ randdata.autograd_grads(m, ps, train[:1]).T)[0]
    assert ref.abs().min() > 0 and torch.allclose(got, ref, rtol=1e-10, atol=0)

def test_scan_and_the_command_line_score_a_jsonl_of_conversations_as_the_fast_twin(case):
    d, m = case['dir'], case['model']
    f, train, q = api_identity(case, case['fast'])
    ref = inf.pairwise_scores(m, f, q, train, progress=False).total[0]
    f.save(d/'f')
    r = inf.scan(m, f, inf.as_sequences([chat_query(case['slow'], QUERY)]), d/'train.jsonl', k=len(CONVS), tokenizer=case['slow'],
                 text_field='messages', progress=False)
    assert torch.allclose(r.scores[0], ref[r.indices[0]], rtol=1e-12, atol=0)
    out = {}
    for name in ('slow', 'fast'):
        rc, _, err = randdata.cli_run('score', '--model', d/'model', '--tokenizer', d/name, '--trust-remote-code', '--factors', d/'f',
                                      '--queries', d/'q.jsonl', '--data', d/'train.jsonl', '--text-field', 'messages',
                                      '--out', d/f'{name}.parquet')
        assert rc == 0, err
        out[name] = torch.tensor(pd.read_parquet(d/f'{name}.parquet')['q1'].to_numpy())
    assert torch.equal(out['slow'], out['fast']) and torch.allclose(out['slow'], ref, rtol=1e-12, atol=0)

@contextmanager
def templated(case, template):
    "Both tokenizers with `template`, for the block."
    try:
        case['slow'].chat_template = case['fast'].chat_template = template
        yield case['slow'], case['fast']
    finally: case['slow'].chat_template = case['fast'].chat_template = TEMPLATE

def test_a_first_token_holding_the_space_before_the_reply_is_the_replys_as_the_offsets_have_it(case):
    with templated(case, SPACED) as (slow, fast):
        got, ref = inf.tokenize(slow, CONVS), inf.tokenize(fast, CONVS)
        assert labels_of(got) == labels_of(ref)
        assert fast.decode(got[0]['input_ids'][got[0]['labels'] != IGNORE_INDEX]) == ' paris rome'

def test_a_reply_whose_first_token_holds_template_text_is_refused_by_name(case):
    with templated(case, COLON) as (slow, fast):
        assert fast.decode([t for t in inf.tokenize(fast, [COLON_CONV])[0]['labels'] if t != IGNORE_INDEX]) == ':(paris)'   # the colon too
        with pytest.raises(ValueError, match=r"texts\[0\]: the assistant reply at position 1 \(0-based\), '\(paris\)': a token of "
                                             r"the rendered text spans where the reply starts"):
            inf.tokenize(slow, [COLON_CONV])
