"""Block-bootstrap intervals: they contain the point estimate, shrink with more tokens, repeat
for a seed, and the paired interval of dense against itself is exactly zero."""
from __future__ import annotations

import math

import numpy as np
import pytest

from moyu import MoyuError
from moyu.stats import Bootstrap, block_sums, intervals


def _tokens(n, seed=0, shift=0.0):
    """Per-token NLLs with slow drift (neighbouring tokens correlated), KL and 0/1 agreement."""
    rng = np.random.default_rng(seed)
    drift = np.repeat(rng.normal(0, 0.5, n // 64 + 1), 64)[:n]
    nll_d = np.abs(3 + drift + rng.normal(0, 1.5, n))
    nll = nll_d + shift + np.abs(rng.normal(0, 0.3, n))
    kl = np.abs(rng.normal(0.1, 0.05, n))
    agree = (rng.random(n) < 0.8).astype(float)
    return nll, nll_d, kl, agree


def test_block_sums_keep_a_short_last_block():
    assert block_sums(np.arange(10.0), 4).tolist() == [6.0, 22.0, 17.0]
    assert block_sums(np.ones(8), 4).tolist() == [4.0, 4.0]


def test_intervals_contain_the_point_estimates():
    nll, nll_d, kl, agree = _tokens(4096)
    ci = intervals(nll, nll_d, kl, agree)
    point = {"ppl_ci": math.exp(nll.mean()), "dense_ppl_ci": math.exp(nll_d.mean()),
             "ppl_ratio_ci": math.exp(nll.mean() - nll_d.mean()),
             "ppl_diff_ci": math.exp(nll.mean()) - math.exp(nll_d.mean()),
             "kl_ci": kl.mean(), "top1_agree_ci": agree.mean()}
    assert set(ci) == set(point)
    for k, v in point.items():
        lo, hi = ci[k]
        assert lo < v < hi, k


def test_intervals_shrink_with_more_tokens():
    small = intervals(*_tokens(1024))
    large = intervals(*_tokens(16384))
    for k in small:
        assert large[k][1] - large[k][0] < 0.6 * (small[k][1] - small[k][0]), k


def test_intervals_repeat_for_a_seed_and_move_with_it():
    data = _tokens(2048)
    assert intervals(*data, boot=Bootstrap(seed=3)) == intervals(*data, boot=Bootstrap(seed=3))
    assert intervals(*data, boot=Bootstrap(seed=3)) != intervals(*data, boot=Bootstrap(seed=4))


def test_paired_interval_of_dense_against_itself_is_exactly_zero():
    _, nll_d, _, _ = _tokens(3000)
    ci = intervals(nll_d.copy(), nll_d, np.zeros(3000), np.ones(3000))
    assert ci["ppl_ratio_ci"] == [1.0, 1.0]
    assert ci["ppl_diff_ci"] == [0.0, 0.0]
    assert ci["kl_ci"] == [0.0, 0.0] and ci["top1_agree_ci"] == [1.0, 1.0]
    assert ci["ppl_ci"] == ci["dense_ppl_ci"] and ci["ppl_ci"][0] < ci["ppl_ci"][1]


def test_paired_ratio_is_tighter_than_unpaired_ppl():
    """Resampling the same blocks for both models cancels the text's own difficulty."""
    nll, nll_d, kl, agree = _tokens(4096, shift=0.05)
    ci = intervals(nll, nll_d, kl, agree)
    rel_ppl = (ci["ppl_ci"][1] - ci["ppl_ci"][0]) / math.exp(nll.mean())
    rel_ratio = ci["ppl_ratio_ci"][1] - ci["ppl_ratio_ci"][0]
    assert rel_ratio < 0.5 * rel_ppl


def test_bad_settings_and_mismatched_arrays_are_one_line():
    with pytest.raises(MoyuError, match="block >= 1"):
        Bootstrap(block=0)
    with pytest.raises(MoyuError, match="nll_dense has 3 tokens"):
        intervals(np.ones(4), np.ones(3))
    with pytest.raises(MoyuError, match="no scored tokens"):
        intervals(np.zeros(0))
