"""Quality sweeps: many methods x many sparsities on one protocol, one table and one plot.

Every point calibrates on the ``calib`` split and is scored on held-out text with the
same windows; dense logits are computed once and shared by all points.
"""
from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .atomic import write_bytes_atomic
from .errors import MoyuError
from .evaluate import DenseReference, Windows, evaluate

COLUMNS = ["method", "target", "sparsity", "weights_skipped", "ppl", "dense_ppl", "ppl_ratio",
           "kl", "top1_agree", "calib_seconds", "eval_seconds"]
# metrics whose 95 % bootstrap interval a row carries as ``<metric>_ci: [low, high]``
CI_METRICS = ["ppl", "ppl_ratio", "kl", "top1_agree"]
CI_COLUMNS = [f"{m}_{end}" for m in CI_METRICS for end in ("lo", "hi")]


def run_sweep(model: nn.Module, calib_ids: "torch.Tensor | Callable[[str], torch.Tensor]",
              eval_ids: torch.Tensor, methods: list[str],
              sparsities: list[float], windows: Windows = Windows(), progress: bool = True,
              reference: DenseReference | None = None, **params: Any) -> list[dict[str, Any]]:
    """Calibrate and evaluate every (method, sparsity); returns one row per point.

    ``reference``: dense logits to share with other sweeps of the same model and text
    (each dense window is then computed once per process, not once per sweep).
    ``calib_ids``: one calibration text for every method, or ``method -> ids``
    (:func:`moyu.methods.calibration_source`, which samples as each method wants).
    """
    import time

    from tqdm import tqdm

    from .methods import calibrate, check_sparsity, get_method, sparsify

    for m in methods:
        get_method(m).check(model)
    for s in sparsities:
        check_sparsity(s)
    ref = reference if reference is not None else DenseReference()
    rows = []
    points = [(m, s) for m in methods for s in sparsities]
    bar = tqdm(points, desc="sweep", disable=not progress)
    for m, s in bar:
        bar.set_postfix_str(f"{m} @ {s:.2f}")
        t0 = time.perf_counter()
        ids = calib_ids(m) if callable(calib_ids) else calib_ids
        prof = calibrate(model, ids, method=m, sparsity=s, windows=windows, progress=progress, **params)
        t1 = time.perf_counter()
        res = evaluate(model, eval_ids, windows, modifier=sparsify(model, prof), reference=ref)
        d = res.to_dict()
        rows.append({"method": m, "target": s, "sparsity": d["sparsity"],
                     "weights_skipped": d["weights_skipped"], "ppl": d["ppl"],
                     "dense_ppl": d["dense_ppl"], "ppl_ratio": d["ppl"] / d["dense_ppl"],
                     "kl": d["kl"], "top1_agree": d["top1_agree"],
                     "calib_seconds": t1 - t0, "eval_seconds": d["seconds"],
                     **{f"{k}_ci": d[f"{k}_ci"] for k in CI_METRICS if f"{k}_ci" in d}})
    return rows


def merge_rows(out: str | Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """``rows`` plus the rows of *other* methods in ``out/sweep.json`` (a previous sweep).

    The old sweep must be of the same model and text with the same dense perplexity;
    otherwise the rows would not be comparable and this is refused.
    """
    path = Path(out) / "sweep.json"
    if not path.exists():
        return rows
    try:
        old = json.loads(path.read_text())
        old_rows = old["rows"]
    except (OSError, ValueError, KeyError) as e:
        raise MoyuError(f"cannot merge into {path}: not a moyu sweep ({e}); drop --merge") from None
    if any(old.get(k) != v for k, v in meta.items()) or (
            old_rows and rows and abs(old_rows[0]["dense_ppl"] - rows[0]["dense_ppl"]) > 1e-3 * rows[0]["dense_ppl"]):
        raise MoyuError(f"cannot merge into {path}: it was measured on another model, text or protocol; "
                        "use a new --out")
    new = {r["method"] for r in rows}
    return [r for r in old_rows if r["method"] not in new] + rows


def _interp(x: float, x0: float, x1: float, y0: float, y1: float) -> float:
    return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)


EDGE_TOL = 0.0025     # a target this close outside a method's measured range is not flagged
MAX_EXTRAPOLATION = 0.05   # beyond this distance no value is given


def at_targets(rows: list[dict[str, Any]], grid: list[float] | None = None) -> list[dict[str, Any]]:
    """Every method's quality at exactly each target sparsity, along its own measured curve.

    A method's points are ordered by *achieved* (held-out) sparsity; at each target of
    ``grid`` (default: every target of the sweep) log(ppl ratio) and KL are interpolated
    linearly between the two measured points around it, so overshooting a target neither
    helps nor hurts a method. Outside the measured range the two nearest points are
    extended and the entry says ``extrapolated: true`` with the distance in
    ``extrapolated_by`` (not flagged within ``EDGE_TOL``); farther than
    ``MAX_EXTRAPOLATION``, or for a method with one point elsewhere, no value is given. Intervals are interpolated the same way from the points' own
    (an approximation: the points' intervals are not independent draws).
    """
    import math

    grid = sorted({r["target"] for r in rows}) if grid is None else sorted(grid)
    out = []
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r for r in rows if r["method"] == m), key=lambda r: r["sparsity"])
        for t in grid:
            e: dict[str, Any] = {"method": m, "target": t}
            if len(pts) < 2:
                same = [r for r in pts if abs(r["sparsity"] - t) < 1e-9]
                if not same:
                    out.append({**e, "ppl_ratio": None, "kl": None, "extrapolated": True, "between": None})
                    continue
                lo_r = hi_r = same[0]
            else:
                i = next((k for k in range(len(pts) - 1) if pts[k + 1]["sparsity"] >= t), len(pts) - 2)
                lo_r, hi_r = pts[i], pts[i + 1]
            x0, x1 = lo_r["sparsity"], hi_r["sparsity"]
            e["between"] = [x0, x1]
            dist = max(x0 - t, t - x1, 0.0)
            e["extrapolated"], e["extrapolated_by"] = dist > EDGE_TOL, round(dist, 6)
            if dist > MAX_EXTRAPOLATION:
                out.append({**e, "ppl_ratio": None, "kl": None})
                continue
            e["ppl_ratio"] = math.exp(_interp(t, x0, x1, math.log(lo_r["ppl_ratio"]), math.log(hi_r["ppl_ratio"])))
            e["kl"] = _interp(t, x0, x1, lo_r["kl"], hi_r["kl"])
            if "ppl_ratio_ci" in lo_r and "ppl_ratio_ci" in hi_r:
                e["ppl_ratio_ci"] = [math.exp(_interp(t, x0, x1, math.log(lo_r["ppl_ratio_ci"][j]),
                                                      math.log(hi_r["ppl_ratio_ci"][j]))) for j in (0, 1)]
            if "kl_ci" in lo_r and "kl_ci" in hi_r:
                e["kl_ci"] = [_interp(t, x0, x1, lo_r["kl_ci"][j], hi_r["kl_ci"][j]) for j in (0, 1)]
            out.append(e)
    return out


def at_targets_markdown(points: list[dict[str, Any]]) -> str:
    """Interpolated points as a table: perplexity change [interval] and KL per target."""
    grid = sorted({p["target"] for p in points})
    lines = ["| method | " + " | ".join(f"@ {t:.2f}: ppl change | KL" for t in grid) + " |",
             "|---|" + "---|---|" * len(grid)]
    by = {(p["method"], p["target"]): p for p in points}
    for m in dict.fromkeys(p["method"] for p in points):
        cells = [m]
        for t in grid:
            p = by[(m, t)]
            if p["ppl_ratio"] is None:
                cells += ["-", "-"]
                continue
            flag = f" (extrap. {p['extrapolated_by']:.3f})" if p["extrapolated"] else ""
            ci = "" if "ppl_ratio_ci" not in p else " [{:+.1f}, {:+.1f}]".format(
                *(100 * (v - 1) for v in p["ppl_ratio_ci"]))
            cells += [f"{100 * (p['ppl_ratio'] - 1):+.1f} %{ci}{flag}", f"{p['kl']:.4f}{flag}"]
        lines.append("| " + " | ".join(cells) + " |")
    return ("\n## At equal achieved sparsity\n\nEach method's log(ppl ratio) and KL interpolated "
            "linearly between its two measured points around the target (achieved held-out sparsity); "
            f"`(extrap. d)`: the target lies d outside the method's measured range and the nearest two "
            f"points were extended (not flagged within {EDGE_TOL}; `-`: more than {MAX_EXTRAPOLATION} "
            "outside). Intervals interpolated from the points' own.\n\n" + "\n".join(lines) + "\n")


def _with_ci(r: dict[str, Any], key: str, fmt: str) -> str:
    """``value [low, high]``, or the value alone for rows measured before intervals."""
    ci = r.get(f"{key}_ci")
    v = format(r[key], fmt)
    return v if ci is None else f"{v} [{format(ci[0], fmt)}, {format(ci[1], fmt)}]"


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The sweep as a Markdown table; brackets hold 95 % block-bootstrap intervals."""
    head = "| method | target | sparsity | weights skipped | ppl | dense ppl | ppl ratio | KL | top-1 agree |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['method']} | {r['target']:.2f} | {r['sparsity']:.3f} | "
                     f"{r['weights_skipped']:.3f} | {_with_ci(r, 'ppl', '.3f')} | {r['dense_ppl']:.3f} | "
                     f"{_with_ci(r, 'ppl_ratio', '.3f')} | {_with_ci(r, 'kl', '.4f')} | "
                     f"{_with_ci(r, 'top1_agree', '.3f')} |")
    note = ("\n[low, high]: 95 % block-bootstrap interval (blocks of 128 scored tokens); the ppl ratio's "
            "is paired with dense (the same blocks resampled for both)\n" if any("ppl_ratio_ci" in r for r in rows)
            else "")
    many = any(sum(1 for q in rows if q["method"] == r["method"]) > 1 for r in rows)
    return "\n".join(lines) + "\n" + note + (at_targets_markdown(at_targets(rows)) if many else "")


def csv_row(r: dict[str, Any]) -> dict[str, Any]:
    """A row flattened for CSV: intervals as ``<metric>_lo`` / ``<metric>_hi`` columns."""
    out = {k: r.get(k) for k in COLUMNS}
    for m in CI_METRICS:
        ci = r.get(f"{m}_ci") or [None, None]
        out[f"{m}_lo"], out[f"{m}_hi"] = ci
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}


def plot(rows: list[dict[str, Any]], title: str) -> bytes:
    """PNG: perplexity ratio and KL against achieved sparsity, one line per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r for r in rows if r["method"] == m), key=lambda r: r["sparsity"])
        xs = [r["sparsity"] for r in pts]
        for ax, key, floor in ((axes[0], "ppl_ratio", 0.0), (axes[1], "kl", 1e-5)):
            line, = ax.plot(xs, [max(r[key], floor) for r in pts], marker="o", label=m)
            if all(f"{key}_ci" in r for r in pts):   # 95 % bootstrap band
                ax.fill_between(xs, [max(r[f"{key}_ci"][0], floor) for r in pts],
                                [max(r[f"{key}_ci"][1], floor) for r in pts], color=line.get_color(),
                                alpha=0.18, lw=0)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("perplexity / dense perplexity")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("KL(dense || method), nats/token")
    for ax in axes:
        ax.set_xlabel("achieved sparsity (held-out text)")
        ax.grid(alpha=0.3)
    axes[0].axhline(1.10, color="grey", ls="--", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_sweep(rows: list[dict[str, Any]], out: str | Path, title: str, meta: dict[str, Any]) -> list[Path]:
    """Write sweep.csv, sweep.md, sweep.json and sweep.png into ``out`` (each atomically)."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out, delete=True)
        probe.close()
    except OSError as e:
        raise MoyuError(f"cannot write to {out}: {e.strerror}; choose a writable --out") from None
    csv_buf = io.StringIO()
    w = csv.DictWriter(csv_buf, fieldnames=COLUMNS + CI_COLUMNS)
    w.writeheader()
    for r in rows:
        w.writerow(csv_row(r))
    files = {
        "sweep.csv": csv_buf.getvalue().encode(),
        "sweep.md": (f"# {title}\n\n" + to_markdown(rows)).encode(),
        "sweep.json": json.dumps({**meta, "rows": rows, "at_target": at_targets(rows)}, indent=2).encode(),
        "sweep.png": plot(rows, title),
    }
    return [write_bytes_atomic(out / name, blob) for name, blob in files.items()]
