"""Which format each linear of a model packs to under ``--weights int8``, and how exactly int4
holds it.

``pack_quantized`` keeps a matrix in int4 when int4's total squared error is no larger
than int8's (a 4-bit GGUF source along its own blocks). This prints, per projection role,
how many layers pack to int4 / int8, and the mean over blocks of int4's largest
round-trip error divided by the min/max step ``(max - min) / 15`` (0 = bit for bit;
close to 0.5, half a step, where the values do not lie on a 16-level grid).

    python benchmarks/pack_formats.py [--model qwen2.5-coder-1.5b] [--layers N]
"""
from __future__ import annotations

import argparse
import collections

import torch

import moyu
from moyu.arch import mlp_layers
from moyu.bench import cpu_name
from moyu.kernels.quant import QBLOCK, block_errors, pack_quantized, quantize


def main() -> None:
    """Pack every linear of the first ``--layers`` layers and print the counts and errors."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", type=int, default=None, help="only the first N layers (default: all)")
    args = ap.parse_args()
    model, _ = moyu.load(args.model, verbose=False)
    print(f"torch {torch.__version__} | CPU {cpu_name()} | {args.model}", flush=True)
    fmts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    errs: dict[str, list[float]] = collections.defaultdict(list)
    for ml in mlp_layers(model)[:args.layers]:
        for role, mod in {**ml.attn_linears(), **ml.mlp_linears()}.items():
            w = mod.weight.detach().float()
            if role == "down":   # stored neuron-major, blocks along the output
                w = w.t().contiguous()
            fmts[role][pack_quantized(w, "int8").fmt] += 1
            if w.shape[1] % QBLOCK == 0:
                blk = w.view(w.shape[0], -1, QBLOCK)
                step = ((blk.amax(-1) - blk.amin(-1)) / 15).clamp_min(1e-12)
                errs[role].append(float((block_errors(w, quantize(w, "int4")) / step).mean()))
    print(f"\n{'role':6s} {'int4':>5s} {'int8':>5s}  int4 error / min-max step")
    for role in fmts:
        e = errs.get(role)
        print(f"{role:6s} {fmts[role]['int4']:5d} {fmts[role]['int8']:5d}  "
              + (f"{sum(e) / len(e):.4f}" if e else "-"), flush=True)


if __name__ == "__main__":
    main()
