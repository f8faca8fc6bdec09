"""The paper's findings (Grosse et al. 2023, §5) measured on the bundled world corpus and gpt2-s/m/l.

    python benchmarks/experiments.py [--only NAME[,NAME]] [--sizes s,m,l]

writes every number to benchmarks/results/experiments.json (merged per experiment and per model size, so a partial
run never erases the others). The notebooks nbs/23_word_order … nbs/28_tails read that file, re-run a small slice
live to check it, and compute their verdict tables with the `verdict_*` functions below.

Experiments: word_order (§5.3.4), memorization (§5.3.3), crosslingual (§5.3.2), scale (§5.3.1), layers (§5.3.5),
tails (§5.2.1). Every size uses the same recipe: EK-FAC factors (true Fisher, MLP layers, the paper's damping
0.1 × mean Λ) fitted on a seeded sample of `fit_n` training records, then
  * the *fact pool*: 12 English country-fact queries and 6 French/German/Spanish fact queries scored against the
    union of each query's BM25 top-`pool_bm25_k` training records and every record that states one of the facts;
  * the *unfiltered set*: 8 passage queries and 4 of the fact queries scored against the whole training split
    (sizes in `full_split`: gpt2-s) or a seeded random sample of `sample_n` records plus every passage copy (m, l);
  * small targeted scores: word-order probes, the records of the word-order facts, translations of top sequences.
"""
import argparse, json, math, os, random, sys, time, warnings
from pathlib import Path
from functools import lru_cache

import numpy as np, torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
import influence_nb as inf
from influence_nb.corpus import load_corpus, load_queries, load_probes, load_facts, load_passages, TEMPLATES, render
from influence_nb.train import load_model, load_tokenizer
from influence_nb.tfidf import TokenIndex
from influence_nb.viz import fit_power_law, top_share, layer_shares

RESULTS = Path(os.environ.get('INFLUENCE_NB_EXPERIMENTS', ROOT/'benchmarks'/'results'/'experiments.json'))   # env: for trial runs
FACTOR_CACHE = Path(os.environ.get('INFLUENCE_NB_CACHE', Path.home()/'.cache'/'influence_nb'))/'exp_factors'
SIZES = ('gpt2-s', 'gpt2-m', 'gpt2-l')
EXPERIMENTS = ('word_order', 'memorization', 'crosslingual', 'scale', 'layers', 'tails')

CFG = dict(fit_n=300, fit_seed=0, fisher='true', modules='mlp', damping=None, batch_size=32,
           n_fact_queries=12, query_seed=0, pool_bm25_k=100, top_k=10,
           full_split=['gpt2-s', 'gpt2-m', 'gpt2-l'], sample_n=2000, sample_seed=0, n_tail_fact_queries=4,
           n_translated_records=10, tail_frac=0.01, tail_stored=500, tail_boot=50, slice_n=200)

def size_name(s): return s if s.startswith('gpt2-') else f'gpt2-{s}'

# ---------------------------------------------------------------------------------------------------------------
# Data shared by every size

class Data:
    "The corpus, tokenized once."
    def __init__(self):
        self.tok = load_tokenizer()
        self.records = load_corpus('train')
        self.texts = [r['text'] for r in self.records]
        self._seqs = {}                                                       # record index -> sequence dict (lazy)
        self.facts = {r['fact_id']: r for r in load_facts().to_dict('records')}
        self.queries = {q['id']: q for q in load_queries()}
        self.passages = load_passages()
        self.stats = json.loads((ROOT/'data'/'corpus'/'stats.json').read_text())
        self.by_fact = {}                                                     # fact_id -> record indices
        for i, r in enumerate(self.records):
            for f in r['fact_ids']: self.by_fact.setdefault(f, []).append(i)
        self._index = None

    def at(self, idx) -> list:
        "The tokenized training records `idx` (tokenized once, on first use)."
        idx = [int(i) for i in idx]
        new = sorted({i for i in idx if i not in self._seqs})
        for i, sq in zip(new, inf.tokenize(self.tok, [self.texts[i] for i in new], max_length=128) if new else []):
            self._seqs[i] = sq
        return [self._seqs[i] for i in idx]

    def seq(self, i): return self.at([i])[0]

    @property
    def index(self):
        "BM25 index (paper §3.2.1) of the whole training split."
        if self._index is None:
            ig = sorted({self.tok.bos_token_id, self.tok.pad_token_id})
            self._index = TokenIndex(self.at(range(len(self.records))), ignore_ids=ig)
        return self._index

    def pairs(self, qs): return inf.tokenize_pairs(self.tok, [(q['prompt'], q['completion']) for q in qs])
    def seqs(self, texts): return inf.tokenize(self.tok, list(texts), max_length=128)

@lru_cache(None)
def data(): return Data()

def fact_queries(d:Data, cfg=CFG):
    "12 English country-fact queries (half stated in all four languages in training, half English-only; orders "
    "forward or both), and the French/German/Spanish queries of the first two 'all' facts per language."
    rng = random.Random(cfg['query_seed'])
    en = {c: sorted(f for f, r in d.facts.items() if r['entity_type'] == 'country' and r['lang_condition'] == c
                    and r['order_condition'] in ('forward', 'both') and f'q.{f}.en' in d.queries) for c in ('all', 'en')}
    half = cfg['n_fact_queries'] // 2
    picked = {c: rng.sample(en[c], half) for c in en}
    eng = [d.queries[f'q.{f}.en'] for c in ('all', 'en') for f in picked[c]]
    xs = [d.queries[f'q.{f}.{lang}'] for j, lang in enumerate(('fr', 'de', 'es')) for f in picked['all'][2*j:2*j+2]]
    return eng, xs

# ---------------------------------------------------------------------------------------------------------------
# Models, factors, scores

def factors_path(size):
    "Factors are cached outside the repo (gpt2-s's alone are 4.8 MB); a stale or missing cache is refitted."
    return FACTOR_CACHE/size

def fit_sample(d:Data, cfg=CFG):
    return sorted(random.Random(cfg['fit_seed']).sample(range(len(d.records)), cfg['fit_n']))

def get_factors(model, size, d:Data, cfg=CFG, refit=False):
    "EK-FAC factors of `model` on the seeded fit sample: loaded from cache when they match the weights, else fitted."
    p = factors_path(size)
    if not refit and (p/'factors.json').exists():
        try:
            f = inf.Factors.load(p); f.check(model)
            if f.n_sequences == cfg['fit_n']: return f
        except (ValueError, FileNotFoundError): pass
    f = inf.fit_factors(model, d.at(fit_sample(d, cfg)), strategy='ekfac', modules=cfg['modules'],
                        fisher=cfg['fisher'], batch_size=16, seed=cfg['fit_seed'], progress=False)
    f.save(p)
    return f

class Run:
    "One model size: the model, its factors, and the shared score matrices (computed on first use)."
    def __init__(self, size, d:Data, cfg=CFG):
        self.size, self.d, self.cfg = size_name(size), d, cfg
        self.model = load_model(self.size)
        t0 = time.time(); self.factors = get_factors(self.model, self.size, d, cfg)
        self.seconds = {'factors': round(time.time() - t0, 1)}
        self._pool = self._unf = None

    def score(self, queries, seqs, per_layer=False):
        return inf.pairwise_scores(self.model, self.factors, queries, seqs, damping=self.cfg['damping'],
                                   per_layer=per_layer, batch_size=self.cfg['batch_size'], progress=False)

    def logp(self, qs):
        from influence_nb.cli import completion_logprobs
        return completion_logprobs(self.model, self.d.pairs(qs)).tolist()

    def _stage_path(self, stage):
        import hashlib
        keys = dict(pool=['fit_n', 'fit_seed', 'fisher', 'modules', 'damping', 'n_fact_queries', 'query_seed', 'pool_bm25_k'],
                    unfiltered=['fit_n', 'fit_seed', 'fisher', 'modules', 'damping', 'n_fact_queries', 'query_seed',
                                'sample_n', 'sample_seed', 'n_tail_fact_queries'])[stage]
        cfg = {k: self.cfg[k] for k in keys}
        if stage == 'unfiltered': cfg['full'] = self.size in self.cfg['full_split']
        key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
        return FACTOR_CACHE.parent/'exp_stages'/f'{self.size}-{stage}-{self.factors.fingerprint[:16]}-{key}.npz'

    def _load_stage(self, stage):
        "A shared score matrix saved by an earlier run of the same checkpoint and config (runs in parallel share them)."
        p = self._stage_path(stage)
        if not p.exists(): return None
        z = np.load(p, allow_pickle=False)
        meta = json.loads(str(z['meta']))
        out = dict(meta, queries=[self.d.queries[i] for i in meta['queries']], idx=z['idx'], total=z['total'],
                   per_layer={m: z[f'L{j}'] for j, m in enumerate(meta['modules'])})
        for k in ('bm25_top', 'in_sample'):
            if k in z: out[k] = z[k]
        return out

    def _save_stage(self, stage, st):
        p = self._stage_path(stage); p.parent.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in st.items() if k not in ('queries', 'idx', 'total', 'per_layer', 'bm25_top', 'in_sample')}
        meta['queries'] = [q['id'] for q in st['queries']]
        arrs = dict(idx=st['idx'], total=st['total'], **{f'L{j}': st['per_layer'][m] for j, m in enumerate(st['modules'])})
        for k in ('bm25_top', 'in_sample'):
            if k in st: arrs[k] = st[k]
        tmp = p.with_name(p.stem + f'.{os.getpid()}.tmp.npz')
        np.savez(tmp, meta=np.array(json.dumps(meta)), **arrs); os.replace(tmp, p)

    def pool(self):
        "Fact queries × fact pool (BM25 top-k of each query ∪ records stating the facts), per layer."
        if self._pool is None: self._pool = self._load_stage('pool')
        if self._pool is None:
            t0 = time.time(); d = self.d
            eng, xs = fact_queries(d, self.cfg)
            qs = eng + xs
            qseqs = d.pairs(qs)
            top_idx, _ = d.index.top(qseqs, self.cfg['pool_bm25_k'])
            idx = set(top_idx.flatten().tolist())
            for q in eng: idx |= set(d.by_fact[q['fact_id']])
            idx = sorted(idx)
            s = self.score(qseqs, d.at(idx), per_layer=True)
            self._pool = dict(queries=qs, n_en=len(eng), idx=np.array(idx), total=s.total.double().numpy(),
                              per_layer={k: v.double().numpy() for k, v in s.per_layer.items()}, modules=s.modules,
                              bm25_top=top_idx.numpy())
            self.seconds['pool'] = round(time.time() - t0, 1)
            self._save_stage('pool', self._pool)
        return self._pool

    def unfiltered(self):
        "Passage queries and 4 fact queries × the whole split (or a seeded sample plus every passage copy)."
        if self._unf is None: self._unf = self._load_stage('unfiltered')
        if self._unf is None:
            t0 = time.time(); d, cfg = self.d, self.cfg
            pq = [q for q in d.queries.values() if q['kind'] == 'passage']
            fq = fact_queries(d, cfg)[0][:cfg['n_tail_fact_queries']]
            qs = pq + fq
            full = self.size in cfg['full_split']
            if full: idx, sample = np.arange(len(d.records)), np.ones(len(d.records), bool)
            else:
                samp = set(random.Random(cfg['sample_seed']).sample(range(len(d.records)), cfg['sample_n']))
                extra = {i for i, r in enumerate(d.records) if r['passage_id']}
                idx = np.array(sorted(samp | extra)); sample = np.array([i in samp for i in idx])
            s = self.score(d.pairs(qs), d.at(idx), per_layer=True)
            self._unf = dict(queries=qs, n_passage=len(pq), idx=idx, in_sample=sample, full=full,
                             total=s.total.double().numpy(), modules=s.modules,
                             per_layer={k: v.double().numpy() for k, v in s.per_layer.items()})
            self.seconds['unfiltered'] = round(time.time() - t0, 1)
            self._save_stage('unfiltered', self._unf)
        return self._unf

# ---------------------------------------------------------------------------------------------------------------
# Helpers

def _f(x, nd=6):
    "JSON-safe rounded float (NaN/inf -> None)."
    x = float(x)
    return None if not math.isfinite(x) else float(f'{x:.{nd}g}')

def _ratio(a, b): return _f(a / b) if b and math.isfinite(b) and b != 0 else None

def order_of(rec, fact_id):
    "'forward', 'reverse' or 'mixed': the order(s) in which `rec` states `fact_id`."
    os_ = {s['order'] for s in rec['statements'] if s['fact_id'] == fact_id}
    return os_.pop() if len(os_) == 1 else ('mixed' if os_ else None)

def wording(rec, fact):
    "How a training record relates to a fact query: same_words / other_words / other_language / same_entity / unrelated."
    sts = [s for s in rec['statements'] if s['fact_id'] == fact['fact_id']]
    if sts:
        if rec['lang'] != 'en': return 'other_language'
        return 'same_words' if any(s['order'] == 'forward' and s['template'] == 0 for s in sts) else 'other_words'
    return 'same_entity' if fact['subject'] in rec['text'] else 'unrelated'

def rerender(rec, lang, facts):
    "The fact statements of `rec` rendered again in `lang` (same order and template slot); neutral sentences dropped."
    out = []
    for s in rec['statements']:
        f = facts[s['fact_id']]
        temps = TEMPLATES[lang][f['relation']][s['order']]
        out.append(render(temps[s['template'] % len(temps)], f['subject'], f['object']))
    return ' '.join(out)

def renderable(rec, facts):
    return (rec['kind'] == 'fact' and rec['lang'] == 'en' and rec['statements'] and
            all(facts[s['fact_id']]['relation'] in TEMPLATES['fr'] for s in rec['statements']))

def block_shares(per_layer:dict, rows, cols_top):
    "Per-block influence shares of each query row over its top sequences: DataFrame [n_rows, n_blocks]."
    sub = {k: np.take_along_axis(v[rows], cols_top, 1) for k, v in per_layer.items()}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return layer_shares(sub, by_block=True)

def depth_stats(shares):
    "Influence-weighted mean relative depth (0 = first block, 1 = last) and the share held by the upper half."
    sh = np.asarray(shares, float); B = sh.shape[-1]
    pos = np.arange(B) / max(B - 1, 1)
    return float(np.nansum(sh * pos, -1).mean()), float(sh[..., B // 2:].sum(-1).mean())

# ---------------------------------------------------------------------------------------------------------------
# 1. Word order (§5.3.4)

PROBE_GROUPS = ['paraphrase', 'no_completion', 'semantic_change', 'irrelevant', 'flipped', 'flipped_relation_cut']

def run_word_order(run:Run):
    d = run.d; out = {'heldout': {}, 'trained': {}}
    rows = []
    for q in [q for q in d.queries.values() if q['kind'] == 'heldout']:
        ps = load_probes(q['id'])
        s = run.score(d.pairs([q]), d.seqs(p['text'] for p in ps)).total[0].double().numpy()
        out['heldout'][q['id']] = dict(probe_ids=[p['id'] for p in ps], groups=[p['group'] for p in ps],
                                       scores=[_f(x) for x in s])
        rows += [(q['id'], p['group'], x) for p, x in zip(ps, s)]
    g = {grp: float(np.mean([x for _, gg, x in rows if gg == grp])) for grp in PROBE_GROUPS}
    flipped = [x for _, gg, x in rows if gg == 'flipped']; cut = [x for _, gg, x in rows if gg == 'flipped_relation_cut']
    out['group_means'] = {k: _f(v) for k, v in g.items()}
    out['ratio_paraphrase_to_flipped'] = _ratio(g['paraphrase'], g['flipped'])
    out['ratio_cut_to_flipped'] = _ratio(g['flipped_relation_cut'], g['flipped'])
    out['corr_cut_flipped'] = _f(np.corrcoef(flipped, cut)[0, 1]) if len(flipped) == len(cut) > 2 else None
    # learned facts whose order in training the corpus controls
    per_cond = {}
    for cond, fids in d.stats['probe_facts'].items():
        fact_rows = []
        for fid in fids:
            q = d.queries[f'q.{fid}.en']
            recs = d.by_fact[fid]
            s = run.score(d.pairs([q]), d.at(recs)).total[0].double().numpy()
            orders = [order_of(d.records[i], fid) for i in recs]
            fact_rows.append(dict(fact_id=fid, records=[int(i) for i in recs], orders=orders, scores=[_f(x) for x in s],
                                  logp=_f(run.logp([q])[0]),
                                  mean_forward=_f(np.mean([x for x, o in zip(s, orders) if o == 'forward'])) if 'forward' in orders else None,
                                  mean_reverse=_f(np.mean([x for x, o in zip(s, orders) if o == 'reverse'])) if 'reverse' in orders else None))
        out['trained'][cond] = fact_rows
        allsc = {o: [x for r in fact_rows for x, oo in zip(r['scores'], r['orders']) if oo == o] for o in ('forward', 'reverse', 'mixed')}
        per_cond[cond] = dict(mean_logp=_f(np.mean([r['logp'] for r in fact_rows])),
                              **{f'mean_{o}': (_f(np.mean(v)) if v else None) for o, v in allsc.items()},
                              **{f'n_{o}': len(v) for o, v in allsc.items()})
    both = [(r['mean_forward'], r['mean_reverse']) for r in out['trained']['both'] if r['mean_forward'] is not None and r['mean_reverse'] is not None]
    per_cond['both']['ratio_forward_to_reverse'] = _ratio(np.mean([a for a, _ in both]), np.mean([b for _, b in both]))
    per_cond['both']['share_facts_forward_gt_reverse'] = _f(np.mean([a > b for a, b in both]))
    out['trained_summary'] = per_cond
    return out

def verdict_word_order(res):
    rows = []
    sz = res['sizes']
    def fmt(v): return 'n/a' if v is None else f'{v:.3g}'
    for size, r in sz.items():
        rp, g = r['ratio_paraphrase_to_flipped'], r['group_means']
        ok = g['paraphrase'] is not None and g['paraphrase'] > 0 and (g['flipped'] <= 0 or (rp is not None and rp >= 10))
        rows.append(dict(finding='relation-before-completion ≫ flipped (held-out probes)', size=size,
                         paper='≥ 10× (translation example)', ours=f'paraphrase/flipped = {fmt(rp)}', reproduced=bool(ok)))
        rc = r['ratio_cut_to_flipped']
        ok = rc is not None and 0.5 <= rc <= 2.0
        rows.append(dict(finding='flipped keeps its influence when the relation is cut', size=size,
                         paper='unchanged (≈ 1×)', ours=f'cut/flipped = {fmt(rc)}', reproduced=bool(ok)))
        t = r['trained_summary']['both']
        rf = t['ratio_forward_to_reverse']
        ok = rf is not None and t['mean_forward'] > 0 and (t['mean_reverse'] <= 0 or rf >= 2)
        rows.append(dict(finding='trained facts: forward records ≫ reverse records', size=size,
                         paper='relation-before-completion dominates', ours=f'forward/reverse = {fmt(rf)}', reproduced=bool(ok)))
    return rows

# ---------------------------------------------------------------------------------------------------------------
# 2. Memorization (§5.3.3)

def run_memorization(run:Run):
    d, u = run.d, run.unfiltered()
    out = dict(full_split=u['full'], n_scanned=int(len(u['idx'])), passages={})
    pids = np.array([d.records[i]['passage_id'] or '' for i in u['idx']])
    qs = u['queries'][:u['n_passage']]
    lps = run.logp(qs)
    for j, q in enumerate(qs):
        s = u['total'][j]; copies = pids == q['passage_id']
        order = np.argsort(-s, kind='stable')
        rank = int(np.argmax(copies[order])) + 1                      # rank of the best-scoring copy
        c = int(copies.sum())
        top10 = float(copies[order[:10]].mean()); topc = float(copies[order[:c]].mean())
        cs = s[copies]
        out['passages'][q['passage_id']] = dict(count=q['passage_count'], copies_scanned=c, rank=rank,
            top10_copy_share=_f(top10), topc_copy_share=_f(topc), logp=_f(lps[j]),
            copy_score=_f(cs.mean()), copy_score_spread=_f(cs.max() - cs.min()), best_noncopy=_f(s[~copies].max()),
            copy_indices=[int(i) for i in u['idx'][copies][:5]])
    return out

def verdict_memorization(res):
    rows = []
    for size, r in res['sizes'].items():
        ps = r['passages']
        many = [p for p in ps.values() if p['count'] >= 8]; few = [p for p in ps.values() if p['count'] < 8]
        top = sum(p['rank'] == 1 for p in many)
        rows.append(dict(finding='repeated passage (≥ 8 copies): exact copy ranks first in an unfiltered scan', size=size,
                         paper='exact passage at the top', ours=f'{top}/{len(many)} at rank 1' + ('' if r['full_split'] else ' (sample)'),
                         reproduced=top == len(many)))
        top = sum(p['rank'] == 1 for p in few)
        rows.append(dict(finding='rare passage (1–4 copies): exact copy ranks first', size=size,
                         paper='(famous passages only)', ours=f'{top}/{len(few)} at rank 1; ranks ' + ', '.join(str(p['rank']) for p in few),
                         reproduced=top == len(few)))
    return rows

# ---------------------------------------------------------------------------------------------------------------
# 3. Cross-lingual (§5.3.2)

LANG_COLS = ['en (original)', 'en (statements)', 'fr', 'de', 'es', 'names only']
RENDER_LANGS = ('en', 'fr', 'de', 'es', 'names')

def names_only(rec, facts):
    "Each fact statement of `rec` cut to its two names (subject, then object): what is left without any relation words."
    return ' '.join(f"{facts[s['fact_id']]['subject']} {facts[s['fact_id']]['object']}." for s in rec['statements'])

def renderings(rec, facts):
    "The original text, then its statements re-rendered in each of RENDER_LANGS."
    return [rec['text']] + [names_only(rec, facts) if lang == 'names' else rerender(rec, lang, facts) for lang in RENDER_LANGS]

def run_crosslingual(run:Run):
    d, p, cfg = run.d, run.pool(), run.cfg
    per_query = []
    mats = []
    for j, q in enumerate(p['queries'][:p['n_en']]):
        ok = np.array([renderable(d.records[i], d.facts) for i in p['idx']])
        cand = np.where(ok)[0]
        top = cand[np.argsort(-p['total'][j, cand], kind='stable')[:cfg['n_translated_records']]]
        recs = [d.records[p['idx'][t]] for t in top]
        R = [renderings(r, d.facts) for r in recs]
        texts = [R[i][c] for c in range(len(LANG_COLS)) for i in range(len(recs))]
        s = run.score(d.pairs([q]), d.seqs(texts)).total[0].double().numpy().reshape(len(LANG_COLS), len(recs)).T   # [10, 6]
        mats.append(s / s[0, 0])                                        # normalised by the top original's score
        per_query.append(dict(query_id=q['id'], lang_condition=d.facts[q['fact_id']]['lang_condition'],
                              records=[int(p['idx'][t]) for t in top], scores=[[_f(x) for x in row] for row in s]))
    S = np.array([r['scores'] for r in per_query], float)            # [Q, 10, 5]
    def ratios(sel):
        base = S[sel, :, 1].sum(1)                                   # re-rendered English statements
        return {lang: _f(np.mean(S[sel, :, 2 + k].sum(1) / base)) for k, lang in enumerate(('fr', 'de', 'es', 'names'))}
    cond = np.array([r['lang_condition'] for r in per_query])
    out = dict(queries=per_query, columns=LANG_COLS, heatmap=[[_f(x) for x in row] for row in np.mean(mats, 0)],
               ratio_to_english=ratios(np.ones(len(S), bool)), ratio_by_condition={c: ratios(cond == c) for c in ('all', 'en')},
               original_vs_statements=_f(np.mean(S[:, :, 1].sum(1) / S[:, :, 0].sum(1))))
    out['mean_ratio'] = _f(np.mean([out['ratio_to_english'][l] for l in ('fr', 'de', 'es')]))
    return out

def verdict_crosslingual(res):
    sz = res['sizes']; rows = []
    order = [s for s in SIZES if s in sz]
    if order:
        r0 = sz[order[0]]['mean_ratio']
        rows.append(dict(finding='smallest model: translations of top English sequences have ≈ 0 influence', size=order[0],
                         paper='≈ 0', ours=f'translation/English = {r0:.3g}', reproduced=abs(r0) < 0.1))
    if len(order) > 1:
        vals = [sz[s]['mean_ratio'] for s in order]
        mono = all(a < b for a, b in zip(vals, vals[1:]))
        rows.append(dict(finding='cross-lingual influence grows with model size', size='→'.join(order),
                         paper='grows with size', ours=' → '.join(f'{v:.3g}' for v in vals), reproduced=mono))
        ex = [sz[s]['mean_ratio'] - sz[s]['ratio_to_english']['names'] for s in order]
        rows.append(dict(finding='…beyond what the shared names alone carry (translation − names-only ratio)', size='→'.join(order),
                         paper='grows with size', ours=' → '.join(f'{v:+.3g}' for v in ex), reproduced=all(a < b for a, b in zip(ex, ex[1:]))))
    return rows

# ---------------------------------------------------------------------------------------------------------------
# 4. Scale (§5.3.1)

def run_scale(run:Run):
    d, p, cfg = run.d, run.pool(), run.cfg
    k = cfg['top_k']; rows = []
    pos = {int(i): j for j, i in enumerate(p['idx'])}
    for j, q in enumerate(p['queries'][:p['n_en']]):
        fact = d.facts[q['fact_id']]
        top = p['idx'][np.argsort(-p['total'][j], kind='stable')[:k]]
        bm = p['bm25_top'][j][:k]
        qtok = set(d.pairs([q])[0]['input_ids'].tolist()) - {d.tok.bos_token_id}
        tok_ov = np.mean([len(qtok & set(d.seq(i)['input_ids'].tolist())) / len(qtok) for i in top])
        bm_ov = np.mean([len(qtok & set(d.seq(i)['input_ids'].tolist())) / len(qtok) for i in bm])
        cats = [wording(d.records[i], fact) for i in top]
        rows.append(dict(query_id=q['id'], top=[int(i) for i in top], top_scores=[_f(p['total'][j, pos[int(i)]]) for i in top],
                         bm25_top=[int(i) for i in bm], overlap_bm25=_f(len(set(top.tolist()) & set(bm.tolist())) / k),
                         token_overlap=_f(tok_ov), token_overlap_bm25=_f(bm_ov), categories=cats))
    cats = ['same_words', 'other_words', 'other_language', 'same_entity', 'unrelated']
    share = {c: _f(np.mean([r['categories'].count(c) / k for r in rows])) for c in cats}
    out = dict(queries=rows, n_pool=int(len(p['idx'])), category_share=share,
               overlap_bm25=_f(np.mean([r['overlap_bm25'] for r in rows])),
               token_overlap=_f(np.mean([r['token_overlap'] for r in rows])),
               paraphrase_share=_f(share['other_words'] + share['other_language']),
               fact_share=_f(share['same_words'] + share['other_words'] + share['other_language']))
    if run.size in run.cfg['full_split']:                            # how much of the unfiltered top-k the pool caught
        u = run.unfiltered(); n = run.cfg['n_tail_fact_queries']; npass = u['n_passage']
        cov = [len(set(np.argsort(-u['total'][npass + j], kind='stable')[:k].tolist()) & set(p['idx'].tolist())) / k for j in range(n)]
        out['pool_coverage_of_unfiltered_top'] = _f(np.mean(cov))
    return out

def paired_change(a, b):
    "Mean and standard error of the per-query change b − a (same queries on two sizes)."
    x = np.asarray(b, float) - np.asarray(a, float)
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan

def verdict_scale(res):
    "Reproduced when gpt2-l differs from gpt2-s in the paper's direction by more than two paired standard errors."
    sz = res['sizes']; order = [s for s in SIZES if s in sz]; rows = []
    if len(order) > 1:
        a, b = sz[order[0]], sz[order[-1]]
        para = lambda r: [(q['categories'].count('other_words') + q['categories'].count('other_language')) / len(q['categories']) for q in r['queries']]
        for what, key, f, sign, paper in [
                ('top sequences share tokens with the query less as size grows (overlap with BM25 top-10)', 'overlap_bm25',
                 lambda r: [q['overlap_bm25'] for q in r['queries']], -1, 'small: token matches; large: less'),
                ('share of top-10 stating the fact in other words grows with size', 'paraphrase_share', para, 1,
                 'large models match meaning')]:
            m, se = paired_change(f(a), f(b))
            rows.append(dict(finding=what, size=f'{order[0]}→{order[-1]}', paper=paper,
                             ours=' → '.join(f"{sz[s][key]:.2f}" for s in order) + f' (l − s: {m:+.2f} ± {se:.2f})',
                             reproduced=bool(sign * m > 2 * se)))
    return rows

# ---------------------------------------------------------------------------------------------------------------
# 5. Layers (§5.3.5)

def run_layers(run:Run):
    p, u, k = run.pool(), run.unfiltered(), run.cfg['top_k']
    def group(src, rows):
        tot = src['total'][rows]
        cols = np.argsort(-tot, 1, kind='stable')[:, :k]
        sh = block_shares(src['per_layer'], rows, cols)
        depth, upper = depth_stats(sh.values)
        return dict(shares=[[_f(x) for x in r] for r in sh.values], mean_shares=[_f(x) for x in np.nanmean(sh.values, 0)],
                    blocks=list(sh.columns), mean_depth=_f(depth), upper_share=_f(upper),
                    query_ids=[src['queries'][i]['id'] for i in rows], top=[[int(src['idx'][c]) for c in r] for r in cols])
    ne = p['n_en']
    return dict(n_blocks=len(run.model.transformer.h), fact=group(p, np.arange(ne)), translation=group(p, np.arange(ne, len(p['queries']))),
                memorization=group(u, np.arange(u['n_passage'])))

def verdict_layers(res):
    rows = []
    for size, r in res['sizes'].items():
        f, m, t = r['fact'], r['memorization'], r['translation']
        B = r['n_blocks']
        avg = np.nanmean([f['mean_shares'], m['mean_shares'], t['mean_shares']], 0)
        rows.append(dict(finding='averaged over queries, influence is spread roughly evenly over the blocks', size=size,
                         paper='roughly even', ours='block shares ' + ', '.join(f'{x:.2f}' for x in avg),
                         reproduced=bool(np.all((avg >= 0.5 / B) & (avg <= 1.5 / B)))))
        rows.append(dict(finding='factual queries load on the upper layers', size=size, paper='upper layers',
                         ours=f"upper-half share {f['upper_share']:.2f}", reproduced=f['upper_share'] > 0.5))
        rows.append(dict(finding='memorized passages load on the upper layers', size=size, paper='upper layers',
                         ours=f"upper-half share {m['upper_share']:.2f}", reproduced=m['upper_share'] > 0.5))
        dq = lambda g: np.asarray(g['shares'], float) @ (np.arange(B) / max(B - 1, 1))   # per-query mean depth
        df, dt = dq(f), dq(t)
        diff, se = df.mean() - dt.mean(), math.sqrt(df.var(ddof=1) / len(df) + dt.var(ddof=1) / len(dt))
        rows.append(dict(finding='translation queries sit lower (middle) than factual ones', size=size, paper='middle layers',
                         ours=f"mean depth {t['mean_depth']:.2f} vs fact {f['mean_depth']:.2f} (fact − translation {diff:+.2f} ± {se:.2f})",
                         reproduced=bool(diff > 2 * se)))
    return rows

# ---------------------------------------------------------------------------------------------------------------
# 6. Heavy tails (§5.2.1)

def run_tails(run:Run):
    u, cfg = run.unfiltered(), run.cfg
    samp = u['in_sample']; n = int(samp.sum())
    out = dict(full_split=u['full'], n=n, queries=[])
    for j, q in enumerate(u['queries']):
        s = u['total'][j][samp]
        pos = np.sort(s[s > 0])[::-1]
        fit = fit_power_law(s, min_tail=50, max_candidates=300, n_boot=cfg['tail_boot'], seed=0)
        out['queries'].append(dict(query_id=q['id'], kind=q['kind'], alpha=_f(fit['alpha']), xmin=_f(fit['xmin']),
                                   ks=_f(fit['ks']), p_value=_f(fit['p_value']), n_tail=fit['n_tail'], n_pos=fit['n_pos'],
                                   top1_share=_f(top_share(s, cfg['tail_frac'])), sum_pos=_f(pos.sum(), 10),
                                   max_nats=_f(s.max() / len(run.d.records)),
                                   top_values=[_f(x, 8) for x in pos[:cfg['tail_stored']]],
                                   slice_scores=[_f(x, 8) for x in u['total'][j][:cfg['slice_n']]]))
    out['slice_indices'] = [int(i) for i in u['idx'][:cfg['slice_n']]]
    return out

def verdict_tails(res):
    rows = []
    for size, r in res['sizes'].items():
        a = [q['alpha'] for q in r['queries']]; sh = [q['top1_share'] for q in r['queries']]
        rej = sum(q['p_value'] is not None and q['p_value'] < 0.1 for q in r['queries'])
        med = float(np.median(a))
        rows.append(dict(finding='top scores follow a power law with exponent ≈ 2–4.3', size=size, paper='α ≈ 2–4.3',
                         ours=f"median α = {med:.2f} (range {min(a):.2f}–{max(a):.2f})", reproduced=1.5 <= med <= 5.0))
        rows.append(dict(finding='the power law is rejected for a minority of queries', size=size, paper='KS rejects 2 of 8',
                         ours=f"rejected (p < 0.1) for {rej} of {len(a)}", reproduced=rej < len(a) / 2))
        ms = float(np.median(sh))
        rows.append(dict(finding='top 1 % of sequences hold 12–52 % of positive influence', size=size, paper='12–52 %',
                         ours=f"median {100*ms:.0f} % (range {100*min(sh):.0f}–{100*max(sh):.0f} %)", reproduced=0.12 <= ms <= 0.52))
        mx = max(q['max_nats'] for q in r['queries'] if q['kind'] == 'fact')
        mp = max(q['max_nats'] for q in r['queries'] if q['kind'] == 'passage')
        rows.append(dict(finding='no single sequence moves a fact completion by more than ~1 nat', size=size, paper='≤ ~1 nat',
                         ours=f"max {mx:.3g} nats (passages, most not memorized: {mp:.3g})", reproduced=mx <= 1.0))
    return rows

# ---------------------------------------------------------------------------------------------------------------
# For the notebooks' live slices

def close(live, stored, rtol=1e-3) -> bool:
    "Live scores agree with stored ones: |live − stored| ≤ rtol · max|stored| elementwise (stored were rounded to 6 digits)."
    live, stored = np.asarray(live, float), np.asarray(stored, float)
    return live.shape == stored.shape and bool(np.all(np.abs(live - stored) <= rtol * np.abs(stored).max() + 1e-9))

def live_run(res_entry, size='gpt2-s'):
    "A `Run` of `size` for a notebook's live slice, checked to be the checkpoint that `res_entry`'s numbers came from."
    run = Run(size, data())
    fp = res_entry['sizes'][size]['model']['fingerprint']
    if run.factors.fingerprint[:16] != fp:
        raise ValueError(f"experiments.json was computed on other {size} weights ({fp}) than data/models/{size} "
                         f"({run.factors.fingerprint[:16]}): rerun `python benchmarks/experiments.py`.")
    return run

# ---------------------------------------------------------------------------------------------------------------
# Driver

RUNNERS = dict(word_order=run_word_order, memorization=run_memorization, crosslingual=run_crosslingual,
               scale=run_scale, layers=run_layers, tails=run_tails)
VERDICTS = dict(word_order=verdict_word_order, memorization=verdict_memorization, crosslingual=verdict_crosslingual,
                scale=verdict_scale, layers=verdict_layers, tails=verdict_tails)

def load_results(path=RESULTS) -> dict:
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {}

def verdict_table(name, results=None):
    "The verdict table of one experiment as a DataFrame, computed from experiments.json's numbers."
    import pandas as pd
    res = (results or load_results())[name]
    return pd.DataFrame(VERDICTS[name](res))

class _locked:
    "An exclusive lock beside the results file, so runs of different sizes in parallel merge instead of overwrite."
    def __init__(self, path):
        import hashlib, tempfile
        self.p = Path(tempfile.gettempdir())/f"influence_nb_experiments_{hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:12]}.lock"
    def __enter__(self):
        import fcntl
        self.p.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.p, 'w'); fcntl.flock(self.f, fcntl.LOCK_EX); return self
    def __exit__(self, *a):
        import fcntl
        fcntl.flock(self.f, fcntl.LOCK_UN); self.f.close()

def save_results(res:dict, path=RESULTS):
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix('.tmp'); tmp.write_text(json.dumps(res, indent=1, ensure_ascii=False)); os.replace(tmp, path)

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--only', default=','.join(EXPERIMENTS), help='comma-separated experiments: ' + ', '.join(EXPERIMENTS))
    ap.add_argument('--sizes', default='s,m,l', help='comma-separated model sizes (s, m, l)')
    ap.add_argument('--out', default=str(RESULTS))
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--refresh-verdicts', action='store_true', help='only recompute the verdict tables of the file')
    a = ap.parse_args(argv)
    if a.refresh_verdicts:
        with _locked(a.out):
            res = load_results(a.out)
            for name in EXPERIMENTS:
                if name in res: res[name]['verdicts'] = VERDICTS[name](res[name]); res[name]['config'] = dict(CFG)
            save_results(res, a.out)
        return
    names = [n.strip() for n in a.only.split(',') if n.strip()]
    bad = [n for n in names if n not in EXPERIMENTS]
    if bad: ap.error(f'unknown experiment(s) {bad}; choose from {EXPERIMENTS}')
    sizes = [size_name(s.strip()) for s in a.sizes.split(',') if s.strip()]
    if any(s not in SIZES for s in sizes): ap.error(f'--sizes must be among s, m, l; got {a.sizes!r}')
    torch.set_num_threads(a.threads)
    d = data()
    for size in sizes:
        t_size = time.time()
        run = Run(size, d)
        meta = json.loads((ROOT/'data'/'models'/size/'train_log.json').read_text()).get('recipe', {})
        print(f'[{size}] factors in {run.seconds["factors"]} s', flush=True)
        for name in names:
            t0 = time.time()
            r = RUNNERS[name](run)
            r['seconds'] = round(time.time() - t0, 1)
            r['model'] = dict(fingerprint=run.factors.fingerprint[:16], recipe=meta)
            with _locked(a.out):
              res = load_results(a.out)                                # re-read: merge into what is there now
              e = res.setdefault(name, {'sizes': {}})
              e['sizes'][size] = r
              e['sizes'] = {s: e['sizes'][s] for s in SIZES if s in e['sizes']}
              e['config'] = {k: v for k, v in CFG.items()}
              e['verdicts'] = VERDICTS[name](e)
              e['updated'] = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())
              save_results(res, a.out)
            print(f'[{size}] {name}: {r["seconds"]} s', flush=True)
        with _locked(a.out):
            res = load_results(a.out)
            prev = res.setdefault('meta', {}).setdefault('seconds', {}).get(size, {})
            # merge: a later partial run that loaded a stage from the cache keeps the first run's (larger) time
            res['meta']['seconds'][size] = {k: max(prev.get(k, 0), v) for k, v in dict(run.seconds, total=round(time.time() - t_size, 1)).items()} | \
                                           {k: v for k, v in prev.items() if k not in run.seconds and k != 'total'}
            res['meta']['note'] = ('seconds: wall-clock per size on a shared 2-core machine, one torch thread; '
                                   'factors/pool/unfiltered are the shared stages, counted once in the experiment that first needed them')
            save_results(res, a.out)
        print(f'[{size}] done in {time.time() - t_size:.0f} s; shared stages {run.seconds}', flush=True)

if __name__ == '__main__':
    main()
