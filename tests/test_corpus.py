"The bundled world corpus: determinism, file schemas, and conditions that must agree with the text."
import json, re, random
from collections import Counter, defaultdict
import pytest
from influence_nb.data import data_dir
from influence_nb import corpus
from influence_nb.artefact import read_jsonl

CORPUS = data_dir()/'corpus'

def _read(name): return read_jsonl(CORPUS/name)   # every line a JSON object, or an error naming the line

def test_generate_is_deterministic():
    a, b = corpus.generate_corpus(seed=3, n_filler=5), corpus.generate_corpus(seed=3, n_filler=5)
    assert a == b
    assert a['train'] != corpus.generate_corpus(seed=4, n_filler=5)['train']

def test_bad_arguments():
    with pytest.raises(ValueError, match='train'): corpus.load_corpus('dev')
    with pytest.raises(FileNotFoundError, match='python -m influence_nb.corpus'): corpus.load_corpus('train', data_dir='/nonexistent')
    with pytest.raises(TypeError): corpus.generate_corpus(seed='0')

SCHEMAS = {
    'train.jsonl': {'id', 'text', 'kind', 'lang', 'fact_ids', 'passage_id', 'statements'},
    'validation.jsonl': {'id', 'text', 'kind', 'lang', 'fact_ids', 'passage_id', 'statements'},
    'facts.jsonl': {'fact_id', 'subject', 'relation', 'object', 'entity_type', 'orders_in_training',
                    'langs_in_training', 'n_train_statements', 'order_condition', 'lang_condition', 'heldout'},
    'passages.jsonl': {'passage_id', 'title', 'text', 'count'},
    'queries.jsonl': {'id', 'kind', 'lang', 'prompt', 'completion', 'fact_id', 'relation', 'orders_in_training',
                      'langs_in_training', 'passage_id', 'passage_count'},
    'probes.jsonl': {'id', 'query_id', 'group', 'text'},
}

@pytest.mark.parametrize('name', list(SCHEMAS))
def test_file_schema(name):
    rows = _read(name)
    assert len(rows) == len((CORPUS/name).read_text(encoding='utf-8').splitlines())      # no blank lines either
    assert rows and all(SCHEMAS[name] <= set(r) for r in rows)
    key = 'fact_id' if name == 'facts.jsonl' else 'passage_id' if name == 'passages.jsonl' else 'id'
    assert len({r[key] for r in rows}) == len(rows)

def test_counts_and_kinds():
    st = json.loads((CORPUS/'stats.json').read_text())
    train = _read('train.jsonl')
    assert len(train) == st['splits']['train']['records']
    assert set(r['kind'] for r in train) == {'fact', 'passage', 'filler'}
    assert sum(st['entities'].values()) >= 300
    queries = _read('queries.jsonl')
    assert all(q['completion'].startswith(' ') for q in queries)
    held = [q for q in queries if q['kind'] == 'heldout']
    probes = _read('probes.jsonl')
    assert len(held) >= 2 and all(15 <= sum(p['query_id'] == q['id'] for p in probes) <= 25 for q in held)
    assert {p['group'] for p in probes} == {'paraphrase', 'no_completion', 'semantic_change', 'irrelevant', 'flipped', 'flipped_relation_cut'}

def test_orders_agree_with_text():
    facts = {f['fact_id']: f for f in _read('facts.jsonl')}
    pat = lambda x: re.compile(r'(?<!\w)' + re.escape(x) + r'(?!\w)', re.I)
    seen = defaultdict(set)
    for r in _read('train.jsonl'):
        if r['kind'] != 'fact': continue
        sents = re.split(r'(?<=\.) ', r['text'])
        for fid in r['fact_ids']:
            f = facts[fid]; ps, po = pat(f['subject']), pat(f['object'])
            for s in sents:
                a, b = ps.search(s), po.search(s)
                if a and b: seen[fid].add('forward' if a.start() < b.start() else 'reverse')
    bad = [k for k, f in facts.items() if sorted(seen.get(k, [])) != sorted(f['orders_in_training'])]
    assert bad == []

def test_heldout_and_passages():
    texts = [r['text'] for r in _read('train.jsonl') + _read('validation.jsonl')]
    for f in _read('facts.jsonl'):
        if f['heldout']: assert not any(f['subject'] in t or f['object'] in t and f['subject'] in t for t in texts)
    copies = Counter(texts)
    for p in _read('passages.jsonl'): assert copies[p['text']] == p['count']

def test_reverse_only_objects_never_follow_their_subject():
    "Sequence-level word order: a reverse-only fact's object never comes after its subject in a training record."
    pat = lambda x: re.compile(r'(?<!\w)' + re.escape(x) + r'(?!\w)', re.I)
    rev = [(f['subject'], pat(f['subject']), pat(f['object'])) for f in _read('facts.jsonl') if f['order_condition'] == 'reverse']
    assert rev
    for r in _read('train.jsonl'):
        for subj, ps, po in rev:
            if subj not in r['text']: continue     # cheap filter before the regular expressions
            a = ps.search(r['text'])
            assert not (a and any(m.start() > a.start() for m in po.finditer(r['text']))), r['id']
