"""The README's first tour and `influence-nb demo` deliver what they promise: a training record that states
the queried fact ranks among the top sequences. "States" is read from the corpus metadata (each training record
lists the `fact_ids` it states, written by `influence_nb.corpus`), never from a string match on the text."""
import io, json
from pathlib import Path
import torch
from influence_nb.corpus import load_corpus, load_queries

ROOT = Path(__file__).resolve().parent.parent

def tour_cells() -> list[str]:
    "The code cells of the '## A first tour' section of nbs/index.ipynb, in order (asserts included)."
    nb = json.loads((ROOT/'nbs'/'index.ipynb').read_text())
    cells, inside = [], False
    for c in nb['cells']:
        src = ''.join(c['source'])
        if c['cell_type'] == 'markdown' and src.startswith('## '):
            if inside: break
            inside = src.startswith('## A first tour')
        elif inside and c['cell_type'] == 'code': cells.append(src)
    assert cells, "nbs/index.ipynb has no '## A first tour' section with code"
    return cells

def states(record, fact_id): return fact_id in record['fact_ids']

def test_tour_top5_states_the_fact(one_thread):
    ns = {}                                   # (its time is not asserted: timings belong to benchmarks/, not to tests)
    for src in tour_cells(): exec(compile(src, 'index.ipynb (tour)', 'exec'), ns)
    q, cand, scores = ns['q'], ns['cand'], ns['scores']
    records = load_corpus('train')
    assert q['kind'] == 'fact' and q['fact_id'] in {f for r in records for f in r['fact_ids']}
    top5 = [cand[i] for i in scores.total[0].topk(5).indices.tolist()]    # recomputed, not read from the table
    assert any(states(records[i], q['fact_id']) for i in top5), [records[i]['text'][:80] for i in top5]
    assert list(ns['top']['index']) == top5                                 # the table shows those records

def test_demo_top10_states_the_fact(tmp_path, monkeypatch, one_thread):
    from influence_nb.cli import demo
    monkeypatch.setenv('INFLUENCE_NB_CACHE', str(tmp_path))                 # a real fit, not a stale cache
    out = io.StringIO()
    res = demo(out=out)
    assert res['cached'] is False
    fact_id = next(q for q in load_queries() if q['id'] == res['query'])['fact_id']
    records = load_corpus('train')
    top = [row['train_index'] for row in res['top']]
    assert len(top) == 10
    assert any(states(records[i], fact_id) for i in top), [records[i]['text'][:80] for i in top]
    printed = out.getvalue()
    assert res['query'] in printed and 'Top 10 most influential training sequences' in printed
    assert '\x1b[' not in printed and '⟦' in printed                     # not a terminal: plain text, top tokens marked
