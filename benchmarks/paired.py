"""Two methods on the same windows, and the paired 95 % block-bootstrap interval of their
perplexity ratio (the same resampled blocks for both, as ``moyu eval`` does against dense).

    python benchmarks/paired.py --model smollm2-135m --methods sketch-reuse,sketch --sparsity 0.5 --tokens 2305

Prints one JSON line per method (``moyu eval --json`` keys) and one for the pair.
"""
from __future__ import annotations

import argparse
import json
import math

import moyu
from moyu import data
from moyu.evaluate import DenseReference, Windows, evaluate
from moyu.methods import calibrate, calibration_ids, sparsify
from moyu.stats import intervals


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", required=True, help="two methods, comma-separated: a,b (reports a / b)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--tokens", type=int, default=2048 + 257)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    args = ap.parse_args()
    names = [m.strip() for m in args.methods.split(",")]
    if len(names) != 2:
        raise SystemExit("--methods takes exactly two methods: a,b")
    model, tok = moyu.load(args.model, verbose=False)
    ids = data.tokens(tok, "eval", args.tokens)
    cal = calibration_ids(tok, args.calib_tokens)
    ref = DenseReference()
    res = {}
    for m in names:
        prof = calibrate(model, cal, method=m, sparsity=args.sparsity)
        res[m] = evaluate(model, ids, Windows(), modifier=sparsify(model, prof), reference=ref)
        d = {k: v for k, v in res[m].to_dict().items() if k != "sparsity_per_layer"}
        print(json.dumps({"method": m, **d}), flush=True)
    a, b = (res[m].per_token["nll"] for m in names)
    ci = intervals(a, b)["ppl_ratio_ci"]
    print(json.dumps({"pair": f"{names[0]} / {names[1]}", "ppl_ratio": math.exp(a.mean() - b.mean()),
                      "ppl_ratio_ci": ci}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
