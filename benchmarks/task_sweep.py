"""Downstream accuracy vs sparsity for many methods: one ``moyu tasks`` grid, resumable.

    python benchmarks/task_sweep.py --model smollm2-135m --limit 30 --threads 1 \\
        --out docs/results/tasks/smollm2-135m-sweep

The dense pass runs once; every (method, sparsity) cell calibrates the method (the
defaults of ``moyu tasks``: 8,192 tokens of the built-in calibration split, windows of
256 dense + 256 scored positions) and runs the sparse pass over the same items, so each
difference is paired item by item. After every cell the finished cells are saved to
``OUT/cells.json`` and the report is rewritten (``OUT/task_sweep.json``, ``.md``,
``.png``), each through a temp file; a rerun with the same model, tasks and limit skips
the cells already there. Several workers may share OUT (say one per ``--sparsities``
value): the files are written under a lock, merging what the others saved.

The main score of a task is ``acc_norm`` where lm-eval defines it, else ``acc``; the
average is the unweighted mean over tasks. The standard error of a cell's average change
is that of the mean of the per-task paired differences: sqrt(sum of squared per-task
paired standard errors) / number of tasks (tasks are independent item sets).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import sys
import time
from pathlib import Path

METHODS = ("oracle", "cats", "teal", "griffin", "tda", "dejavu", "sketch", "sketch-reuse")
SPARSITIES = (0.3, 0.5, 0.7)


def _main_metric(summary: dict) -> str:
    return "acc_norm" if "acc_norm" in summary else "acc"


def run_pass(model, tok, configs, names, limit, modifier, desc) -> dict:
    """One harness pass -> {"summary": {task: metrics}, "per_doc": {task: {key: main score}}}."""
    from moyu import tasks as T
    t0 = time.perf_counter()
    raw = T.run_harness(model, tok, configs, limit, modifier, desc=desc, progress=True)
    summary = T._summaries(raw, names)
    per_doc = {n: {f"{k[0]}:{k[1]}": v for k, v in T._per_doc(raw, n, _main_metric(summary[n])).items()}
               for n in names}
    return {"summary": summary, "per_doc": per_doc, "seconds": round(time.perf_counter() - t0, 1)}


def compare(dense: dict, cell: dict) -> dict:
    """Per-task and average paired difference (cell minus dense) of the main score."""
    from moyu.tasks import _stderr
    rows, ses = {}, []
    for task, d in dense["per_doc"].items():
        s = cell["per_doc"][task]
        diffs = [s[k] - d[k] for k in d if k in s]
        se = _stderr(diffs)
        rows[task] = {"dense": sum(d.values()) / len(d), "sparse": sum(s.values()) / len(s),
                      "diff": sum(diffs) / len(diffs), "diff_stderr": se, "n": len(diffs)}
        ses.append(se)
    n = len(rows)
    return {"tasks": rows,
            "average": {"dense": sum(r["dense"] for r in rows.values()) / n,
                        "sparse": sum(r["sparse"] for r in rows.values()) / n,
                        "diff": sum(r["diff"] for r in rows.values()) / n,
                        "diff_stderr": math.sqrt(sum(se ** 2 for se in ses)) / n}}


def report(state: dict) -> dict:
    """The summary of every finished cell (what task_sweep.json holds besides the config)."""
    dense = state["cells"].get("dense")
    out = {k: state[k] for k in ("model", "tasks", "limit", "threads", "calib_tokens")}
    out["commands"] = state["commands"]
    if dense is None:
        return out
    out["dense"] = {"average": compare(dense, dense)["average"]["dense"], "summary": dense["summary"], "seconds": dense["seconds"]}
    out["cells"] = []
    for key, cell in state["cells"].items():
        if key == "dense":
            continue
        method, s = key.rsplit("@", 1)
        c = compare(dense, cell)
        out["cells"].append({"method": method, "target": float(s), "measured": cell["measured"],
                             "weights_skipped": cell["weights_skipped"], "seconds": cell["seconds"],
                             "calib_seconds": cell["calib_seconds"], **c})
    return out


def _ordered(methods) -> list[str]:
    """Distinct method names, the built-in grid's order first."""
    seen = list(dict.fromkeys(methods))
    return sorted(seen, key=lambda m: (METHODS.index(m) if m in METHODS else len(METHODS), seen.index(m)))


def to_markdown(rep: dict) -> str:
    """Table: average accuracy change (paired SE) per method and sparsity; per task at 50 %."""
    if "dense" not in rep:
        return "(no finished cells yet)\n"
    cells = {(c["method"], c["target"]): c for c in rep["cells"]}
    targets = sorted({t for _, t in cells})
    methods = _ordered(m for m, _ in cells)
    lines = ["Made by " + ("the workers " if len(rep["commands"]) > 1 else "") +
             ", ".join(f"`{c}`" for c in rep["commands"]) + ".", "",
             f"Model {rep['model']}, {len(rep['tasks'])} tasks x first {rep['limit']} items, zero-shot. "
             f"Dense average (acc_norm where defined, else acc): {rep['dense']['average']:.3f}.", "",
             "Average accuracy change vs dense in points, ± the paired standard error "
             "(measured sparsity on the scored positions in brackets):", "",
             "| method | " + " | ".join(f"{t:.0%}" for t in targets) + " |",
             "|---|" + "---|" * len(targets)]
    for m in methods:
        row = [m]
        for t in targets:
            c = cells.get((m, t))
            row.append("-" if c is None else f"{100 * c['average']['diff']:+.1f} ± "
                       f"{100 * c['average']['diff_stderr']:.1f} ({c['measured']:.2f})")
        lines.append("| " + " | ".join(row) + " |")
    at50 = [(m, cells[(m, 0.5)]) for m in methods if (m, 0.5) in cells]
    if at50:
        tasks = list(at50[0][1]["tasks"])
        lines += ["", "Per task at 50 %: dense accuracy, then the change in points per method "
                      "(± paired standard error):", "",
                  "| task | n | dense | " + " | ".join(m for m, _ in at50) + " |",
                  "|---|---|---|" + "---|" * len(at50)]
        for t in tasks:
            d = at50[0][1]["tasks"][t]
            lines.append(f"| {t} | {d['n']} | {d['dense']:.3f} | " + " | ".join(
                f"{100 * c['tasks'][t]['diff']:+.1f} ± {100 * c['tasks'][t]['diff_stderr']:.1f}"
                for _, c in at50) + " |")
    secs = rep["dense"]["seconds"] + sum(c["seconds"] + c["calib_seconds"] for c in rep["cells"])
    lines += ["", f"Wall time of the finished cells: {secs / 60:.0f} min (dense pass "
                  f"{rep['dense']['seconds'] / 60:.1f} min)."]
    return "\n".join(lines) + "\n"


def plot(rep: dict, path: Path) -> None:
    """Average accuracy vs target sparsity, one line per method from the dense point at 0."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moyu.atomic import atomic_path
    if not rep.get("cells"):
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    d = rep["dense"]["average"]
    for m in _ordered(c["method"] for c in rep["cells"]):
        pts = sorted((c["target"], c["average"]["sparse"], c["average"]["diff_stderr"])
                     for c in rep["cells"] if c["method"] == m)
        ax.errorbar([0.0] + [p[0] for p in pts], [d] + [p[1] for p in pts],
                    yerr=[0.0] + [p[2] for p in pts], marker="o", capsize=2, label=m)
    ax.axhline(d, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("target sparsity")
    ax.set_ylabel(f"average accuracy ({len(rep['tasks'])} tasks)")
    ax.set_title(f"{rep['model']}: first {rep['limit']} items per task (bars: paired SE of the change)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


@contextlib.contextmanager
def _locked(out: Path):
    """Exclusive access to OUT's files: several workers (e.g. one per sparsity) may share OUT."""
    fd = os.open(out, os.O_RDONLY)   # a lock on the folder itself: no lock file left behind
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def merge_saved(state: dict, out: Path) -> None:
    """Add the cells other runs saved in ``OUT/cells.json`` (refused if the grid differs)."""
    from moyu import MoyuError
    saved = out / "cells.json"
    if not saved.is_file():
        return
    old = json.loads(saved.read_text())
    if any(old.get(k) != state[k] for k in ("model", "tasks", "limit", "calib_tokens")):
        raise MoyuError(f"{saved} holds another grid (model, tasks, limit or calibration differ): "
                        "pass another --out or delete it")
    for key, cell in old["cells"].items():
        state["cells"].setdefault(key, cell)
    mine = state["commands"]
    state["commands"] = list(dict.fromkeys(old.get("commands", [old["command"]] if "command" in old else [])
                                           + mine))


def write_all(state: dict, out: Path) -> None:
    """Merge with the saved cells, save them and rewrite the report files, each atomically."""
    from moyu.atomic import write_json_atomic, write_text_atomic
    with _locked(out):
        merge_saved(state, out)
        write_json_atomic(out / "cells.json", state)
        rep = report(state)
        write_text_atomic(out / "task_sweep.json", json.dumps(rep, indent=1) + "\n")
        write_text_atomic(out / "task_sweep.md", to_markdown(rep))
        plot(rep, out / "task_sweep.png")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--sparsities", default=",".join(str(s) for s in SPARSITIES))
    ap.add_argument("--tasks", help="default: the nine multiple-choice tasks")
    ap.add_argument("--limit", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--calib-text", metavar="FILE", help="calibrate on this text (default: the built-in split)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--report", action="store_true",
                    help="only rewrite the report files from OUT/cells.json")
    ap.add_argument("--by-method", action="store_true",
                    help="every sparsity of a method before the next method (default: every "
                         "method at one sparsity before the next sparsity)")
    args = ap.parse_args(argv)

    import torch
    from moyu import MoyuError, load
    from moyu import tasks as T
    from moyu.evaluate import Windows
    from moyu.methods import calibrate, calibration_source, check_sparsity, get_method, sparsify

    torch.set_num_threads(args.threads)
    names = T.check_request(args.tasks, None, args.limit)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        get_method(m)
    sparsities = [check_sparsity(float(s)) for s in args.sparsities.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"model": args.model, "tasks": names, "limit": args.limit, "threads": args.threads,
              "calib_tokens": args.calib_tokens,
              "commands": ["python benchmarks/task_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv)]}
    state = {**config, "cells": {}}
    if args.report:            # rewrite the report from the saved cells (their own grid); compute nothing
        saved = out / "cells.json"
        if not saved.is_file():
            raise MoyuError(f"{saved} not found: run the grid first")
        with _locked(out):
            state = json.loads(saved.read_text())
        state.setdefault("commands", [state.pop("command", "?")])
        write_all(state, out)
        return 0
    with _locked(out):
        merge_saved(state, out)
    model, tok = load(args.model, verbose=False)
    configs = [c for n in names for c in T.task_configs(n)]
    T._offline()
    T._quiet_lm_eval()
    if "dense" not in state["cells"]:
        state["cells"]["dense"] = run_pass(model, tok, configs, names, args.limit, None, "dense")
        write_all(state, out)
    ids = calibration_source(tok, args.calib_tokens, text_file=args.calib_text)
    order = ([(m, s) for m in methods for s in sparsities] if args.by_method else
             [(m, s) for s in sparsities for m in methods])
    for m, s in order:
        key = f"{m}@{s}"
        with _locked(out):
            merge_saved(state, out)   # another worker may have finished it
        if key in state["cells"]:
            continue
        t0 = time.perf_counter()
        prof = calibrate(model, ids(m), method=m, sparsity=s, windows=Windows(prompt=256, scored=256))
        calib_s = time.perf_counter() - t0
        sp = sparsify(model, prof)
        cell = run_pass(model, tok, configs, names, args.limit, sp, f"{m} {s:.0%}")
        meas = sp.measured()
        cell.update(measured=round(meas["sparsity"], 4), weights_skipped=round(meas["weights_skipped"], 4),
                    calib_seconds=round(calib_s, 1))
        state["cells"][key] = cell
        write_all(state, out)
        print(f"{key}: {100 * compare(state['cells']['dense'], cell)['average']['diff']:+.1f} points "
              f"(measured {meas['sparsity']:.3f}, {cell['seconds'] + calib_s:.0f} s)", file=sys.stderr)
    write_all(state, out)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001 - one line for moyu's own errors
        from moyu import MoyuError
        if isinstance(e, MoyuError):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        raise
