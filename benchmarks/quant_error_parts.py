"""Where a weight format's quality loss comes from: each part of the model rounded alone.

``moyu.fakequant`` rounds exactly as the runtime's kernels do, and can restrict the
rounding to some parts (attention projections, MLP gate/up, MLP down, the head with a
tied embedding) or keep activations in float32. This prints, on the evaluation protocol
(256 dense prompt positions, 256 scored, fp32 dense as reference): the whole format, its
weights alone (activations unrounded), and each part alone, as perplexity change, KL and
top-1 agreement with 95 % bootstrap intervals where `evaluate` gives them.

    python benchmarks/quant_error_parts.py [--model smollm2-135m] [--weights int8] [--tokens 2305]
"""
from __future__ import annotations

import argparse
import os

import torch

import moyu
from moyu import data
from moyu.bench import cpu_name
from moyu.evaluate import DenseReference, Windows, evaluate
from moyu.fakequant import PARTS, QuantizedWeights


def main() -> None:
    """Measure and print one row per variant."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--weights", default="int8")
    ap.add_argument("--tokens", type=int, default=2048 + 257)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = moyu.load(args.model, verbose=False)
    ids = data.tokens(tok, "eval", args.tokens)
    print(f"torch {torch.__version__} | CPU {cpu_name()} | {args.model} | {args.weights} | "
          f"{len(Windows().starts(len(ids))) * Windows().scored} scored tokens | load avg {os.getloadavg()[0]:.1f}")
    variants = [("everything (what the runtime does)", {}),
                ("weights only, activations fp32", {"round_inputs": False})]
    variants += [(f"only {p}", {"parts": {p}}) for p in PARTS]
    ref = DenseReference()
    print(f"\n{'variant':40s} {'ppl':>9s} {'change [95 % interval]':>27s} {'KL':>9s} {'top-1':>7s}")
    for label, kw in variants:
        r = evaluate(model, ids, Windows(), modifier=QuantizedWeights(model, args.weights, **kw), reference=ref)
        lo, hi = r.to_dict()["ppl_ratio_ci"]
        print(f"{label:40s} {r.ppl:9.4f} {100 * (r.ppl / r.dense_ppl - 1):+8.3f}% "
              f"[{100 * (lo - 1):+6.2f}, {100 * (hi - 1):+6.2f}] {r.kl:9.5f} {r.top1_agree:7.4f}", flush=True)
    print(f"(fp32 dense perplexity {r.dense_ppl:.4f})")


if __name__ == "__main__":
    main()
