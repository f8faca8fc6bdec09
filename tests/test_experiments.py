"""nbs/results/experiments.json: its schema, and that every verdict follows from its numbers.

The file is written by `python benchmarks/experiments.py` (a wrapper over `influence_nb.experiments.harness.main`) and
read by nbs/23_word_order … nbs/28_tails. These tests need no model: they re-derive summaries from the raw numbers
the file stores and recompute each verdict table with the package's `verdict_*` functions. A missing file or entry
fails, it is never skipped.
"""
import json, math, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest

from influence_nb.experiments import harness
from influence_nb.experiments.word_order import PROBE_GROUPS, probe_summary, learned_summary
from influence_nb.experiments.crosslingual import LANG_COLS
from influence_nb.experiments.layers import depth_stats

ROOT = Path(__file__).resolve().parents[1]
RES_PATH = ROOT/'nbs'/'results'/'experiments.json'

@pytest.fixture(scope='module')
def res():
    assert RES_PATH.exists(), "nbs/results/experiments.json is missing: run `python benchmarks/experiments.py`."
    return harness.load_results(RES_PATH)

def test_every_experiment_and_size_present(res):
    for name in harness.EXPERIMENTS:
        assert name in res, f'{name} missing'
        assert list(res[name]['sizes']) == list(harness.SIZES), (name, list(res[name]['sizes']))
        for size, r in res[name]['sizes'].items():
            assert r['seconds'] >= 0 and len(r['model']['fingerprint']) == 16
            # the numbers of one size all come from one checkpoint
            assert r['model']['fingerprint'] == res['word_order']['sizes'][size]['model']['fingerprint'], (name, size)

@pytest.mark.parametrize('name', harness.EXPERIMENTS)
def test_verdicts_follow_from_numbers(res, name):
    rows = res[name]['verdicts']
    assert rows, name
    for row in rows:
        assert set(row) == {'finding', 'size', 'paper', 'ours', 'reproduced'}
        assert isinstance(row['reproduced'], bool)
    assert harness.experiment(name).verdict(res[name]) == rows           # recomputed from the stored numbers, not typed in

def test_word_order_summaries(res):
    for size, r in res['word_order']['sizes'].items():
        rows = [(g, x) for q in r['heldout'].values() for g, x in zip(q['groups'], q['scores'])]
        assert {g for g, _ in rows} == set(PROBE_GROUPS)
        means = {g: np.mean([x for gg, x in rows if gg == g]) for g in PROBE_GROUPS}
        for g, m in means.items(): assert math.isclose(m, r['group_means'][g], rel_tol=1e-4, abs_tol=1e-6)
        if r['ratio_paraphrase_to_flipped'] is not None:
            assert math.isclose(r['ratio_paraphrase_to_flipped'], means['paraphrase'] / means['flipped'], rel_tol=1e-3)
        for cond, facts in r['trained'].items():
            assert len(facts) == 10
            for f in facts:
                assert len(f['records']) == len(f['orders']) == len(f['scores']) > 0
                if cond in ('forward', 'reverse'): assert set(f['orders']) == {cond}, (size, f['fact_id'])

def test_memorization_numbers(res):
    for size, r in res['memorization']['sizes'].items():
        assert len(r['passages']) == 8
        for p in r['passages'].values():
            assert p['copies_scanned'] == p['count']            # every copy was scanned, also on the gpt2-l sample
            assert 1 <= p['rank'] <= r['n_scanned']
            assert 0 <= p['top10_copy_share'] <= 1 and 0 <= p['topc_copy_share'] <= 1
            assert p['copy_score_spread'] <= 1e-4 * abs(p['copy_score'])   # identical copies, identical scores
            assert (p['rank'] == 1) == (p['copy_score'] > p['best_noncopy'])
        if r['full_split']: assert r['n_scanned'] == 21592

def test_crosslingual_numbers(res):
    for size, r in res['crosslingual']['sizes'].items():
        S = np.array([q['scores'] for q in r['queries']], float)          # [queries, 10, 6]
        assert S.shape[1:] == (10, len(LANG_COLS))
        for k, lang in enumerate(['fr', 'de', 'es', 'names']):
            assert math.isclose(np.median(S[:, :, 2 + k].sum(1) / S[:, :, 1].sum(1)), r['ratio_to_english'][lang], rel_tol=1e-3, abs_tol=1e-5)
        assert math.isclose(np.mean([r['ratio_to_english'][l] for l in ('fr', 'de', 'es')]), r['mean_ratio'], rel_tol=1e-3, abs_tol=1e-5)
        heat = np.array(r['heatmap'], float)
        assert heat.shape == (10, len(LANG_COLS)) and math.isclose(heat[0, 0], 1.0, rel_tol=1e-6)

def test_scale_numbers(res):
    for size, r in res['scale']['sizes'].items():
        shares = r['category_share']
        assert math.isclose(sum(shares.values()), 1.0, abs_tol=1e-4)
        for c, v in shares.items():
            assert math.isclose(np.mean([q['categories'].count(c) / 10 for q in r['queries']]), v, abs_tol=1e-5)
        for q in r['queries']:
            assert len(q['top']) == len(q['bm25_top']) == 10
            assert q['overlap_bm25'] == len(set(q['top']) & set(q['bm25_top'])) / 10
            assert all(a >= b for a, b in zip(q['top_scores'], q['top_scores'][1:]))

def test_layer_numbers(res):
    for size, r in res['layers']['sizes'].items():
        for grp in ('fact', 'translation', 'memorization'):
            sh = np.array(r[grp]['shares'], float)
            assert sh.shape[1] == r['n_blocks']
            assert np.allclose(sh.sum(1), 1, atol=1e-4)
            depth, upper = depth_stats(sh)
            assert math.isclose(depth, r[grp]['mean_depth'], abs_tol=1e-4) and math.isclose(upper, r[grp]['upper_share'], abs_tol=1e-4)

def test_tail_numbers(res):
    for size, r in res['tails']['sizes'].items():
        k = max(1, math.ceil(0.01 * r['n'] - 1e-9))
        for q in r['queries']:
            v = q['top_values']
            assert all(a >= b for a, b in zip(v, v[1:])) and v[-1] > 0
            if k <= len(v): assert math.isclose(sum(v[:k]) / q['sum_pos'], q['top1_share'], rel_tol=1e-3)
            assert q['n_tail'] <= q['n_pos'] <= r['n'] and q['xmin'] > 0 and q['alpha'] > 1
            assert 0 <= q['ks'] <= 1 and (q['p_value'] is None or 0 <= q['p_value'] <= 1)

def test_word_order_summaries_recompute(res):
    for size, r in res['word_order']['sizes'].items():
        assert learned_summary(r['trained']) == r['trained_summary'], size
        sm = probe_summary([g for q in r['heldout'].values() for g in q['groups']], [x for q in r['heldout'].values() for x in q['scores']])
        assert math.isclose(sm['corr_cut_flipped'], r['corr_cut_flipped'], rel_tol=1e-4), size

def test_module_entry_point(tmp_path):
    "`python -m influence_nb.experiments.harness` parses its arguments and refuses bad ones before any work."
    env = dict(os.environ, OMP_NUM_THREADS='1')
    run = lambda *a: subprocess.run([sys.executable, '-m', 'influence_nb.experiments.harness', *a], cwd=tmp_path,
                                    capture_output=True, text=True, env=env, timeout=120)
    ok = run('--help')
    assert ok.returncode == 0 and '--only' in ok.stdout and '--sizes' in ok.stdout, ok.stderr
    bad = run('--only', 'bogus', '--out', 'x.json')
    assert bad.returncode == 2 and 'unknown experiment' in bad.stderr and not (tmp_path/'x.json').exists()
    copy = tmp_path/'copy.json'; copy.write_text(RES_PATH.read_text())
    ref = run('--refresh-verdicts', '--out', str(copy))
    assert ref.returncode == 0, ref.stderr
    new, old = json.loads(copy.read_text()), json.loads(RES_PATH.read_text())
    assert {k: v['verdicts'] for k, v in new.items() if k != 'meta'} == {k: v['verdicts'] for k, v in old.items() if k != 'meta'}
