"""Quality of each weight format, dense and with a method, measured on the runtime itself.

The lean runtime is what `bench`, `generate` and `serve` run, so its teacher-forced logits
(prefill of the window's prompt, then one decode step per scored token) are the quality a
user gets. For every format this prints perplexity, its change against the fp32 dense
runtime, KL(fp32 dense || variant) and top-1 agreement, and the achieved sparsity, on the
evaluation protocol's windows (256 dense prompt positions, 256 scored).

    python benchmarks/quant_quality.py --model smollm2-135m --method sketch-reuse --sparsity 0.5
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

import moyu
from moyu import data
from moyu.bench import environment
from moyu.evaluate import Windows
from moyu.runtime import lean_model


def window_logits(lean, ids: torch.Tensor, w: Windows, starts: list[int]) -> list[torch.Tensor]:
    """Runtime logits of every scored position (and the next-token targets) per window."""
    out = []
    for s in starts:
        win = ids[s: s + w.prompt + w.scored]
        # rows are positions: the prompt is prefilled dense, every scored position is a decode step
        logits = lean.logits(win, n_prefill=w.prompt)
        out.append(logits[w.prompt: w.prompt + w.scored])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="sketch-reuse")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--formats", default="fp32,int8,int4")
    ap.add_argument("--tokens", type=int, default=2048 + 257, help="eval tokens (8 windows at the default)")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()

    model, tok = moyu.load(args.model, verbose=False)
    ids = data.tokens(tok, "eval", args.tokens)
    w = Windows()
    starts = w.starts(len(ids))
    targets = [ids[s + w.prompt + 1: s + w.prompt + w.scored + 1] for s in starts]
    prof = moyu.calibrate(model, tok, method=args.method, sparsity=args.sparsity) if args.method else None
    ref = None
    rows = []
    for fmt in args.formats.split(","):
        for name, p in (("dense", None), (args.method, prof)):
            if not name:
                continue
            t0 = time.perf_counter()
            lean = lean_model(model, p, fmt, max_seq=w.prompt + w.scored + 8)
            logits = window_logits(lean, ids, w, starts)
            nll = sum(float(F.cross_entropy(lg, t, reduction="sum")) for lg, t in zip(logits, targets))
            n = sum(len(t) for t in targets)
            row = {"weights": fmt, "method": name, "ppl": math.exp(nll / n), "tokens": n,
                   "weight_bytes": lean.nbytes, "seconds": round(time.perf_counter() - t0, 1)}
            if p is not None:
                row["sparsity"] = round(1 - sum(L.mlp.kept_share for L in lean.layers) / len(lean.layers), 4)
            if ref is None:
                ref = logits
            lp_ref = [F.log_softmax(r, -1) for r in ref]
            lp = [F.log_softmax(lg, -1) for lg in logits]
            row["kl_vs_fp32_dense"] = sum(float((a.exp() * (a - b)).sum()) for a, b in zip(lp_ref, lp)) / n
            row["top1_vs_fp32_dense"] = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(ref, logits)) / n
            rows.append(row)
            base = rows[0]["ppl"]
            print(f"{fmt:>5} {name:<14} ppl {row['ppl']:8.3f} ({100 * (row['ppl'] / base - 1):+6.2f} % vs fp32 "
                  f"dense)  KL {row['kl_vs_fp32_dense']:.4f}  top-1 {row['top1_vs_fp32_dense']:.3f}  "
                  f"sparsity {row.get('sparsity', 0):.3f}  {row['weight_bytes'] / 1e6:.0f} MB  "
                  f"({row['seconds']} s)", flush=True)
            del lean
    env = environment()
    print(f"{args.model}, {rows[0]['tokens']} scored tokens; {env['cpu']}, quantized kernels: {env['quant_isa']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"model": args.model, "rows": rows, "environment": env}, f, indent=1)


if __name__ == "__main__":
    main()
