"""Where a token's time goes in the fused decode loop, per prefetch setting, side by side.

The fused loop (one C++ call per token, :mod:`moyu.runtime.fused`) has per-part timers
(``Plan.set_timing``): MLP, attention linears (qkv, o), attention core, and the rest of the
loop (norms, residuals, activation quantization). What lies outside the loop (embedding,
final norm and lm_head, the next-token pick, Python) is the token's time minus the loop's.
Each round generates with every prefetch setting in turn (dense and with a method), so the
machine's drift hits all settings alike; medians over the rounds are printed.

    python benchmarks/fused_split.py [--model smollm2-135m] [--weights int8]
        [--method sketch-reuse --sparsity 0.5] [--prefetch 4:1,16:3] [--rounds 5]

``--prefetch DOT:PASSES,...``: rows ahead that the four-row dot products prefetch
(``set_dot_prefetch``) and passes ahead that the axpy passes prefetch (``set_axpy_prefetch``).
``--python-ends`` adds each variant with the embedding lookup and the final norm + lm_head
run from Python around the loop (as before they moved into the plan's call), same rounds.
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

import moyu
from moyu import data
from moyu.bench import cpu_flags, cpu_name, memory_bandwidth
from moyu.fakequant import calibrate_at
from moyu.kernels import quant_ops
from moyu.methods import calibration_ids
from moyu.runtime import lean_model

PARTS = ("mlp", "attn_linears", "attn_core", "loop_rest")


def main() -> None:
    """Measure and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--weights", default="int8", choices=["int8", "int4"])
    ap.add_argument("--method", default="sketch-reuse")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--prefetch", default="4:1,16:3")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--python-ends", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    configs = [tuple(int(v) for v in c.split(":")) for c in args.prefetch.split(",")]
    model, tok = moyu.load(args.model)
    ids = data.tokens(tok, "eval", args.prompt)
    prof = calibrate_at(model, calibration_ids(tok, 4096), args.weights, method=args.method, sparsity=args.sparsity)
    leans = {"dense": lean_model(model, None, args.weights, max_seq=args.prompt + args.new + 8),
             args.method: lean_model(model, prof, args.weights, max_seq=args.prompt + args.new + 8)}
    impl = quant_ops._backend()
    for name, lean in leans.items():
        if lean.plan is None:
            raise SystemExit(f"{name} does not run fused: {lean.fused_reason}")
        lean.generate(ids, 4)
        lean.plan.set_timing(True)
    print(f"torch {torch.__version__} | CPU {cpu_name()} | flags {' '.join(cpu_flags())} | "
          f"{args.threads} threads | load avg {os.getloadavg()[0]:.1f} | read bandwidth "
          f"{memory_bandwidth(kind='read') / 1e9:.1f} GB/s | {args.model} {args.weights}, prompt "
          f"{args.prompt}, new {args.new}, {args.rounds} rounds")
    rows: dict[tuple, list[list[float]]] = {}
    try:
        for r in range(args.rounds + 1):
            for cfg in configs:
                impl.set_dot_prefetch(cfg[0])
                impl.set_axpy_prefetch(cfg[1])
                for name, lean in leans.items():
                    for ends in (True, False) if args.python_ends else (True,):
                        lean._fused_ends = ends
                        lean.reset()
                        lean.plan.read_times()
                        _, t = lean.generate(ids, args.new)
                        loop = [1e3 * s / (t.new_tokens - 1) for s in lean.plan.read_times().tolist()]
                        token = 1e3 / t.decode_tok_s
                        label = name if ends else f"{name}, ends in Python"
                        if r:   # round 0 warms up
                            rows.setdefault((label, cfg), []).append(loop + [token - sum(loop), token, t.decode_tok_s])
    finally:
        impl.set_dot_prefetch(16)
        impl.set_axpy_prefetch(3)
    head = ["variant", "dot:axpy", *PARTS, "outside", "token ms", "tok/s"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for (name, cfg), vals in rows.items():
        med = [statistics.median(c) for c in zip(*vals)]
        cells = [f"{v:.2f}" for v in med[:-1]] + [f"{med[-1]:.1f}"]
        print(f"| {name} | {cfg[0]}:{cfg[1]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
