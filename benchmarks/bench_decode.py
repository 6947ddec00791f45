"""Decode speed of every method with a decode path, at several sparsities, vs moyu dense.

For each (method, sparsity) the method is calibrated on the calibration split, then
``moyu.bench.bench`` times moyu dense and moyu sparse alternately in the same run (HF
``generate`` once, as the first row). Writes ``decode.csv``, ``decode.md`` and
``decode.png`` (speedup vs dense against achieved sparsity) into ``--out``.

    python benchmarks/bench_decode.py [--model smollm2-135m] [--methods sketch-reuse,sketch,cats,griffin,tda]
        [--sparsities 0.3,0.5,0.7] [--runs 5] [--new 64] [--threads 2] [--out docs/results/decode]
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import torch

import moyu
from moyu import data
from moyu.bench import bench, environment
from moyu.methods import calibrate, calibration_ids

COLUMNS = ["method", "target", "sparsity", "tok_s", "dense_tok_s", "speedup_vs_dense", "speedup_vs_hf",
           "roofline_share", "memory_ratio", "slice_seconds"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="sketch-reuse,sketch,cats,griffin,tda,dejavu-linear")
    ap.add_argument("--sparsities", default="0.3,0.5,0.7")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="docs/results/decode")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = moyu.load(args.model)
    ids = data.tokens(tok, "eval", args.prompt)
    calib = calibration_ids(tok, 4096)
    base = bench(model, tok, None, ids, args.new, args.runs, include_hf=True, progress=False)
    hf = base["hf_dense"]["tok_s"]
    print(f"{args.model}: HF generate {hf:.2f} tok/s, moyu dense {base['moyu_dense']['tok_s']:.2f} tok/s "
          f"({base['dense_vs_hf']:.2f}x); bandwidth {base['bandwidth_gb_s']} GB/s; {base['environment']}",
          flush=True)
    rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        for s in [float(v) for v in args.sparsities.split(",")]:
            prof = calibrate(model, calib, method=method, sparsity=s)
            r = bench(model, tok, prof, ids, args.new, args.runs, include_hf=False, progress=False)
            row = {"method": method, "target": s, "sparsity": r["sparsity"],
                   "tok_s": r["moyu_sparse"]["tok_s"], "dense_tok_s": r["moyu_dense"]["tok_s"],
                   "speedup_vs_dense": r["speedup_vs_dense"],
                   "speedup_vs_hf": round(r["moyu_sparse"]["tok_s"] / hf, 3),
                   "roofline_share": r["moyu_sparse"]["roofline_share"],
                   "memory_ratio": r["memory_ratio"], "slice_seconds": r["slice_seconds"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    write(rows, Path(args.out), {"model": args.model, "hf_tok_s": hf, "baseline": base,
                                 "environment": environment()})
    return 0


def write(rows: list[dict], out: Path, meta: dict) -> None:
    """decode.csv / decode.md / decode.json / decode.png into ``out``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
    (out / "decode.csv").write_text(buf.getvalue())
    head = "| " + " | ".join(COLUMNS) + " |"
    lines = [f"# {meta['model']}: decode speed at batch 1 (HF generate {meta['hf_tok_s']:.2f} tok/s)", "",
             head, "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    lines += ["", f"environment: {meta['environment']}"]
    (out / "decode.md").write_text("\n".join(lines) + "\n")
    (out / "decode.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["sparsity"], r["speedup_vs_dense"]) for r in rows if r["method"] == m)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(1.35, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("achieved MLP sparsity during decode")
    ax.set_ylabel("decode tok/s / moyu dense tok/s")
    ax.set_title(f"{meta['model']}: batch-1 decode speed vs sparsity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "decode.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
