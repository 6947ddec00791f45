"""TDA's achieved sparsity against the prompt's length, with one threshold or one per length.

TDA keeps a neuron when the length-normalised L2 norm of its prompt activations exceeds a
per-layer threshold fixed offline. This calibrates TDA on the calibration split (windows of
the evaluation protocol: 256-token prompts) with ``by_length=false`` (one threshold, from
full prompts) and ``by_length=true`` (the default: thresholds at 8, 16, ... tokens,
interpolated), then applies each to prefixes of held-out prompts (the evaluation split's
windows) of several lengths and prints the mean share of neurons skipped (over prompts and
layers), next to the target.

    python benchmarks/tda_prompt_length.py [--model smollm2-135m] [--sparsity 0.5] [--corpus prose]
"""
from __future__ import annotations

import argparse

import torch

import moyu
from moyu import data
from moyu.bench import cpu_name
from moyu.evaluate import Windows
from moyu.methods import calibrate
from moyu.methods.method import get_method
from moyu.methods.calib import collect
from moyu.arch import mlp_layers

LENGTHS = (12, 16, 24, 32, 64, 128, 256)


def main() -> None:
    """Calibrate both variants and print the sparsity per prompt length."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--corpus", default="prose")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = moyu.load(args.model, verbose=False)
    print(f"torch {torch.__version__} | CPU {cpu_name()} | {args.model} | {args.corpus} | target {args.sparsity}")
    calib_ids = data.tokens(tok, "calib", 8192, corpus=args.corpus)
    held = collect(model, data.tokens(tok, "eval", 8192, corpus=args.corpus), Windows(), set(), prompts=True)
    method = get_method("tda")
    print(f"\n{'prompt tokens':>14s} " + " ".join(f"{n:>6d}" for n in LENGTHS))
    for by_length in (False, True):
        prof = calibrate(model, calib_ids, method="tda", sparsity=args.sparsity, by_length=by_length)
        row = []
        for n in LENGTHS:
            skipped = []
            for ml in mlp_layers(model):
                rule = method.neuron_rule(prof, ml)
                for a in held.prompts[ml.index]:
                    if a.shape[0] >= n:
                        skipped.append(1 - float(rule.choose(a[None, :n], None).float().mean()))
            row.append(sum(skipped) / len(skipped))
        label = "per length" if by_length else "one threshold"
        print(f"{label:>14s} " + " ".join(f"{x:6.3f}" for x in row), flush=True)


if __name__ == "__main__":
    main()
