"""Generation tasks with and without prompt-prefix reuse: same answers, less time.

Consecutive SQuAD requests share their five solved examples, consecutive CoQA turns their
story, so the lean runtime can keep the cached keys and values (and a sequence method's
prompt activations) of the shared prefix. This answers the first N requests of each task
twice per variant (dense, and ``--method`` at ``--sparsity``), without and with reuse,
and prints whether the answers agree, both times and the share of prompt tokens reused.

    python benchmarks/prefix_reuse.py [--model smollm2-135m] [--method griffin] [--items 8] [--threads 1]
"""
from __future__ import annotations

import argparse
import time

import torch

import moyu
from moyu import gentasks as G
from moyu.bench import cpu_name
from moyu.methods import calibrate, calibration_ids


def main() -> None:
    """Run each (task, variant) without and with reuse and print the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="griffin")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = moyu.load(args.model, verbose=False)
    prof = calibrate(model, calibration_ids(tok, 4096), method=args.method, sparsity=args.sparsity)
    eos = G._eos(model, tok)
    print(f"torch {torch.__version__} | CPU {cpu_name()} | {args.model} | {args.threads} threads", flush=True)
    for name in ("coqa", "squad"):
        items = G.load_items(name, args.items)
        for label, p in (("dense", None), (args.method, prof)):
            res = {}
            for reuse in (False, True):
                dec = G.LeanDecoder(model, p, reuse_prefix=reuse)
                t0 = time.perf_counter()
                rows = G.run_generation(dec, tok, items, G.GEN_TASKS[name][1], eos, progress=False)
                res[reuse] = ([r["answer"] for r in rows], time.perf_counter() - t0, dec.reused, dec.prefilled)
            same = sum(a == b for a, b in zip(res[False][0], res[True][0]))
            share = res[True][2] / max(res[True][2] + res[True][3], 1)
            print(f"{name:5s} {label:8s} same answers {same}/{len(items)} | {res[False][1]:.1f} s -> "
                  f"{res[True][1]:.1f} s ({res[False][1] / res[True][1]:.2f}x) | prompt tokens reused "
                  f"{share:.0%}", flush=True)


if __name__ == "__main__":
    main()
