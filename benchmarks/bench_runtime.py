"""Decode speed: HF ``generate`` vs moyu's lean runtime (dense), batch 1, on the default model.

Runs alternate (HF, moyu fp32, moyu bf16, ...) so drift in machine load hits all
variants alike; reports the median tokens/s of each, the ratio to HF, a per-token time
split of the runtime, and peak RSS of each variant in a fresh process.

    python benchmarks/bench_runtime.py [--runs 5] [--prompt 64] [--new 128] [--threads 2]
        [--no-profile] [--no-rss]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

import moyu
from moyu.bench import cpu_name
from moyu.runtime import LeanModel


def prompt_ids(n: int) -> torch.Tensor:
    """A fixed pseudo-random prompt of ``n`` token ids."""
    return torch.randint(100, 40000, (n,), generator=torch.Generator().manual_seed(0))


def hf_tok_s(model, ids: torch.Tensor, new: int) -> float:
    """HF greedy generate: new tokens per second, prefill included."""
    x = ids[None]
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new,
                             min_new_tokens=new, do_sample=False, pad_token_id=0)
    dt = time.perf_counter() - t0
    return (out.shape[1] - x.shape[1]) / dt


def lean_tok_s(lean: LeanModel, ids: torch.Tensor, new: int) -> float:
    """Lean runtime greedy generate: new tokens per second, prefill included."""
    out, t = lean.generate(ids, new)
    return t.tok_s


def _median_time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


@torch.inference_mode()
def time_split(lean: LeanModel, ids: torch.Tensor, reps: int = 20) -> dict[str, float]:
    """Per-token milliseconds: whole decode step, MLPs, attention linears, lm_head, rest.

    Each part runs over all layers in sequence (weights not in cache, as in decode), so
    the parts add up to roughly the step; ``rest`` is attention core, norms, RoPE, cache
    writes and Python overhead.
    """
    s = lean.flat
    lean.prefill(ids)
    pos0 = lean.pos

    def step():
        lean.pos = pos0
        lean.decode_step(1)

    x = torch.randn(s.d) * 0.1
    xa = torch.randn(lean.qn) * 0.1

    def mlps():
        for L in s.layers:
            L.mlp.decode(x)

    def linears():
        for L in s.layers:
            for f in L.qkv:
                f(x)
            L.o(xa)

    def head():
        lean._head(x)

    out = {k: 1e3 * _median_time(f, reps) for k, f in
           (("step", step), ("mlp", mlps), ("attn_linears", linears), ("lm_head", head))}
    out["rest"] = out["step"] - out["mlp"] - out["attn_linears"] - out["lm_head"]
    return out


def rss_mb(variant: str, threads: int) -> float:
    """Resident memory (MB) of a fresh process after loading the model and running ``variant``
    briefly (the runtime variants delete the HF model first). Peak RSS would only show the
    HF load, which every variant shares."""
    code = (
        "import resource, torch, moyu, gc\n"
        f"torch.set_num_threads({threads})\n"
        "from moyu.runtime import LeanModel\n"
        "m, tok = moyu.load()\n"
        "ids = torch.arange(100, 164)\n"
        f"v = {variant!r}\n"
        "if v == 'hf':\n"
        "    m.generate(ids[None], attention_mask=torch.ones(1, 64, dtype=torch.long), max_new_tokens=8, do_sample=False, pad_token_id=0)\n"
        "else:\n"
        "    lean = LeanModel.from_hf(m, weights=v, max_seq=256)\n"
        "    del m; gc.collect()\n"
        "    lean.generate(ids, 8)\n"
        "rss = [l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]\n"
        "print(int(rss) / 1024)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    try:
        return float(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return float("nan")


def main() -> None:
    """Run the benchmark and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--no-rss", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from moyu.kernels import backend_name

    model, _ = moyu.load()
    ids = prompt_ids(args.prompt)
    max_seq = args.prompt + args.new + 8
    t0 = time.perf_counter()
    leans = {"moyu fp32": LeanModel.from_hf(model, weights='fp32', max_seq=max_seq)}
    t_conv = time.perf_counter() - t0
    leans["moyu bf16"] = LeanModel.from_hf(model, weights='bf16', max_seq=max_seq)
    variants = {"HF generate fp32": lambda: hf_tok_s(model, ids, args.new)}
    variants.update({k: (lambda l=l: lean_tok_s(l, ids, args.new)) for k, l in leans.items()})

    print(f"torch {torch.__version__} | CPU {cpu_name()} | {args.threads} threads | kernels "
          f"{backend_name()} | load avg {os.getloadavg()[0]:.1f} | prompt {args.prompt}, "
          f"new {args.new}, {args.runs} alternating runs | fp32 conversion {t_conv:.1f} s")
    for f in variants.values():  # warm-up
        f()
    results: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.runs):
        for k, f in variants.items():
            results[k].append(f())
    hf = statistics.median(results["HF generate fp32"])
    print(f"\n{'variant':24s} {'tok/s (median)':>15s} {'vs HF':>7s}   runs")
    for k, v in results.items():
        med = statistics.median(v)
        print(f"{k:24s} {med:15.1f} {med / hf:6.2f}x   {' '.join(f'{x:.1f}' for x in v)}")
    for k, l in leans.items():
        print(f"{k}: weights {l.nbytes / 1e6:.0f} MB, KV cache {l.cache_nbytes / 1e6:.0f} MB")
    if not args.no_profile:
        print("\nper-token split (ms):")
        for k, l in leans.items():
            sp = time_split(l, ids)
            print(f"  {k}: " + ", ".join(f"{n} {v:.1f}" for n, v in sp.items()))
    print(f"\nload avg at end {os.getloadavg()[0]:.1f}")
    if not args.no_rss:
        print("RSS after 8 tokens (fresh process; runtime after deleting the HF model): "
              + ", ".join(f"{v} {rss_mb(v, args.threads):.0f} MB" for v in ("hf", "fp32", "bf16")))


if __name__ == "__main__":
    main()
