"""What a user's own text and query files look like in the output: heatmap pieces of any Unicode text join back to
what the tokenizer decodes (characters split across tokens included), and a query's warning from the command line
names the file's line and the query's id."""
import contextlib
import io
import json

import pytest
from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from influence_nb.cli import _as_notes, _read_queries
from influence_nb.viz import token_texts

CORPUS = ["the cafe of veloria serves tea at dawn and never late", "Zoë and Renée drink tea in the square"] * 3
TEXT = st.text(st.characters(codec='utf-8', exclude_categories=('Cs', 'Cc'), exclude_characters='\ufffd'), min_size=1, max_size=30)


@pytest.fixture(scope='module')
def byte_bpe():
    "A GPT-2-style byte-level BPE: characters it never saw are split into bytes, often across tokens."
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk)


@pytest.fixture(scope='module')
def fallback_bpe():
    "A Llama-2-style SentencePiece BPE with byte fallback (`<0xE2>` pieces), its decoder and a `<s>` prefix."
    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token='<unk>'))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(' ', 1, 0)])
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=['<unk>', '<s>'] + [f'<0x{b:02X}>' for b in range(256)], show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', tk.token_to_id('<s>'))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token='<s>')


@settings(max_examples=150, deadline=None)
@given(text=TEXT)
def test_byte_level_pieces_join_to_the_decoded_text(byte_bpe, text):
    ids = byte_bpe(text)['input_ids']
    assert ''.join(token_texts(byte_bpe, ids)) == byte_bpe.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(text=TEXT)
def test_byte_fallback_pieces_join_to_the_decoded_text(fallback_bpe, text):
    ids = fallback_bpe(text)['input_ids']
    assert ''.join(token_texts(fallback_bpe, ids)) == fallback_bpe.decode(ids)


@settings(max_examples=100, deadline=None)
@given(text=TEXT)
def test_byte_fallback_without_bos_keeps_only_the_leading_space(fallback_bpe, text):
    "The one documented exception (09_viz): without `<s>` the decoder drops the text's leading space; the pieces keep it."
    ids = fallback_bpe(text, add_special_tokens=False)['input_ids']
    joined, full = ''.join(token_texts(fallback_bpe, ids)), fallback_bpe.decode(ids)
    assert joined == full or (joined.startswith(' ') and joined[1:] == full), (joined, full)


@settings(max_examples=100, deadline=None)
@given(text=TEXT)
def test_split_characters_are_written_where_they_end(byte_bpe, text):
    "Brute force: token i shows what decoding the first i+1 tokens adds, once the unfinished character at its end is dropped."
    ids = byte_bpe(text)['input_ids']
    done = [byte_bpe.decode(ids[:i + 1]).rstrip('\ufffd') for i in range(len(ids))]   # U+FFFD: bytes of an unfinished character
    assert token_texts(byte_bpe, ids) == [b[len(a):] for a, b in zip([''] + done, done)]


def test_an_emoji_split_over_tokens(byte_bpe):
    ids = byte_bpe("tea 👋")['input_ids']
    assert token_texts(byte_bpe, ids)[-4:] == ['', '', '', '👋'] and len(byte_bpe.convert_ids_to_tokens(ids)[-4:]) == 4


def test_query_warning_names_line_and_id(byte_bpe, tmp_path, capsys):
    "From the command line each query is read on its own; its warning must not say 'pairs[0]' for the third query."
    rows = [{'id': 'a', 'prompt': 'the cafe of', 'completion': ' veloria'},
            {'id': 'b', 'prompt': 'the cafe serves', 'completion': ' tea'},
            {'id': 'runs-on', 'prompt': 'the cafe of vel', 'completion': 'oria serves tea'}]   # a word split across the two
    path = tmp_path/'q.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        with _as_notes(): seqs, names = _read_queries(path, byte_bpe)
    assert names == ['a', 'b', 'runs-on'] and len(seqs) == 3
    notes = [line for line in err.getvalue().splitlines() if line.startswith('note:')]
    assert len(notes) == 1, err.getvalue()
    assert notes[0].startswith("note: q.jsonl, line 3 (id 'runs-on', ") and 'pairs[' not in notes[0], notes[0]
    assert "the prompt's last word runs on into the completion" in notes[0]


def test_other_warnings_keep_their_origin(byte_bpe, tmp_path, monkeypatch):
    "Only tokenize_pairs' own warnings are re-worded into `note:` lines; another library's keeps its file and line."
    import warnings
    import influence_nb.cli as cli
    real = cli.tokenize_pairs
    def noisy(tok, pairs):
        warnings.warn("a tokenizer library's own warning", FutureWarning)           # raised from this file
        return real(tok, pairs)
    monkeypatch.setattr(cli, 'tokenize_pairs', noisy)
    (tmp_path/'q.jsonl').write_text(json.dumps({'id': 'a', 'prompt': 'the cafe of', 'completion': ' veloria'}) + '\n')
    err = io.StringIO()
    with pytest.warns(FutureWarning, match="a tokenizer library's own warning") as rec:   # shown as Python shows warnings
        with contextlib.redirect_stderr(err):
            with _as_notes(): _read_queries(tmp_path/'q.jsonl', byte_bpe)
    assert 'note:' not in err.getvalue(), err.getvalue()
    assert [w.filename.endswith('test_user_text.py') for w in rec] == [True]             # from where it was raised


class _Glued:
    "A tokenizer whose word-start mark is a token of its own, and which joins '東' + '京' into one token '東京'."
    unk_token_id = eos_token_id = pad_token_id = None
    bos_token_id, all_special_ids = 1, [1]
    VOCAB = {'<s>': 1, '▁': 2, '東': 3, '京': 4, '東京': 5}
    SPLITS = {'東': (['▁', '東'], [(0, 1), (0, 1)]), '京': (['▁', '京'], [(0, 1), (0, 1)]),
              '東京': (['▁', '東京'], [(0, 1), (0, 2)])}
    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        pieces, spans = self.SPLITS[text]
        out = {'input_ids': [self.VOCAB[p] for p in pieces]}
        if return_offsets_mapping: out['offset_mapping'] = spans
        return out
    def convert_ids_to_tokens(self, ids):
        inv = {v: k for k, v in self.VOCAB.items()}
        return inv[ids] if isinstance(ids, int) else [inv[i] for i in ids]
    def decode(self, ids): return ''.join(self.convert_ids_to_tokens(list(ids))).replace('▁', ' ')


def test_a_prompt_inside_the_spanning_token_is_refused_even_after_a_lone_mark():
    "'東' + '京' is tokenized ['▁', '東京']: the bare '▁' holds none of the prompt's text, so nothing is the prompt's alone."
    from influence_nb.data import tokenize_pairs
    with pytest.raises(ValueError, match=r"pairs\[0\] cannot be measured: the tokenizer merges the whole prompt '東'"):
        tokenize_pairs(_Glued(), [('東', '京')])


def test_unigram_metaspace_differs_only_by_the_leading_space():
    "T5-style Unigram with a Metaspace decoder: the second case of the documented exception (09_viz)."
    tk = Tokenizer(models.Unigram()); tk.pre_tokenizer = pre_tokenizers.Metaspace(); tk.decoder = decoders.Metaspace()
    tk.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=60, special_tokens=['<unk>'], unk_token='<unk>',
                                                           show_progress=False))
    uni = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token='<unk>')
    for text in CORPUS[:2] + ["tea at dawn and never late"]:
        ids = uni(text)['input_ids']
        joined, full = ''.join(token_texts(uni, ids)), uni.decode(ids)
        assert joined == ' ' + full == ' ' + text, (joined, full)


def test_the_cli_refusal_names_line_and_id(tmp_path):
    "From the command line the refusal names the file's line and the query's id, and reads as a sentence."
    (tmp_path/'q.jsonl').write_text(json.dumps({'id': 'tokyo', 'prompt': '東', 'completion': '京'}) + '\n')
    with pytest.raises(ValueError) as e: _read_queries(tmp_path/'q.jsonl', _Glued())
    assert str(e.value).startswith("--queries q.jsonl, line 1 (id 'tokyo'): the record cannot be measured: the tokenizer "
                                   "merges the whole prompt '東'"), str(e.value)
