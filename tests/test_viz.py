"Fast checks of influence_nb.viz: power-law recovery, HTML escaping and colours, top_share, spurious flags."
import math
import re

import numpy as np
import pytest
import torch

from influence_nb.viz import (NEG_RGB, POS_RGB, fit_power_law, is_spurious, layer_shares, token_heatmap_ansi,
                              token_heatmap_html, top_share, top_table)


def pareto(alpha, n=5000, xmin=1.0, seed=0):
    "Inverse-CDF draws from a continuous power law p(x) ~ x^-alpha, x >= xmin."
    return xmin * (1.0 - np.random.default_rng(seed).random(n)) ** (-1.0 / (alpha - 1.0))


@pytest.mark.parametrize("alpha", [2.0, 2.5, 3.5])
def test_power_law_recovers_alpha(alpha):
    x = pareto(alpha, seed=int(alpha * 10))
    fit = fit_power_law(x)                                   # xmin chosen by minimising KS
    assert abs(fit["alpha"] - alpha) < 0.1 * alpha
    fixed = fit_power_law(x, xmin=1.0)
    assert fixed["n_tail"] == len(x)
    # closed form of the MLE at the true xmin
    assert math.isclose(fixed["alpha"], 1 + len(x) / np.log(x).sum(), rel_tol=1e-12)
    assert abs(fixed["alpha"] - alpha) < 4 * fixed["sigma"]


def test_ks_separates_power_law_from_exponential():
    ks_pl = fit_power_law(pareto(2.5, seed=1))["ks"]
    ks_exp = fit_power_law(np.random.default_rng(1).exponential(size=5000))["ks"]
    assert ks_pl < 0.03 and ks_exp > 2 * ks_pl


def test_top_share_hand_made():
    v = np.array([10., 5., -3., 2., 1., 1., 0., 0., -8., 1.])    # positive total 20
    assert math.isclose(top_share(v, 0.1), 0.5)
    assert math.isclose(top_share(v, 0.25), 17 / 20)              # ceil(2.5) = 3 sequences
    assert math.isclose(top_share(torch.tensor(v), 1.0), 1.0)
    np.testing.assert_allclose(top_share(np.stack([v, -v]), 0.1), [0.5, 8 / 11])


def test_html_escaping_spans_and_colours():
    toks = ["Ġhi", "<script>alert('x')</script>", "Ġ0", "Ċ"]
    vals = [0.0, -2.0, 1.0, 0.5]
    h = token_heatmap_html(toks, vals, title="<b>t</b>")
    assert "<script>" not in h and "&lt;script&gt;" in h and "&lt;b&gt;t&lt;/b&gt;" in h
    assert h.count("<span") == len(toks)
    bgs = [tuple(map(int, m)) for m in re.findall(r"background-color:rgb\((\d+),(\d+),(\d+)\)", h)]
    assert bgs[0] == (255, 255, 255) and bgs[1] == NEG_RGB
    assert bgs[2] == tuple(int(round(255 + 0.5 * (c - 255))) for c in POS_RGB)
    assert format(-2.0, "+.3g") in re.findall(r'title="([^"]*)"', h)[1]


def test_ansi_codes():
    a = token_heatmap_ansi(["x", "y"], [2.0, -2.0], legend=False)
    assert a == (f"\x1b[48;2;{POS_RGB[0]};{POS_RGB[1]};{POS_RGB[2]}m\x1b[38;2;255;255;255mx\x1b[0m"
                 f"\x1b[48;2;{NEG_RGB[0]};{NEG_RGB[1]};{NEG_RGB[2]}m\x1b[38;2;255;255;255my\x1b[0m")


def test_is_spurious():
    assert is_spurious([0.0, 5.0, 0.0, 0.0])
    assert not is_spurious(np.ones(4))                             # 1/sqrt(4) = 0.5
    np.testing.assert_array_equal(is_spurious(np.array([[3.0, 4.0, 0.0], [1.0, 1.0, 1.0]])), [True, False])


def test_layer_shares_and_top_table():
    d = {"h.0.mlp": np.array([[1.0, 3.0]]), "h.1.mlp": np.array([[2.0, 2.0]])}
    np.testing.assert_allclose(layer_shares(d).to_numpy(), [[4 / 8, 4 / 8]])
    np.testing.assert_allclose(layer_shares(d, top_k=1).to_numpy(), [[3 / 5, 2 / 5]])
    t = top_table(torch.tensor([1.0, 5.0, -2.0, 3.0]), ["a", "b", "c", "d"], k=2, n_train=10, style=False)
    assert list(t["index"]) == [1, 3] and list(t["text"]) == ["b", "d"]
    np.testing.assert_allclose(t["nats"], [0.5, 0.3])
