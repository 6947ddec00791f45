"""Sweep tables: intervals in the Markdown and CSV, and methods compared at equal achieved
sparsity by interpolation along each method's own curve (flagged where it extrapolates)."""
from __future__ import annotations

import math

import pytest

from moyu.sweep import MAX_EXTRAPOLATION, at_targets, csv_row, to_markdown


def _row(method, target, sparsity, ratio, kl, ci=True):
    r = {"method": method, "target": target, "sparsity": sparsity, "weights_skipped": 0.0,
         "ppl": 10 * ratio, "dense_ppl": 10.0, "ppl_ratio": ratio, "kl": kl, "top1_agree": 0.9,
         "calib_seconds": 0.0, "eval_seconds": 0.0}
    if ci:
        r.update(ppl_ratio_ci=[ratio * 0.95, ratio * 1.05], kl_ci=[kl * 0.9, kl * 1.1],
                 ppl_ci=[9.0 * ratio, 11.0 * ratio], top1_agree_ci=[0.88, 0.92])
    return r


def test_interpolates_log_ratio_and_kl_between_neighbouring_points():
    rows = [_row("a", 0.3, 0.28, 1.10, 0.1), _row("a", 0.5, 0.52, 1.50, 0.3)]
    by = {p["target"]: p for p in at_targets(rows, grid=[0.4])}
    p = by[0.4]
    assert p["between"] == [0.28, 0.52] and not p["extrapolated"]
    assert math.isclose(p["ppl_ratio"], math.sqrt(1.10 * 1.50), rel_tol=1e-9)   # midpoint in log space
    assert math.isclose(p["kl"], 0.2, rel_tol=1e-9)
    assert p["ppl_ratio_ci"][0] < p["ppl_ratio"] < p["ppl_ratio_ci"][1]


def test_overshooting_a_target_neither_helps_nor_hurts():
    """Two methods on the same curve, measured at different achieved sparsities, tie at the target."""
    curve = lambda s: math.exp(4 * s)   # noqa: E731
    rows = [_row("under", t, s, curve(s), s) for t, s in ((0.3, 0.29), (0.5, 0.47), (0.7, 0.69))]
    rows += [_row("over", t, s, curve(s), s) for t, s in ((0.3, 0.32), (0.5, 0.53), (0.7, 0.72))]
    pts = {(p["method"], p["target"]): p for p in at_targets(rows)}
    for t in (0.5,):
        assert math.isclose(pts[("under", t)]["ppl_ratio"], pts[("over", t)]["ppl_ratio"], rel_tol=1e-9)
    assert pts[("under", 0.7)]["extrapolated"] and pts[("over", 0.3)]["extrapolated"]
    assert math.isclose(pts[("over", 0.3)]["extrapolated_by"], 0.02, abs_tol=1e-9)
    assert not pts[("under", 0.3)]["extrapolated"] and not pts[("over", 0.7)]["extrapolated"]


def test_far_extrapolation_and_single_points_give_no_value():
    rows = [_row("relu", 0.3, 0.645, 70.0, 4.0), _row("relu", 0.7, 0.72, 80.0, 4.5),
            _row("one", 0.5, 0.5, 1.2, 0.1)]
    pts = {(p["method"], p["target"]): p for p in at_targets(rows, grid=[0.3, 0.5, 0.7])}
    assert pts[("relu", 0.3)]["ppl_ratio"] is None and 0.3 + MAX_EXTRAPOLATION < 0.645
    assert pts[("relu", 0.7)]["ppl_ratio"] is not None
    assert pts[("one", 0.5)]["ppl_ratio"] == pytest.approx(1.2)
    assert pts[("one", 0.3)]["ppl_ratio"] is None


def test_markdown_prints_intervals_and_the_equal_sparsity_table():
    rows = [_row("a", 0.3, 0.30, 1.1, 0.1), _row("a", 0.5, 0.50, 1.5, 0.3),
            _row("old", 0.3, 0.31, 1.2, 0.2, ci=False), _row("old", 0.5, 0.49, 1.6, 0.4, ci=False)]
    md = to_markdown(rows)
    assert "| 1.100 [1.045, 1.155] |" in md and "| 1.200 | 0.2000 |" in md
    assert "At equal achieved sparsity" in md and "(extrap. 0.010)" in md
    assert csv_row(rows[0])["ppl_ratio_lo"] == pytest.approx(1.045) and csv_row(rows[2])["kl_hi"] is None
