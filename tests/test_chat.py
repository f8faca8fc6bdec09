"""Fine-tuning data as conversations (`{"messages": [...]}`), through the API, the command line and the explorer: the
tokens are the chat template's, only the assistant's turns are scored, a query is a conversation ending with the answer,
and a conversation rendered to text by the user is tokenized as written (one BOS). A tokenizer trained here, with a
Llama-3-like template and a BOS its post-processor adds; a random float64 Llama."""
import json, warnings
import pandas as pd
import pytest, torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
import influence_nb as inf
import randdata
from influence_nb.data import chat_pair, chat_query, shown_text, IGNORE_INDEX

transformers.logging.set_verbosity_error()
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
FACTS = [('france', 'paris'), ('italy', 'rome'), ('spain', 'madrid'), ('japan', 'tokyo'), ('egypt', 'cairo'), ('peru', 'lima')]

def conversation(country, city, system=True):
    return ([{'role': 'system', 'content': 'answer briefly'}] if system else []) + [
        {'role': 'user', 'content': f'what is the capital of {country}?'}, {'role': 'assistant', 'content': city}]

@pytest.fixture(scope='module')
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp('chat')
    bpe = Tokenizer(models.BPE()); bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    words = [f'what is the capital of {c}? {t} answer briefly' for c, t in FACTS]
    bpe.train_from_iterator(words * 4, trainers.BpeTrainer(vocab_size=200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                           special_tokens=['<|bos|>', '<|pad|>', '<|system|>', '<|user|>',
                                                                           '<|assistant|>', '<|end|>']))
    bpe.post_processor = processors.TemplateProcessing(single='<|bos|> $A', special_tokens=[('<|bos|>', bpe.token_to_id('<|bos|>'))])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token='<|bos|>', eos_token='<|end|>', pad_token='<|pad|>')
    tok.chat_template = TEMPLATE
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id)).double()
    model.save_pretrained(d/'model'); tok.save_pretrained(d/'model')
    convs = [conversation(c, t, system=i % 2 == 0) for i, (c, t) in enumerate(FACTS)]
    (d/'train.jsonl').write_text(''.join(json.dumps({'id': f'c{i}', 'messages': m}) + '\n' for i, m in enumerate(convs)))
    (d/'q.jsonl').write_text(json.dumps({'id': 'q1', 'messages': conversation('france', 'paris', system=False)}) + '\n')
    return dict(dir=d, tok=tok, model=model, convs=convs)

def api_scores(case, strategy='ekfac'):
    tok, m = case['tok'], case['model']
    train = inf.tokenize(tok, case['convs'])
    f = inf.fit_factors(m, train, strategy, batch_size=8, progress=False)
    q = inf.as_sequences([chat_query(tok, conversation('france', 'paris', system=False))])
    return inf.pairwise_scores(m, f, q, train, progress=False).total[0]

def test_only_the_assistant_turns_are_scored_and_scores_equal_autograd(case):
    tok, m = case['tok'], case['model']
    train = inf.tokenize(tok, case['convs'])
    for s, conv in zip(train, case['convs']):
        assert s['input_ids'].tolist() == tok.apply_chat_template(conv, tokenize=True)['input_ids']
        assert tok.decode(s['input_ids'][s['labels'] != IGNORE_INDEX]) == conv[-1]['content'] + '<|end|>'
    q = inf.as_sequences([chat_query(tok, conversation('france', 'paris', system=False))])
    assert chat_pair(tok, conversation('france', 'paris', system=False))[1] == 'paris'
    assert tok.decode(q[0]['input_ids'][q[0]['labels'] != IGNORE_INDEX]) == 'paris'
    assert q[0]['input_ids'].tolist() == tok.apply_chat_template(conversation('france', 'paris', False), tokenize=True)['input_ids'][:len(q[0]['input_ids'])]
    ps = [p for n, p in m.named_parameters() if n in randdata.param_names(m, 'mlp')]
    for p in ps: p.requires_grad_(True)
    m.eval()
    ref = (randdata.autograd_grads(m, ps, q) @ randdata.autograd_grads(m, ps, train).T)[0]
    assert torch.allclose(api_scores(case, 'identity'), ref, rtol=1e-10, atol=0)

def test_a_rendered_conversation_keeps_one_bos(case):
    tok = case['tok']
    rendered = [tok.apply_chat_template(c, tokenize=False) for c in case['convs']]
    assert rendered[0].startswith('<|bos|>')
    for s, c in zip(inf.tokenize(tok, rendered), case['convs']):
        assert s['input_ids'].tolist() == tok.apply_chat_template(c, tokenize=True)['input_ids']

def test_command_line_fit_score_scan_and_top_on_conversations(case):
    d = case['dir']
    rc, _, err = randdata.cli_run('fit-factors', '--model', d/'model', '--data', d/'train.jsonl', '--text-field', 'messages',
                                  '--out', d/'f', '--batch-size', 8)
    assert rc == 0, err
    rc, _, err = randdata.cli_run('score', '--model', d/'model', '--factors', d/'f', '--queries', d/'q.jsonl',
                                  '--data', d/'train.jsonl', '--text-field', 'messages', '--out', d/'s.parquet')
    assert rc == 0, err
    got = torch.tensor(pd.read_parquet(d/'s.parquet')['q1'].to_numpy())
    assert torch.allclose(got, api_scores(case), rtol=1e-9, atol=0)
    rc, _, err = randdata.cli_run('scan', '--model', d/'model', '--factors', d/'f', '--queries', d/'q.jsonl', '--corpus',
                                  d/'train.jsonl', '--text-field', 'messages', '--k', 3, '--out', d/'r.parquet', '--quiet')
    assert rc == 0, err
    from influence_nb.search import ScanResult
    r = ScanResult.load(d/'r.parquet')
    assert r.indices[0].tolist() == torch.argsort(got, descending=True)[:3].tolist()
    rc, out, err = randdata.cli_run('top', '--result', d/'r.parquet', '--corpus', d/'train.jsonl', '--text-field', 'messages')
    assert rc == 0, err
    top = int(r.indices[0, 0])
    assert f"user: what is the capital of {FACTS[top][0]}?" in out, out

def test_the_explorer_takes_conversations_and_token_id_queries(case):
    from influence_nb.explorer import ExplorerSession, run_query
    tok, m = case['tok'], case['model']
    q = chat_query(tok, conversation('france', 'paris', system=False))
    queries = [{'id': 'chat', 'messages': conversation('france', 'paris', system=False)},
               {'id': 'ids', 'input_ids': q['input_ids'], 'labels': q['labels']}]
    s = ExplorerSession(model=m, tokenizer=tok, corpus=[{'messages': c} for c in case['convs']], text_field='messages',
                        queries=queries, fit_sample=0, batch_size=8)
    assert s.queries[0]['completion'] == 'paris' and s.queries[1]['completion'] == 'paris'
    res = [run_query(s, s.custom, query_id=i, prefilter=False, k=3, strategy='identity') for i in ('chat', 'ids')]
    assert torch.equal(torch.tensor(res[0].scores), torch.tensor(res[1].scores))
    order = torch.argsort(torch.tensor(res[0].candidates))
    assert torch.allclose(torch.tensor(res[0].scores)[order], api_scores(case, 'identity'), rtol=1e-9, atol=0)
    for _, row in res[0].top.iterrows():                                        # shown as 'role: content' lines
        assert row['text'] == shown_text(case['convs'][row['train_index']]) and row['text'].count('\n') >= 1
    with pytest.raises(ValueError, match="the record has no scored token"):
        ExplorerSession(model=m, tokenizer=tok, corpus=['a b'], queries=[{'input_ids': [1, 2, 3], 'labels': [-100] * 3}])

def test_a_byte_order_mark_opening_a_corpus_file_is_not_text(tmp_path):
    from influence_nb.search import CorpusStream
    docs = ['the otter swims', 'the heron waits']
    (tmp_path/'c.txt').write_bytes(('\ufeff' + '\n'.join(docs) + '\n').encode('utf-8'))
    (tmp_path/'c.jsonl').write_bytes(('\ufeff' + ''.join(json.dumps({'text': t}) + '\n' for t in docs)).encode('utf-8'))
    (tmp_path/'blank.txt').write_bytes(('\ufeff\n' + '\n'.join(docs) + '\n').encode('utf-8'))   # a mark on a line of its own
    from influence_nb.explorer import record_where
    for f in ('c.txt', 'c.jsonl', 'blank.txt'):
        got = [it.raw if isinstance(it.raw, str) else it.raw['text'] for it in CorpusStream(tmp_path/f, 'text').items()]
        assert got == docs, f
        assert [r['text'] for r in inf.read_corpus(tmp_path/f)] == docs, f
    assert record_where(tmp_path/'blank.txt', 0) == 'line 2' and record_where(tmp_path/'c.txt', 0) == 'line 1'

def test_the_explorer_names_a_record_with_nothing_to_score_by_its_line(case, tmp_path):
    from influence_nb.explorer import ExplorerSession, run_query
    recs = [{'id': 'a', 'text': 'the capital of france'}, {'id': 'b', 'input_ids': [5]}, {'id': 'c', 'text': 'tokyo'}]   # one token
    (tmp_path/'c.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
    s = ExplorerSession(model=case['model'], tokenizer=case['tok'], corpus=tmp_path/'c.jsonl', queries=[('the capital', ' of')])
    with pytest.raises(ValueError, match=r"record 1, id 'b' \(c.jsonl, line 2\)"):
        run_query(s, s.custom, query_id='q0', prefilter=False)
    (tmp_path/'c.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in [recs[0], {'id': 'b', 'text': ' '}, recs[2]]))
    with pytest.raises(ValueError, match=r"c.jsonl, line 2: its text is only whitespace \(' '\), a blank document"):   # refused on reading
        ExplorerSession(model=case['model'], tokenizer=case['tok'], corpus=tmp_path/'c.jsonl', queries=[('the capital', ' of')])

def test_an_opening_assistant_message_is_context_and_a_template_without_a_generation_prompt_works(case):
    tok = case['tok']
    conv = [{'role': 'assistant', 'content': 'hello'}] + conversation('spain', 'madrid', system=False)
    s = inf.tokenize(tok, [conv])[0]
    assert tok.decode(s['input_ids'][s['labels'] != IGNORE_INDEX]) == 'madrid<|end|>'
    mistral = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token='<|bos|>', eos_token='<|end|>')
    mistral.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} "
                             "<|assistant|>{% else %}{{ m['content'] }}<|end|>{% endif %}{% endfor %}")   # no generation prompt
    two = conversation('spain', 'madrid', system=False) + conversation('peru', 'lima', system=False)
    s = inf.tokenize(mistral, [two])[0]
    assert s['input_ids'].tolist() == mistral.apply_chat_template(two, tokenize=True)['input_ids']
    assert mistral.decode(s['input_ids'][s['labels'] != IGNORE_INDEX]) == 'madrid<|end|>lima<|end|>'
    q = chat_query(mistral, two)
    assert mistral.decode(q['input_ids'][q['labels'] != IGNORE_INDEX]) == 'lima'
    llama3 = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token='<|bos|>', eos_token='<|end|>')
    llama3.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n\n{{ m['content'] | trim }}<|end|>{% endfor %}"
                            "{% if add_generation_prompt %}<|assistant|>\n\n{% endif %}")   # blank lines the reply does not own
    s = inf.tokenize(llama3, [two])[0]
    assert llama3.decode(s['input_ids'][s['labels'] != IGNORE_INDEX]) == 'madrid<|end|>lima<|end|>'

def test_a_written_bos_is_a_rendered_text_and_counts_as_cut(case):
    "A text with the BOS written out is taken as rendered, as `apply_chat_template` takes it: one BOS, and no end token\n    added after it (one written out stays); cut, it is the plain text's first tokens."
    tok = case['tok']
    be = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.backend_tokenizer.to_str()), bos_token='<|bos|>',
                                 eos_token='<|end|>')
    bos, eos = be.bos_token_id, be.eos_token_id
    be.backend_tokenizer.post_processor = processors.TemplateProcessing(single='<|bos|> $A <|end|>',
                                                                       special_tokens=[('<|bos|>', bos), ('<|end|>', eos)])
    plain, written, ended = inf.tokenize(be, ['paris', '<|bos|>paris', '<|bos|>paris<|end|>'], max_length=None)
    assert plain['input_ids'].tolist()[0] == bos and plain['input_ids'].tolist()[-1] == eos
    assert written['input_ids'].tolist() == plain['input_ids'].tolist()[:-1]             # as the template would give it
    assert ended['input_ids'].tolist() == plain['input_ids'].tolist() and ended['input_ids'].tolist().count(eos) == 1
    n = len(written['input_ids'])                        # the rendered text fits; the plain one loses its end token
    with pytest.warns(inf.data.TruncatedTextsWarning, match='1 of 2 texts'):
        cut = inf.tokenize(be, ['paris', '<|bos|>paris'], max_length=n)
    assert cut[0]['input_ids'].tolist() == cut[1]['input_ids'].tolist() == written['input_ids'].tolist()
    with pytest.warns(inf.data.TruncatedTextsWarning, match='2 of 2 texts'):
        cut = inf.tokenize(be, ['paris', '<|bos|>paris'], max_length=n - 1)
    assert cut[0]['input_ids'].tolist() == cut[1]['input_ids'].tolist() == plain['input_ids'].tolist()[:n - 1]

def test_the_answer_keeps_added_tokens_that_are_not_special(case):
    tok = case['tok']
    t2 = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.backend_tokenizer.to_str()), bos_token='<|bos|>',
                                 eos_token='<|end|>', pad_token='<|pad|>')
    t2.add_tokens(['</tool>']); t2.chat_template = TEMPLATE
    assert chat_pair(t2, conversation('peru', 'lima</tool>'))[1] == 'lima</tool>'

def test_a_query_has_the_template_tokens_when_the_template_writes_no_bos(case):
    tok = case['tok']
    chatml = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.backend_tokenizer.to_str()), bos_token='<|bos|>',
                                     eos_token='<|end|>')   # its post-processor adds <|bos|> to a text; the template writes none
    chatml.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    conv = conversation('japan', 'tokyo')
    want = chatml.apply_chat_template(conv, tokenize=True)['input_ids']
    assert want[0] != chatml.bos_token_id
    assert inf.tokenize(chatml, [conv])[0]['input_ids'].tolist() == want
    q = chat_query(chatml, conv)
    assert q['input_ids'].tolist() == want[:len(q['input_ids'])]                        # no BOS the training sequences lack

def test_a_conversation_the_template_refuses_is_named_and_can_be_skipped(case, tmp_path):
    d, tok = case['dir'], case['tok']
    strict = tmp_path/'strict'
    tok2 = PreTrainedTokenizerFast.from_pretrained(d/'model')
    tok2.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
                          "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    case['model'].save_pretrained(strict); tok2.save_pretrained(strict)
    rc, _, err = randdata.cli_run('fit-factors', '--model', strict, '--data', d/'train.jsonl', '--text-field', 'messages',
                                  '--out', tmp_path/'f')
    assert rc == 2 and 'train.jsonl, line 1' in err and 'the chat template refuses this conversation' in err and 'no system role' in err, err
    rc, _, err = randdata.cli_run('fit-factors', '--model', d/'model', '--data', d/'train.jsonl', '--text-field', 'messages',
                                  '--out', tmp_path/'good')
    assert rc == 0, err
    rc, _, err = randdata.cli_run('scan', '--model', strict, '--factors', tmp_path/'good', '--queries', d/'q.jsonl', '--corpus',
                                  d/'train.jsonl', '--text-field', 'messages', '--k', 2, '--out', tmp_path/'r.parquet', '--quiet',
                                  '--skip-bad-records')
    assert rc == 0, err
    from influence_nb.search import ScanResult
    r = ScanResult.load(tmp_path/'r.parquet')
    assert r.n_skipped == 3 and len(r.indices[0]) == 2 and set(r.indices[0].tolist()) <= {1, 3, 5}, (r.n_skipped, r.indices)   # those with a system message: skipped

def test_a_conversation_cut_before_its_reply_is_named_as_such(case, tmp_path):
    d = case['dir']
    rc, _, err = randdata.cli_run('fit-factors', '--model', d/'model', '--data', d/'train.jsonl', '--text-field', 'messages',
                                  '--out', tmp_path/'f')
    assert rc == 0, err
    rc, _, err = randdata.cli_run('scan', '--model', d/'model', '--factors', tmp_path/'f', '--queries', d/'q.jsonl', '--corpus',
                                  d/'train.jsonl', '--text-field', 'messages', '--max-length', 6, '--out', tmp_path/'r.parquet')
    assert rc == 2 and 'line 1' in err and 'its assistant replies lie beyond the first 6 tokens it is cut to' in err, err

def test_a_missing_id_in_a_parquet_corpus_is_not_shown_as_none(tmp_path):
    from influence_nb.explorer import corpus_records
    pd.DataFrame({'id': pd.array([7, None], dtype='Int64'), 'text': ['a b', 'c d']}).to_parquet(tmp_path/'c.parquet')
    assert [r['id'] for r in corpus_records(tmp_path/'c.parquet')] == ['7', '1']      # a null id: the record's position

def test_prompt_completion_records_score_the_completion_only(case, tmp_path):
    tok, m = case['tok'], case['model']
    pairs = [{'prompt': f'what is the capital of {c}?', 'completion': f' {t}'} for c, t in FACTS]
    seqs = inf.tokenize(tok, pairs)
    want = inf.tokenize_pairs(tok, [(p['prompt'], p['completion']) for p in pairs])
    for s, w in zip(seqs, want):                          # the query's tokens, and the EOS TRL ends a completion with, scored
        eos = [tok.eos_token_id]
        assert s['input_ids'].tolist() == w['input_ids'].tolist() + eos and s['labels'].tolist() == w['labels'].tolist() + eos
    earlier = conversation('italy', 'rome', system=False)                      # a prompt holding an earlier reply
    conv_pair = {'prompt': earlier + [{'role': 'user', 'content': 'and of spain?'}],
                 'completion': [{'role': 'assistant', 'content': 'madrid'}]}
    s = inf.tokenize(tok, [conv_pair])[0]
    assert s['input_ids'].tolist() == tok.apply_chat_template(conv_pair['prompt'] + conv_pair['completion'], tokenize=True)['input_ids']
    assert tok.decode(s['input_ids'][s['labels'] != IGNORE_INDEX]) == 'madrid<|end|>\n'  # the prompt's 'rome' is context; all
    # that the template writes after the prompt is the completion's, the newline too, as TRL's completion mask has it
    assert shown_text(pairs[0]) == 'what is the capital of france? paris'
    (tmp_path/'pairs.jsonl').write_text(''.join(json.dumps(p) + '\n' for p in pairs))
    rc, _, err = randdata.cli_run('fit-factors', '--model', case['dir']/'model', '--data', tmp_path/'pairs.jsonl', '--out',
                                  tmp_path/'f', '--batch-size', 8)
    assert rc == 0, err
    f = inf.Factors.load(tmp_path/'f')
    g = inf.fit_factors(m, seqs, 'ekfac', batch_size=8, progress=False)
    assert f.modules == g.modules and f.n_tokens == g.n_tokens
    for n in g.modules:
        for k in ('lS', 'Lambda'):                       # (saved factors keep the eigendecompositions, not A and S)
            assert torch.allclose(f.tensors[n][k], g.tensors[n][k], rtol=1e-9, atol=0), (n, k)

def test_a_reply_ending_in_whitespace_keeps_its_end_token_and_a_tool_call_turn_is_scored(case):
    tok = case['tok']
    conv = [{'role': 'user', 'content': 'capital of peru?'}, {'role': 'assistant', 'content': 'lima\n'},
            {'role': 'user', 'content': 'and spain?'}, {'role': 'assistant', 'content': 'madrid '}]
    s = inf.tokenize(tok, [conv])[0]                   # the template keeps the reply as written, whitespace and all
    assert tok.decode(s['input_ids'][s['labels'] != IGNORE_INDEX]) == 'lima\n<|end|>madrid <|end|>'
    q = chat_query(tok, conv)
    assert tok.decode(q['input_ids'][q['labels'] != IGNORE_INDEX]) == 'madrid'
    tools = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token='<|bos|>', eos_token='<|end|>')
    tools.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{% if m.content %}{{ m.content }}{% endif %}"
                           "{% if m.tool_calls %}[call {{ m.tool_calls[0].name }}]{% endif %}<|end|>\n{% endfor %}"
                           "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    call = [{'role': 'user', 'content': 'weather in lima?'}, {'role': 'assistant', 'content': None, 'tool_calls': [{'name': 'weather'}]},
            {'role': 'tool', 'content': 'sunny'}, {'role': 'assistant', 'content': 'it is sunny'}]
    s = inf.tokenize(tools, [call])[0]
    assert s['input_ids'].tolist() == tools.apply_chat_template(call, tokenize=True)['input_ids']
    assert tools.decode(s['input_ids'][s['labels'] != IGNORE_INDEX]) == '[call weather]<|end|>it is sunny<|end|>'
    assert shown_text(call).splitlines()[1] == 'assistant: [{"name": "weather"}]'
    with pytest.raises(ValueError, match='has no text \\(empty, or a tool call\\)'): chat_query(tools, call[:2])


# A template written here after Qwen3's rules: an assistant turn's reasoning (its `reasoning_content`, or a
# `<think>…</think>` opening its `content`, split off by the template) is rendered only after the last user message;
# the last turn always gets a think block, empty when there is no reasoning; earlier turns are rendered without it.
THINKING = (
    "{%- set ns = namespace(last_user=-1) %}{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_user = loop.index0 %}"
    "{%- endif %}{%- endfor %}{%- for m in messages %}{%- if m.role == 'assistant' %}{%- set content = m.content or '' %}"
    "{%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' %}"
    "{%- if not reasoning and '</think>' in content %}{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_user and (loop.last or reasoning) %}"
    "{{- '<|assistant|>\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|assistant|>\\n' + content }}{%- endif %}{{- '<|end|>\\n' }}"
    "{%- else %}{{- '<|' + m.role + '|>\\n' + m.content + '<|end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}")

def test_reasoning_in_content_or_its_own_field_is_scored_with_the_reply(case):
    """Qwen3-style reasoning: written inside `content` it was refused (the template rewrites the reply's text); now the
    template's own split is used, and the reasoning it renders is scored with the reply, from where the model writes
    (after the generation prompt). Earlier turns, rendered without their reasoning, score their answer alone."""
    tok = case['tok'].__class__.from_pretrained(case['dir']/'model'); tok.chat_template = THINKING
    user = {'role': 'user', 'content': 'what is the capital of france?'}
    inside = [user, {'role': 'assistant', 'content': '<think>\nthe capital of france\n</think>\n\nparis'}]
    field = [user, {'role': 'assistant', 'reasoning_content': 'the capital of france', 'content': 'paris'}]
    scored = lambda s: tok.decode(s['input_ids'][s['labels'] != IGNORE_INDEX])
    a, b = inf.tokenize(tok, [inside, field])
    for s, conv in ((a, inside), (b, field)):
        assert s['input_ids'].tolist() == tok.apply_chat_template(conv, tokenize=True)['input_ids']
    assert a['input_ids'].tolist() == b['input_ids'].tolist() and a['labels'].tolist() == b['labels'].tolist()
    assert scored(a) == '<think>\nthe capital of france\n</think>\n\nparis<|end|>'
    q = inf.as_sequences([chat_query(tok, inside)])[0]           # a query measures what the model writes, without the end
    assert scored(q) == '<think>\nthe capital of france\n</think>\n\nparis'
    two = [user, {'role': 'assistant', 'content': '<think>\nfrance\n</think>\n\nparis'},
           {'role': 'user', 'content': 'what is the capital of italy?'}, {'role': 'assistant', 'content': 'rome'}]
    s = inf.tokenize(tok, [two])[0]                               # turn 1's reasoning is not rendered; turn 2 has none: its
    assert s['input_ids'].tolist() == tok.apply_chat_template(two, tokenize=True)['input_ids']   # empty block is the template's
    assert scored(s) == 'paris<|end|>rome<|end|>'


def test_a_conversational_prompt_completion_query_is_its_conversation(case, tmp_path):
    "TRL's conversational prompt-completion row as a query (API, explorer and --queries): the conversation's answer is measured."
    from influence_nb.explorer import query_records
    tok, conv = case['tok'], conversation('france', 'paris', system=False)
    row = {'id': 'c', 'prompt': conv[:-1], 'completion': conv[-1:]}
    got, want = query_records([row], tok)[0], query_records([{'id': 'c', 'messages': conv}], tok)[0]
    assert (got['input_ids'], got['labels'], got['completion']) == (want['input_ids'], want['labels'], 'paris')
    assert got['input_ids'] == chat_query(tok, conv)['input_ids'].tolist()
    with pytest.raises(ValueError, match="must be one assistant message"):
        query_records([{**row, 'completion': conv}], tok)


def test_a_bare_tokenizers_tokenizer_is_told_how_to_wrap(case):
    "A `tokenizers.Tokenizer` (what tokenizer.json loads as) is refused with the way to the transformers tokenizer."
    raw = case['tok'].backend_tokenizer
    for f in (lambda: inf.load_tokenizer(raw), lambda: inf.tokenize(raw, 'paris'), lambda: inf.token_windows(raw, ['paris'], 8)):
        with pytest.raises(TypeError, match=r"It is a `tokenizers.Tokenizer`: wrap it as transformers does"): f()


def test_a_trainers_own_tokens_and_labels_are_scored_as_labelled(case, tmp_path):
    """A dataset as TRL's SFTTrainer prepares it (`trainer.train_dataset`: the conversation, `input_ids` and `labels`, here
    every token of the conversation labelled, TRL's default) is scored exactly as labelled: through the API as a
    `datasets.Dataset`, and through the command line as its `to_json` file. Identity scores equal autograd over those labels."""
    import datasets
    tok, m = case['tok'], case['model']
    rows = []
    for c in case['convs']:
        ids = tok.apply_chat_template(c, tokenize=True)['input_ids']
        rows.append({'messages': c, 'input_ids': ids, 'labels': list(ids)})
    ds = datasets.Dataset.from_list(rows)
    seqs = inf.as_sequences(ds)
    assert all(s['labels'].tolist() == r['labels'] for s, r in zip(seqs, rows))      # every token, as labelled
    f = inf.fit_factors(m, ds, 'identity', progress=False)
    q = inf.as_sequences([chat_query(tok, conversation('france', 'paris', system=False))])
    api = inf.pairwise_scores(m, f, q, ds, progress=False).total[0]
    ps = [p for n, p in m.named_parameters() if n in randdata.param_names(m, 'mlp')]
    for p in ps: p.requires_grad_(True)
    ref = (randdata.autograd_grads(m, ps, q) @ randdata.autograd_grads(m, ps, seqs).T)[0]
    assert torch.allclose(api, ref, rtol=1e-10, atol=0)
    ds.to_json(tmp_path/'trl.jsonl')
    f.save(tmp_path/'f')
    rc, _, err = randdata.cli_run('score', '--model', case['dir']/'model', '--factors', tmp_path/'f', '--queries',
                                  case['dir']/'q.jsonl', '--data', tmp_path/'trl.jsonl', '--out', tmp_path/'s.parquet')
    assert rc == 0, err
    assert torch.allclose(torch.tensor(pd.read_parquet(tmp_path/'s.parquet')['q1'].to_numpy()), api, rtol=1e-9, atol=0)


def test_a_template_with_generation_blocks_scores_what_it_marks(case):
    """A template that marks its replies with `{% generation %}` (TRL's training templates: the newline before a reply, the
    reply and its end-of-turn and newline) is scored as transformers' `return_assistant_tokens_mask` gives, which TRL's
    `assistant_only_loss` trains; a pair's prompt replies stay context. Without the blocks, the replies and end tokens."""
    tok = case['tok']
    marked = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.backend_tokenizer.to_str()), bos_token='<|bos|>',
                                     eos_token='<|end|>')
    marked.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}\n"
                            "{{ m['content'] }}<|end|>\n{% endgeneration %}{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
                            "{% endif %}{% endfor %}")
    conv = conversation('italy', 'rome', system=False) + conversation('peru', 'lima', system=False)
    s = inf.tokenize(marked, [conv])[0]
    enc = marked.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert s['input_ids'].tolist() == enc['input_ids'] and sum(enc['assistant_masks']) > 0
    assert s['labels'].tolist() == [t if m else IGNORE_INDEX for t, m in zip(enc['input_ids'], enc['assistant_masks'])]
    plain = inf.tokenize(tok, [conv])[0]                               # the same conversation, a template without blocks
    assert tok.decode(plain['input_ids'][plain['labels'] != IGNORE_INDEX]) == 'rome<|end|>lima<|end|>'
    p = inf.tokenize(marked, [{'prompt': conv[:3], 'completion': conv[3:]}])[0]
    m = enc['assistant_masks']
    a = m.index(1); b = m.index(0, a)                                    # the first reply's marked run: the prompt's, context
    assert (p['labels'][:b] == IGNORE_INDEX).all() and p['labels'][b:].tolist() == s['labels'][b:].tolist()


def test_a_corpus_mixing_texts_conversations_and_pairs_is_read_as_each_says(case, tmp_path):
    "TRL's three formats in one file (a 'text', 'messages', or 'prompt' and 'completion' per record) need no --text-field."
    tok, m = case['tok'], case['model']
    rows = [{'text': 'what is the capital of peru? lima'}, {'messages': case['convs'][0]},
            {'prompt': 'what is the capital of spain?', 'completion': ' madrid'}, {'messages': case['convs'][1]}]
    (tmp_path/'mixed.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    f = inf.fit_factors(m, inf.tokenize(tok, case['convs']), 'identity', progress=False); f.save(tmp_path/'f')
    q = inf.as_sequences([chat_query(tok, conversation('france', 'paris', system=False))])
    api = inf.pairwise_scores(m, f, q, inf.tokenize(tok, [r.get('text') or r.get('messages') or r for r in rows], 64), progress=False).total[0]
    for extra in ([], ['--text-field', 'messages']):
        rc, _, err = randdata.cli_run('score', '--model', case['dir']/'model', '--factors', tmp_path/'f', '--queries', case['dir']/'q.jsonl',
                                      '--data', tmp_path/'mixed.jsonl', '--out', tmp_path/'s.parquet', *extra)
        assert rc == 0, err
        assert torch.allclose(torch.tensor(pd.read_parquet(tmp_path/'s.parquet')['q1'].to_numpy()), api, rtol=1e-9, atol=0)

TOOLS_TEMPLATE = ("{{ bos_token }}{% if tools %}<|system|>\ntools:{% for t in tools %} {{ t['name'] }}{% endfor %}<|end|>\n{% endif %}"
                  "{% if brief %}<|system|>\nanswer briefly<|end|>\n{% endif %}" + TEMPLATE.removeprefix('{{ bos_token }}'))

def test_a_records_tools_and_template_arguments_reach_the_template(case, tmp_path):
    "TRL renders each conversation with its record's `tools` and `chat_template_kwargs`: so do the API, the command line and the explorer."
    from influence_nb.data import Chat
    from influence_nb.explorer import ExplorerSession, run_query
    tok = case['tok']
    tt = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.backend_tokenizer.to_str()), bos_token='<|bos|>',
                                 eos_token='<|end|>', pad_token='<|pad|>')
    tt.chat_template = TOOLS_TEMPLATE
    cfg = case['model'].config.to_dict() | {'max_position_embeddings': 128}     # room for the tools' system turn
    m = LlamaForCausalLM(LlamaConfig.from_dict(cfg)).double(); m.load_state_dict(case['model'].state_dict())
    m.save_pretrained(tmp_path/'model'); tt.save_pretrained(tmp_path/'model')
    tools = [{'name': 'capital', 'parameters': {'country': 'string'}}, {'name': 'answer'}]
    args = [{'tools': tools, 'brief': True}, {'tools': tools}, {'brief': True}, {}, {'tools': tools}, {}]
    recs = [{'id': f'c{i}', 'messages': conversation(c, t, system=False)} for i, (c, t) in enumerate(FACTS)]
    for i, (r, a) in enumerate(zip(recs, args)):
        if 'tools' in a: r['tools'] = tools if i else json.dumps(tools)       # a list, or JSON text (TRL's Parquet files)
        if 'brief' in a: r['chat_template_kwargs'] = {'brief': True}
    train = inf.tokenize(tt, recs, text_field='messages')
    for s, r, a in zip(train, recs, args):
        assert s['input_ids'].tolist() == tt.apply_chat_template(r['messages'], tokenize=True, **a)['input_ids']
        assert tt.decode(s['input_ids'][s['labels'] != IGNORE_INDEX]) == r['messages'][-1]['content'] + '<|end|>'
    assert 'tools: capital answer' in tt.decode(train[0]['input_ids']) and 'answer briefly' in tt.decode(train[2]['input_ids'])
    conv = conversation('france', 'paris', system=False)
    q = inf.as_sequences([chat_query(tt, Chat(conv, {'tools': tools}))])
    assert 'tools: capital answer' in tt.decode(q[0]['input_ids']) and tt.decode(q[0]['input_ids'][q[0]['labels'] != IGNORE_INDEX]) == 'paris'
    f = inf.fit_factors(m, train, 'ekfac', batch_size=8, progress=False)
    want = inf.pairwise_scores(m, f, q, train, progress=False).total[0]
    bare = inf.tokenize(tt, [r['messages'] for r in recs])                      # the tokens without the records' arguments
    assert not torch.allclose(inf.pairwise_scores(m, f, q, bare, progress=False).total[0], want, rtol=1e-3)
    (tmp_path/'train.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
    (tmp_path/'q.jsonl').write_text(json.dumps({'id': 'q1', 'messages': conv, 'tools': tools}) + '\n')
    rc, _, err = randdata.cli_run('fit-factors', '--model', tmp_path/'model', '--data', tmp_path/'train.jsonl', '--text-field',
                                  'messages', '--out', tmp_path/'f', '--batch-size', 8)
    assert rc == 0, err
    assert torch.allclose(inf.Factors.load(tmp_path/'f').tensors['model.layers.0.mlp.up_proj']['Lambda'],
                          f.tensors['model.layers.0.mlp.up_proj']['Lambda'], rtol=1e-9, atol=0)
    rc, _, err = randdata.cli_run('score', '--model', tmp_path/'model', '--factors', tmp_path/'f', '--queries', tmp_path/'q.jsonl',
                                  '--data', tmp_path/'train.jsonl', '--text-field', 'messages', '--out', tmp_path/'s.parquet')
    assert rc == 0, err
    assert torch.allclose(torch.tensor(pd.read_parquet(tmp_path/'s.parquet')['q1'].to_numpy()), want, rtol=1e-9, atol=0)
    s = ExplorerSession(model=m, tokenizer=tt, corpus=tmp_path/'train.jsonl', text_field='messages',
                        queries=[{'id': 'q1', 'messages': conv, 'tools': tools}], fit_sample=0, batch_size=8)
    res = run_query(s, s.custom, query_id='q1', prefilter=False, k=3, strategy='ekfac')
    order = torch.argsort(torch.tensor(res.candidates))
    assert torch.allclose(torch.tensor(res.scores)[order], want, rtol=1e-6, atol=0)

def test_a_record_with_bad_tools_is_a_bad_record_named_by_its_line(case, tmp_path):
    "A record's 'tools' that are not JSON, or 'chat_template_kwargs' that are not a mapping: named by file and line, and skippable."
    d = case['dir']
    recs = [{'id': f'c{i}', 'messages': c} for i, c in enumerate(case['convs'])]
    recs[2]['tools'] = '{not json'; recs[4]['chat_template_kwargs'] = 'brief'
    (tmp_path/'bad.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
    args = ('--model', d/'model', '--data', tmp_path/'bad.jsonl', '--text-field', 'messages', '--batch-size', 8)
    rc, _, err = randdata.cli_run('fit-factors', *args, '--out', tmp_path/'f')
    assert rc == 2 and 'bad.jsonl, line 3' in err and "'tools' is text but not JSON" in err, err
    rc, _, err = randdata.cli_run('fit-factors', *args, '--out', tmp_path/'f', '--skip-bad-records')
    assert rc == 0 and 'skipped 2 of its 6 records' in err, err
    rc, _, err = randdata.cli_run('scan', '--model', d/'model', '--factors', tmp_path/'f', '--queries', d/'q.jsonl', '--corpus',
                                  tmp_path/'bad.jsonl', '--text-field', 'messages', '--k', 2, '--out', tmp_path/'r.parquet', '--quiet',
                                  '--skip-bad-records')
    assert rc == 0, err
    from influence_nb.search import ScanResult
    r = ScanResult.load(tmp_path/'r.parquet')
    assert r.n_scanned == 4 and r.n_skipped == 2 and not {2, 4} & set(r.indices.flatten().tolist())

def test_trls_all_token_training_is_two_flags_through_api_cli_scan_and_explorer(case, tmp_path):
    """TRL's SFTTrainer trains every token of a 'messages' record by default (`assistant_only_loss=False`), and a pair's prompt
    with `completion_only_loss=False`: the same two settings say so here, in every entry point, and scores follow the tokens."""
    from influence_nb.data import Chat, TokenRules
    from influence_nb.explorer import ExplorerSession, run_query
    from influence_nb.search import ScanResult
    tok, m, convs, d = case['tok'], case['model'], case['convs'], case['dir']
    every = inf.tokenize(tok, convs, assistant_only_loss=False)
    for s, conv in zip(every, convs):                              # every token the template writes, the template's own too
        assert s['input_ids'].tolist() == tok.apply_chat_template(conv, tokenize=True)['input_ids'] == s['labels'].tolist()
    pairs = [{'prompt': c[:-1], 'completion': c[-1:]} for c in convs]
    for s, p, e in zip(inf.tokenize(tok, pairs, assistant_only_loss=False), pairs, every):   # a pair: from the completion on
        k = len(tok.apply_chat_template(p['prompt'], tokenize=True, add_generation_prompt=True)['input_ids'])
        assert s['input_ids'].tolist() == e['input_ids'].tolist() and s['labels'].tolist() == [IGNORE_INDEX] * k + e['labels'].tolist()[k:]
    both = inf.tokenize(tok, pairs, assistant_only_loss=False, completion_only_loss=False)
    assert all(torch.equal(a['labels'], b['labels']) for a, b in zip(both, every))          # a pair trained whole: its conversation
    reply = inf.tokenize(tok, pairs, completion_only_loss=False)       # the replies, the prompt's own (none here) included
    assert [tok.decode(s['input_ids'][s['labels'] != IGNORE_INDEX]) for s in reply] == [c[-1]['content'] + '<|end|>' for c in convs]
    texts = [('the capital of france is', ' paris'), ('the capital of peru is', ' lima')]
    plain, whole = inf.tokenize(tok, texts), inf.tokenize(tok, texts, completion_only_loss=False)
    for a, b in zip(plain, whole):                                 # a text pair: the same tokens, all of them scored
        assert torch.equal(a['input_ids'], b['input_ids']) and torch.equal(b['labels'], b['input_ids']) and (a['labels'] == IGNORE_INDEX).sum() > 1
    with pytest.raises(TypeError, match='assistant_only_loss'): inf.tokenize(tok, convs, assistant_only_loss='false')
    wins = inf.token_windows(tok, convs, 64, assistant_only_loss=False)            # windows keep them: no label left out
    assert len(wins) == len(convs) and not any('labels' in w for w in wins)
    assert TokenRules(assistant_only_loss=False, text_eos=None).changed() == {'assistant_only_loss': False}
    q = inf.as_sequences([chat_query(tok, conversation('france', 'paris', system=False))])
    f = inf.fit_factors(m, every, 'ekfac', batch_size=8, progress=False)
    want = inf.pairwise_scores(m, f, q, every, progress=False).total[0]
    assert not torch.allclose(inf.pairwise_scores(m, f, q, inf.tokenize(tok, convs), progress=False).total[0], want, rtol=1e-2)
    flag = ('--text-field', 'messages', '--assistant-only-loss', 'false')
    rc, _, err = randdata.cli_run('fit-factors', '--model', d/'model', '--data', d/'train.jsonl', *flag, '--out', tmp_path/'f', '--batch-size', 8)
    assert rc == 0, err
    assert torch.allclose(inf.Factors.load(tmp_path/'f').tensors['model.layers.0.mlp.up_proj']['Lambda'],
                          f.tensors['model.layers.0.mlp.up_proj']['Lambda'], rtol=1e-9, atol=0)
    rc, _, err = randdata.cli_run('score', '--model', d/'model', '--factors', tmp_path/'f', '--queries', d/'q.jsonl',
                                  '--data', d/'train.jsonl', *flag, '--out', tmp_path/'s.parquet')
    assert rc == 0, err
    assert torch.allclose(torch.tensor(pd.read_parquet(tmp_path/'s.parquet')['q1'].to_numpy()), want, rtol=1e-9, atol=0)
    rc, _, err = randdata.cli_run('scan', '--model', d/'model', '--factors', tmp_path/'f', '--queries', d/'q.jsonl', '--corpus',
                                  d/'train.jsonl', *flag, '--k', 6, '--out', tmp_path/'r.parquet', '--quiet')
    assert rc == 0, err
    r = ScanResult.load(tmp_path/'r.parquet')
    assert torch.allclose(r.scores[0], want[r.indices[0]], rtol=1e-6, atol=0)
    r = inf.scan(m, f, q, [{'messages': c} for c in convs], k=6, tokenizer=tok, text_field='messages', assistant_only_loss=False, progress=False)
    assert torch.allclose(r.scores[0], want[r.indices[0]], rtol=1e-6, atol=0)
    s = ExplorerSession(model=m, tokenizer=tok, corpus=d/'train.jsonl', text_field='messages', queries=d/'q.jsonl',
                        fit_sample=0, batch_size=8, assistant_only_loss=False)
    res = run_query(s, s.custom, query_id='q1', prefilter=False, k=3, strategy='ekfac')
    assert torch.allclose(torch.tensor(res.scores)[torch.argsort(torch.tensor(res.candidates))], want, rtol=1e-6, atol=0)


def test_the_token_flags_are_recorded_and_a_mismatch_or_trls_default_is_said(case, tmp_path):
    """`fit-factors` records how it read the records and `score`/`scan`/the explorer say when they read them otherwise;
    a conversation corpus read by the default rules gets a note on TRL's all-token default; a scan result keeps its rules,
    and `top`, which reads no tokens, takes no token flags."""
    from influence_nb.explorer import ExplorerSession, run_query
    from influence_nb.search import ScanResult
    d, m = case['dir'], case['model']
    base = ('--model', d/'model', '--text-field', 'messages')
    rc, _, err = randdata.cli_run('fit-factors', *base, '--data', d/'train.jsonl', '--out', tmp_path/'f0', '--batch-size', 8)
    assert rc == 0, err
    assert "6 conversation(s) of 6 records are scored on the assistant's replies only" in err and '--assistant-only-loss false' in err, err
    assert inf.Factors.load(tmp_path/'f0').info['token_rules'] == {'assistant_only_loss': True}   # the rules its records needed
    rc, _, err = randdata.cli_run('fit-factors', *base, '--data', d/'train.jsonl', '--out', tmp_path/'f1', '--assistant-only-loss', 'false')
    assert rc == 0 and 'scored on the assistant' not in err, err
    assert inf.Factors.load(tmp_path/'f1').info['token_rules'] == {'assistant_only_loss': False}
    score = ('score', *base, '--queries', d/'q.jsonl', '--data', d/'train.jsonl', '--out', tmp_path/'s.parquet')
    rc, _, err = randdata.cli_run(*score, '--factors', tmp_path/'f1')
    assert rc == 0 and ('the factors were fitted on records read with assistant_only_loss=False (--assistant-only-loss false), and these '
                        'records are read with assistant_only_loss=True (--assistant-only-loss true)') in err, err
    rc, _, err = randdata.cli_run(*score, '--factors', tmp_path/'f1', '--assistant-only-loss', 'false')
    assert rc == 0 and 'the factors were fitted on records read' not in err, err
    rc, _, err = randdata.cli_run('scan', *base, '--factors', tmp_path/'f1', '--queries', d/'q.jsonl', '--corpus', d/'train.jsonl',
                                  '--assistant-only-loss', 'false', '--k', 3, '--out', tmp_path/'r.parquet', '--quiet')
    assert rc == 0 and 'the factors were fitted on records read' not in err, err
    assert ScanResult.load(tmp_path/'r.parquet').token_rules == {'assistant_only_loss': False}
    rc, out, err = randdata.cli_run('top', '--result', tmp_path/'r.parquet', '--k', 2)
    assert rc == 0 and 'its records were read with --assistant-only-loss false' in out, out + err
    with pytest.raises(SystemExit) as e: randdata.cli_run('top', '--result', tmp_path/'r.parquet', '--assistant-only-loss', 'false')
    assert e.value.code == 2                                             # argparse: unrecognized arguments
    s = ExplorerSession(model=m, tokenizer=case['tok'], corpus=d/'train.jsonl', text_field='messages', queries=d/'q.jsonl',
                        factors=tmp_path/'f1', batch_size=8)
    notes = ' '.join(run_query(s, s.custom, query_id='q1', prefilter=False, k=3, strategy='ekfac').notes)
    assert "the factors were fitted on records read with assistant_only_loss=False" in notes, notes
    assert "6 conversation(s) of 6 records are scored on the assistant's replies only" in notes, notes
