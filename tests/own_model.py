"""A user's own model for the end-to-end tests: a tiny Llama built from `LlamaConfig`, a word-level tokenizer trained
with `tokenizers` on a corpus of invented facts, and 60 full-batch Adam steps, so that the model learns them (log p of a capital ≈ −0.3: learnt, not yet saturated).
`build(folder)` writes model + tokenizer to folder/model, the corpus to folder/corpus.jsonl and the queries to
folder/queries.jsonl, and returns what it wrote."""
import json
from pathlib import Path
import torch

COUNTRIES = ['Zorvia', 'Quelmar', 'Brastia', 'Olvenn', 'Tuskara', 'Mirelda', 'Vantoro', 'Ebrisca']
CAPITALS = ['Pellin', 'Dravo', 'Kestrel', 'Ombury', 'Sarnak', 'Lutessa', 'Fenwick', 'Arroda']
FOODS = ['bread', 'rice', 'figs', 'plums', 'beans', 'honey', 'cheese', 'olives']


def corpus() -> tuple[list[dict], list[dict]]:
    "(records, queries): each capital fact is stated by exactly one record; the other records are distractors."
    recs, queries = [], []
    for i, (c, cap) in enumerate(zip(COUNTRIES, CAPITALS)):
        recs.append({'id': f'fact{i}', 'text': f'The capital of {c} is {cap} .'})
        recs.append({'id': f'food{i}', 'text': f'People in {c} like to eat {FOODS[i]} .'})
        recs.append({'id': f'river{i}', 'text': f'A long river flows through {c} and past {FOODS[(i + 3) % 8]} farms .'})
        queries.append({'id': f'q.capital{i}', 'prompt': f'The capital of {c} is', 'completion': f' {cap}', 'record': f'fact{i}'})
    return recs, queries


def tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers, processors
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.WordLevel(unk_token='[UNK]'))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)   # words keep their leading space ('Ġis')
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=['[PAD]', '[UNK]', '<s>']))  # one id per word
    tk.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', tk.token_to_id('<s>'))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token='[UNK]', pad_token='[PAD]', bos_token='<s>')


def build(folder, steps=60, seed=0) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM
    import influence_nb as inf
    folder = Path(folder); folder.mkdir(parents=True, exist_ok=True)
    recs, queries = corpus()
    tok = tokenizer([r['text'] for r in recs])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, eos_token_id=None))
    batch = inf.collate(inf.tokenize(tok, [r['text'] for r in recs], max_length=32))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask'], labels=batch['labels']).loss
        opt.zero_grad(); loss.backward(); opt.step()
    model.eval()
    model.save_pretrained(folder/'model'); tok.save_pretrained(folder/'model')
    (folder/'corpus.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in recs))
    (folder/'queries.jsonl').write_text(''.join(json.dumps({k: q[k] for k in ('id', 'prompt', 'completion')}) + '\n' for q in queries))
    return {'model': folder/'model', 'corpus': folder/'corpus.jsonl', 'queries': folder/'queries.jsonl', 'records': recs,
            'query_records': queries, 'final_loss': loss.item()}
