"""Fused decode (one C++ call per token) against the per-op loop, side by side.

For each weight format, dense and with a method: one runtime, generation alternating
between ``lean.fused = True`` and ``False`` for ``--rounds`` rounds (the machine's noise
hits both alike); reports the median decode tok/s of each (prefill excluded), their ratio,
and checks that both decode the same tokens.

    python benchmarks/fused_decode.py [--model smollm2-135m] [--weights int8,int4]
        [--method sketch-reuse --sparsity 0.5] [--new 128] [--rounds 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

import moyu
from moyu import data
from moyu.bench import cpu_flags, cpu_name
from moyu.fakequant import calibrate_at
from moyu.methods import calibration_ids
from moyu.runtime import lean_model


def main() -> None:
    """Measure and print the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--weights", default="int8,int4")
    ap.add_argument("--method", default="sketch-reuse")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = moyu.load(args.model)
    ids = data.tokens(tok, "eval", args.prompt)
    calib = calibration_ids(tok, 4096)
    print(f"torch {torch.__version__} | CPU {cpu_name()} | flags {' '.join(cpu_flags())} | "
          f"{args.threads} threads | load avg {os.getloadavg()[0]:.1f} | {args.model}, prompt "
          f"{args.prompt}, new {args.new}, {args.rounds} alternating rounds")
    print(f"{'variant':24s} {'fused tok/s':>12s} {'per-op tok/s':>13s} {'ratio':>6s}  same tokens")
    for fmt in args.weights.split(","):
        prof = calibrate_at(model, calib, fmt, method=args.method, sparsity=args.sparsity) if args.method else None
        for name, pr in (("dense", None), (args.method, prof)) if prof else (("dense", None),):
            lean = lean_model(model, pr, fmt, max_seq=args.prompt + args.new + 8)
            if lean.plan is None:
                print(f"{fmt + ' ' + name:24s} runs per op: {lean.fused_reason}")
                continue
            speed: dict[bool, list[float]] = {True: [], False: []}
            tokens: dict[bool, list[int]] = {}
            for r in range(args.rounds + 1):
                for fused in (True, False):
                    lean.fused = fused
                    lean.reset()
                    out, t = lean.generate(ids, args.new)
                    tokens[fused] = out.tolist()
                    if r:   # round 0 warms up
                        speed[fused].append(t.decode_tok_s)
            f, p = statistics.median(speed[True]), statistics.median(speed[False])
            print(f"{fmt + ' ' + name:24s} {f:12.1f} {p:13.1f} {f / p:6.2f}  {tokens[True] == tokens[False]}")
    print(f"load avg at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
