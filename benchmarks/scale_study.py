"""The scale study: how over-activation and every method change from 135M to 1.5B.

One resumable script for issue 11's grid. Per model (built-ins that are installed):

* ``analyze``: ``moyu analyze`` with default settings (one report per model);
* ``sweep-<corpus>-<method>``: calibrate + evaluate the method at each sparsity on the
  prose and the code corpus (``moyu sweep``'s protocol; one cell per method so an
  interrupted run loses at most one method's points);
* ``bench``: decode speed at batch 1 (HF, moyu dense, moyu ``sketch-reuse`` 50 %, and the
  llama.cpp peer when ``llama-cpp-python`` is installed), in fp32 (cell ``bench``) or the
  ``--bench-weights`` format (cell ``bench-<format>``).

Every finished cell is a JSON file under ``OUT/cells/<model>/`` (written, then renamed);
a rerun skips it, so hours of work survive interruptions. ``--report`` (also run at the
end) gathers the cells into ``OUT/scale.json``, ``OUT/scale.md`` and ``OUT/scale.png``:
each MOYU statistic and each method's perplexity change at 50 % against parameter count.

    python benchmarks/scale_study.py [--models smollm2-135m,...] [--cells analyze,sweep,bench]
        [--corpora prose,code] [--methods ...] [--sparsities 0.3,0.5,0.7] [--tokens 2305]
        [--calib-tokens 8192] [--bench-tokens 128] [--bench-runs 3] [--bench-weights fp32|bf16|int8|int4]
        [--bench-no-hf] [--out docs/results/scale] [--others-to docs/results/scale-3070] [--report]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

MODELS = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
REPORT_SPARSITY = 0.5   # the sparsity of the study's per-model comparison (the --out cells)
METHODS = ("oracle", "cats", "teal", "griffin", "tda", "dejavu", "sketch", "sketch-reuse")
# the order of docs/methods.md: rows of the sweep folders follow it
SWEEP_ORDER = ("oracle", "cats", "cett", "teal", "wina", "griffin", "tda", "static", "dejavu",
               "dejavu-linear", "moe", "relu", "sketch", "sketch-reuse")

# name in the table/figure -> (report section, how to read it from the section's "mean" or
# from one of its "layers" entries)
STATISTICS: dict[str, tuple[str, Callable[[dict], float]]] = {
    "share of neurons for 90 % of the output": ("overactivation", lambda b: b["share_90"]),
    "same, iid Gaussian reference": ("overactivation", lambda b: b["gaussian_share_90"]),
    "sparsity at CETT 0.2": ("overactivation", lambda b: b["sparsity_at_cett_0.2"]),
    "history Jaccard, natural vs natural (k 0.3)": ("history", lambda b: b["0.3"]["cross_natural"]),
    "predictor recall (k 0.3, held out)": ("predictor", lambda b: b["0.3"]["recall"]),
    "inertia overlap, natural": ("inertia", lambda b: b["overlap_natural"]),
    "inertia overlap, random": ("inertia", lambda b: b["overlap_random"]),
}


def statistic(report: dict, name: str) -> float:
    """The layer mean of statistic ``name`` in an analyze report."""
    section, f = STATISTICS[name]
    return f(report[section]["mean"])


def statistic_range(report: dict, name: str) -> tuple[float, float]:
    """The lowest and highest per-layer value of statistic ``name`` (its spread over layers)."""
    section, f = STATISTICS[name]
    vals = [f(layer) for layer in report[section]["layers"]]
    return min(vals), max(vals)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (temp file, then rename)."""
    from moyu.atomic import write_json_atomic
    write_json_atomic(path, obj, indent=1)


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def installed_models(wanted: list[str]) -> list[str]:
    """The wanted built-ins that are installed; the others are named with their install command."""
    from moyu.models import list_models
    rows = {r["name"]: r for r in list_models()}
    out = []
    for name in wanted:
        if name not in rows:
            sys.exit(f"scale_study: unknown model '{name}': use built-ins {', '.join(rows)}")
        if rows[name]["installed"]:
            out.append(name)
        else:
            print(f"skip {name}: not installed ({rows[name]['install']})", flush=True)
    return out


def run_cells(args: argparse.Namespace, load: Callable = None) -> None:
    """Compute every missing cell of the grid."""
    import torch

    import moyu
    from moyu import data
    from moyu.analysis import analyze
    from moyu.evaluate import DenseReference
    from moyu.methods import calibrate, calibration_ids, calibration_source
    from moyu.sweep import run_sweep

    load = load or moyu.load
    out = Path(args.out)
    kinds = set(args.cells.split(","))
    for name in args.models:
        cells = out / "cells" / name
        todo = []
        if "analyze" in kinds and not (cells / "analyze.json").exists():
            todo.append("analyze")
        others = Path(args.others_to) / "cells" / name if getattr(args, "others_to", None) else None
        if "sweep" in kinds:
            todo += [f"sweep-{c}-{m}" for c in args.corpora for m in args.methods
                     if not all((d / f"sweep-{c}-{m}.json").exists() for d in (cells, others) if d)]
        weights = getattr(args, "bench_weights", "fp32")
        bench_cell = "bench" if weights == "fp32" else f"bench-{weights}"
        if "bench" in kinds and not (cells / f"{bench_cell}.json").exists():
            todo.append(bench_cell)
        if not todo:
            continue
        model, tok = load(name)
        ref = DenseReference()   # dense logits shared by every sweep cell of this model
        params = sum(p.numel() for p in model.parameters())
        for d in (cells, others):
            if d:
                write_json(d / "model.json", {"model": name, "parameters": params,
                                              "model_type": model.config.model_type})
        for cell in todo:
            t0, c0 = time.perf_counter(), _cpu_seconds()
            print(f"== {name}: {cell}", flush=True)
            if cell == "analyze":
                result = analyze(model, tok).to_dict()
            elif cell.startswith("sweep-"):
                _, corpus, method = cell.split("-", 2)
                rows = run_sweep(model, calibration_source(tok, args.calib_tokens, corpus=corpus),
                                 data.tokens(tok, "eval", args.tokens, corpus=corpus),
                                 [method], args.sparsities, reference=ref)
                result = {"corpus": corpus, "method": method, "rows": rows,
                          "tokens": args.tokens, "calib_tokens": args.calib_tokens}
            else:
                from moyu.bench import bench
                from moyu.models import BUILTINS, builtin_gguf
                prof = calibrate(model, calibration_ids(tok, args.calib_tokens), method="sketch-reuse",
                                 sparsity=0.5)
                result = bench(model, tok, prof, data.tokens(tok, "eval", 64), new_tokens=args.bench_tokens,
                               runs=args.bench_runs, weights=getattr(args, "bench_weights", "fp32"),
                               gguf=str(builtin_gguf(name)) if name in BUILTINS else None,
                               include_hf=not getattr(args, "bench_no_hf", False), progress=False)
            if "seconds" in result:   # an analyze report's per-stage times: kept under their own key
                result["stage_seconds"] = result.pop("seconds")
            result["seconds"] = round(time.perf_counter() - t0, 1)
            # CPU time of the cell (all threads): on a shared machine, wall time says more about
            # the neighbours than about the cell
            result["cpu_seconds"] = round(_cpu_seconds() - c0, 1)
            result["threads"] = torch.get_num_threads()
            # peak resident size of this process so far (Linux: KiB), the load included
            result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
            if others and cell.startswith("sweep-"):
                # one run, two reports: the 50 % row to --out, the other targets to --others-to
                # (their times are the whole run's: the targets shared one calibration path)
                rest = [r for r in result["rows"] if abs(r["target"] - REPORT_SPARSITY) > 1e-9]
                result["rows"] = [r for r in result["rows"] if abs(r["target"] - REPORT_SPARSITY) <= 1e-9]
                result["run_shared_with"] = str(others)
                write_json(others / f"{cell}.json", {**result, "rows": rest, "run_shared_with": str(cells)})
            write_json(cells / f"{cell}.json", result)
        del model, tok


def gather(out: Path) -> dict[str, Any]:
    """Every finished cell, per model, ordered by parameter count."""
    models = []
    for d in sorted((out / "cells").glob("*")):
        meta = d / "model.json"
        if not meta.exists():
            continue
        m = json.loads(meta.read_text())
        m["cells"] = {p.stem: json.loads(p.read_text()) for p in d.glob("*.json") if p.stem != "model"}
        models.append(m)
    return {"models": sorted(models, key=lambda m: m["parameters"])}


def write_sweeps(roots: list[Path], dest: Path) -> list[Path]:
    """The sweep cells of one or more runs as `moyu sweep` folders: ``dest/<model>`` (prose) and
    ``dest/<model>-code``, each with sweep.{json,md,csv,png} and its intervals and
    equal-sparsity table. Runs of other sparsities (``roots`` beyond the first) add their
    points; a (method, target) measured twice keeps the first root's row."""
    from moyu import data
    from moyu.sweep import write_sweep
    per: dict[tuple[str, str], dict[tuple[str, float], dict]] = {}
    protocol: dict[tuple[str, str], tuple[int, int]] = {}
    for root in roots:
        for d in sorted((Path(root) / "cells").glob("*")):
            for p in sorted(d.glob("sweep-*.json")):
                cell = json.loads(p.read_text())
                key = (d.name, cell["corpus"])
                proto = (cell["tokens"], cell["calib_tokens"])
                if protocol.setdefault(key, proto) != proto:
                    raise SystemExit(f"{p}: measured on {proto} tokens (eval, calibration), the other "
                                     f"cells of {key} on {protocol[key]}: they cannot share a table")
                for r in cell["rows"]:
                    per.setdefault(key, {}).setdefault((r["method"], r["target"]), r)
    written = []
    for (model, corpus), rows in sorted(per.items()):
        order = [m for m in SWEEP_ORDER if any(k[0] == m for k in rows)]
        order += sorted({m for m, _ in rows} - set(order))
        ordered = [rows[k] for k in sorted(rows, key=lambda k: (order.index(k[0]), k[1]))]
        tokens, calib = protocol[(model, corpus)]
        meta = {"model": model, "text": data.corpus_label(corpus), "eval_tokens": tokens, "calib_tokens": calib}
        title = (f"{model}, {corpus}: quality vs sparsity ({ordered[0]['dense_ppl']:.2f} dense perplexity, "
                 f"{tokens} eval tokens)")
        written += write_sweep(ordered, dest / (model if corpus == "prose" else f"{model}-code"), title, meta)
    return written


def _row(cell: dict, sparsity: float) -> dict | None:
    for r in cell["rows"]:
        if abs(r["target"] - sparsity) < 1e-9:
            return r
    return None


def _ppl_change(cell: dict, sparsity: float) -> float | None:
    r = _row(cell, sparsity)
    return None if r is None else 100 * (r["ppl"] / r["dense_ppl"] - 1)


def _ppl_change_text(cell: dict | None, sparsity: float) -> str:
    """``+1.2 [+0.9, +1.5]``: the change in % with its interval (the paired ppl-ratio CI)."""
    r = None if cell is None else _row(cell, sparsity)
    if r is None:
        return "-"
    ci = r.get("ppl_ratio_ci")
    text = f"{100 * (r['ppl'] / r['dense_ppl'] - 1):+.1f}"
    return text + (f" [{100 * (ci[0] - 1):+.1f}, {100 * (ci[1] - 1):+.1f}]" if ci else "")


def _param_axis(ax, params: list[float]) -> None:
    """Log x axis with one labelled tick per model (parameters in millions)."""
    from matplotlib.ticker import NullFormatter
    ax.set_xscale("log")
    ax.set_xticks(params)
    ax.set_xticklabels([f"{p:.0f}M" for p in params], fontsize=7)
    ax.xaxis.set_minor_formatter(NullFormatter())


def report(out: Path) -> None:
    """Write ``scale.json``, ``scale.md`` and ``scale.png`` from the cells."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = gather(out)
    if not g["models"]:
        print("no finished cells yet", flush=True)
        return
    lines = ["Layer mean of each statistic (lowest-highest layer) from `moyu analyze` with default settings "
             "on the prose corpus:", "",
             "| model | parameters | " + " | ".join(STATISTICS) + " | analyze wall s | CPU s | peak RSS GB |",
             "|---|---:|" + "---:|" * (len(STATISTICS) + 3)]
    for m in g["models"]:
        a = m["cells"].get("analyze")
        vals = [f"{statistic(a, k):.3f} ({'-'.join(f'{v:.2f}' for v in statistic_range(a, k))})" if a else "-"
                for k in STATISTICS]
        vals += [str(a.get(k, "-")) if a else "-" for k in ("seconds", "cpu_seconds", "peak_rss_gb")]
        lines.append(f"| {m['model']} | {m['parameters'] / 1e6:.0f} M | " + " | ".join(vals) + " |")
    methods = sorted({c["method"] for m in g["models"] for k, c in m["cells"].items() if k.startswith("sweep-")})
    corpora = sorted({c["corpus"] for m in g["models"] for k, c in m["cells"].items() if k.startswith("sweep-")})
    sparsities = sorted({r["target"] for m in g["models"] for k, c in m["cells"].items()
                         if k.startswith("sweep-") for r in c["rows"]})
    for corpus in corpora:
        for sp in sparsities:
            lines += ["", f"Perplexity change at {100 * sp:.0f} % ({corpus}), % vs dense [95 % interval of the "
                      "paired ppl ratio]:", "",
                      "| model | dense ppl | " + " | ".join(methods) + " |", "|---|---:|" + "---:|" * len(methods)]
            for m in g["models"]:
                cells = [m["cells"].get(f"sweep-{corpus}-{x}") for x in methods]
                dense = next((r["dense_ppl"] for c in cells if c for r in c["rows"]), None)
                if all(c is None or _row(c, sp) is None for c in cells):
                    continue
                lines.append(f"| {m['model']} | {'-' if dense is None else f'{dense:.2f}'} | "
                             + " | ".join(_ppl_change_text(c, sp) for c in cells) + " |")
    protocol = sorted({(c.get("tokens"), c.get("calib_tokens")) for m in g["models"]
                       for k, c in m["cells"].items() if k.startswith("sweep-")}, key=str)
    if protocol:
        lines += ["", "Sweep protocol (evaluation tokens, calibration tokens per corpus): "
                  + "; ".join(f"{t}, {c}" for t, c in protocol)]
    benches = [(m["model"], c) for m in g["models"] for k, c in sorted(m["cells"].items())
               if k == "bench" or k.startswith("bench-")]
    if benches:
        lines += ["", "| model | weights | moyu dense tok/s | sketch-reuse 50 % tok/s | speedup vs dense | vs llama.cpp |",
                  "|---|---|---:|---:|---:|---:|"]
        for name, b in benches:
            dense, sparse = b.get("moyu_dense", {}), b.get("moyu_sparse", {})
            peer = b.get("speedup_vs_llamacpp")
            lines.append(f"| {name} | {b.get('weights', 'fp32')} | {dense.get('tok_s', float('nan')):.1f} "
                         f"| {sparse.get('tok_s', float('nan')):.1f} "
                         f"| {b.get('speedup_vs_dense', float('nan')):.2f} | {'-' if peer is None else f'{peer:.2f}'} |")
    write_json(out / "scale.json", g)
    tmp = out / "scale.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / "scale.md")

    params = [m["parameters"] / 1e6 for m in g["models"]]
    n = len(STATISTICS) + len(corpora)
    cols = 3
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4.2 * cols, 3.2 * ((n + cols - 1) // cols)),
                             squeeze=False)
    flat = list(axes.flat)
    for ax, label in zip(flat, STATISTICS):
        pts = [(p, statistic(m["cells"]["analyze"], label)) for p, m in zip(params, g["models"])
               if "analyze" in m["cells"]]
        if pts:
            ax.plot(*zip(*pts), "o-")
        _param_axis(ax, params)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("parameters (M)")
    for ax, corpus in zip(flat[len(STATISTICS):], corpora):
        for x in methods:
            pts = [(p, _ppl_change(m["cells"][f"sweep-{corpus}-{x}"], 0.5)) for p, m in zip(params, g["models"])
                   if f"sweep-{corpus}-{x}" in m["cells"]]
            pts = [(p, v) for p, v in pts if v is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", label=x)
        _param_axis(ax, params)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_title(f"ppl change at 50 % ({corpus}), %", fontsize=9)
        ax.set_xlabel("parameters (M)")
        ax.legend(fontsize=6)
    for ax in flat[n:]:
        ax.axis("off")
    fig.tight_layout()
    tmp = out / "scale.png.tmp"
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, out / "scale.png")
    print(f"wrote {out}/scale.json, scale.md, scale.png", flush=True)


def main(argv: list[str] | None = None) -> None:
    """Parse, run the missing cells, write the report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--cells", default="analyze,sweep,bench")
    ap.add_argument("--corpora", default="prose,code")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--sparsities", default="0.3,0.5,0.7")
    ap.add_argument("--tokens", type=int, default=2048 + 257, help="evaluation tokens per corpus")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--bench-tokens", type=int, default=128, help="decoded tokens per bench run")
    ap.add_argument("--bench-runs", type=int, default=3, help="bench rounds (medians are reported)")
    ap.add_argument("--bench-weights", default="fp32", choices=["fp32", "bf16", "int8", "int4"],
                    help="runtime weight format of the bench cell (bf16 lets the 1.5B model's "
                         "dense and sparse runtimes fit beside its fp32 HF model in 24 GB)")
    ap.add_argument("--bench-no-hf", action="store_true", help="skip the HF generate baseline in the bench cell")
    ap.add_argument("--out", default="docs/results/scale")
    ap.add_argument("--others-to", metavar="DIR",
                    help="sweep rows at targets other than 50 %% go to the same cell under DIR (the 30/70 %% "
                         "run), so targets that share a calibration path (TEAL's greedy) run once")
    ap.add_argument("--report", action="store_true", help="only rewrite the report from finished cells")
    ap.add_argument("--sweeps-to", metavar="DEST",
                    help="only write the sweep cells of --out (and --also-cells) as `moyu sweep` folders "
                         "DEST/<model>[-code]")
    ap.add_argument("--also-cells", action="append", default=[], metavar="DIR",
                    help="with --sweeps-to: another run's --out whose sweep points join the tables")
    args = ap.parse_args(argv)
    if args.sweeps_to:
        for p in write_sweeps([Path(args.out), *map(Path, args.also_cells)], Path(args.sweeps_to)):
            print(p)
        return
    args.corpora = [c for c in args.corpora.split(",") if c]
    args.methods = [m for m in args.methods.split(",") if m]
    args.sparsities = [float(s) for s in args.sparsities.split(",")]
    if not args.report:
        args.models = installed_models([m for m in args.models.split(",") if m])
        run_cells(args)
    report(Path(args.out))


if __name__ == "__main__":
    main()
