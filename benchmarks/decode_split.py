"""Where a decoded token's time goes, per weight format, dense and with a method.

For each format and variant: ms per token in the MLPs, the attention linears, the
attention core, the head and the rest (embedding, norms, residuals, the Python loop),
weight bytes read per token per part, the GB/s each part achieves and its share of the
machine's read bandwidth (a large-tensor sum measured in the same run: the roofline).

    python benchmarks/decode_split.py [--model smollm2-135m] [--weights fp32,int8,int4]
        [--method sketch-reuse --sparsity 0.5] [--prompt 64] [--new 128] [--repeats 3]
        [--threads 2] [--json FILE]
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

import moyu
from moyu import data
from moyu.atomic import write_json_atomic
from moyu.bench import cpu_flags, cpu_name, decode_split, memory_bandwidth
from moyu.fakequant import calibrate_at
from moyu.methods import calibration_ids
from moyu.runtime import lean_model

PARTS = ("mlp", "attn_linears", "attn_core", "head", "rest", "total")


def main() -> None:
    """Measure and print the split."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--weights", default="fp32,int8,int4")
    ap.add_argument("--method", default="sketch-reuse")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="median over this many generations")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", metavar="FILE", help="also write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from moyu.kernels import backend_name
    model, tok = moyu.load(args.model)
    ids = data.tokens(tok, "eval", args.prompt)
    calib = calibration_ids(tok, 4096)
    read_bw = memory_bandwidth(kind="read")
    print(f"torch {torch.__version__} | CPU {cpu_name()} | flags {' '.join(cpu_flags())} | "
          f"{args.threads} threads | kernels {backend_name()} | load avg {os.getloadavg()[0]:.1f} | "
          f"read bandwidth {read_bw / 1e9:.1f} GB/s | prompt {args.prompt}, new {args.new}")
    results = {}
    for fmt in args.weights.split(","):
        prof = calibrate_at(model, calib, fmt, method=args.method, sparsity=args.sparsity) if args.method else None
        for name, pr in (("dense", None), (args.method, prof)) if prof else (("dense", None),):
            lean = lean_model(model, pr, fmt, max_seq=args.prompt + args.new + 8)
            decode_split(lean, ids, 8)   # warm-up
            runs = [decode_split(lean, ids, args.new) for _ in range(args.repeats)]
            med = {p: {k: statistics.median(r[p][k] for r in runs) for k in ("ms", "bytes", "gb_s")}
                   for p in PARTS}
            results[f"{fmt} {name}"] = med
            del lean
    print(f"\n{'variant':24s} " + " ".join(f"{p:>18s}" for p in PARTS))
    print(f"{'':24s} " + " ".join(f"{'ms  MB  %roof':>18s}" for _ in PARTS))
    for k, med in results.items():
        cells = []
        for p in PARTS:
            m = med[p]
            roof = 100 * m["gb_s"] * 1e9 / read_bw if m["bytes"] else float("nan")
            cells.append(f"{m['ms']:5.2f} {m['bytes'] / 1e6:5.1f} {roof:4.0f}%" if m["bytes"]
                         else f"{m['ms']:5.2f}     -     -")
        print(f"{k:24s} " + " ".join(f"{c:>18s}" for c in cells))
    tok_s = {k: 1e3 / v["total"]["ms"] for k, v in results.items()}
    print("\ndecode tok/s (prefill excluded): " + ", ".join(f"{k} {v:.1f}" for k, v in tok_s.items()))
    print(f"load avg at end {os.getloadavg()[0]:.1f}")
    if args.json:
        write_json_atomic(args.json, {"cpu": cpu_name(), "flags": cpu_flags(), "threads": args.threads,
                                      "read_bw": read_bw, "results": results}, indent=1)


if __name__ == "__main__":
    main()
