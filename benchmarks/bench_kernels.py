"""Per-call latency of moyu's sparse MLP / input-sparse linear kernels vs dense PyTorch.

Decode streams every layer's weights from DRAM once per token, so each timing cycles
through ``--layers`` independent copies of the weights (30 like SmolLM2-135M): by the
time a layer comes round again it has been evicted from L2/L3. Reported numbers are
medians of per-call wall times (Python overhead included, as a decode loop pays it),
best of several rounds interleaved across all methods (see :func:`measure`); speedups
are against the dense PyTorch baseline timed in the same interleaved run. GB/s counts
the weight bytes a method has to read (kept rows only; all gate rows for the threshold
variant).

    python benchmarks/bench_kernels.py [--d 576 --d-ff 1536 --threads 2 --dtype fp32]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moyu.kernels import (PackedLinear, PackedMLP, backend_name, input_sparse_linear,  # noqa: E402
                          pack_linear, pack_mlp, sparse_mlp, sparse_mlp_threshold)
from moyu.kernels import _torch_impl  # noqa: E402
from moyu.bench import cpu_name  # noqa: E402

FRACTIONS = (1.0, 0.75, 0.5, 0.3, 0.25, 0.1)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Layer:
    """One layer's MLP in both layouts plus the inputs used to time it."""

    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
    packed: PackedMLP
    x: torch.Tensor
    gate_abs: torch.Tensor  # |act(gate . x)| per neuron, to pick thresholds


@dataclass
class Row:
    """One timed (method, kept fraction) pair."""

    method: str
    kept: float
    us: float
    bytes_read: int


def measure(methods: dict, n_layers: int, calls: int, rounds: int) -> dict:
    """Best-of-`rounds` median microseconds per call of each method (keyed like `methods`).

    Every round runs every method (`calls` calls cycling through the layers), so each
    method's rounds are spread over the whole run and all methods share machine
    conditions. Taking the best round's median discards rounds hit by outside
    interference (on a busy small VM a descheduled OpenMP worker stalls every parallel
    call for a whole scheduler tick, ~8 ms here).
    """
    for fn in methods.values():  # warm-up: page in the weights, build, caches
        for i in range(n_layers):
            fn(i)
    best = {name: float("inf") for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            times = []
            for i in range(calls):
                t0 = time.perf_counter_ns()
                fn(i % n_layers)
                times.append(time.perf_counter_ns() - t0)
            best[name] = min(best[name], statistics.median(times) / 1e3)
    return best


def make_layers(n: int, d: int, d_ff: int, dtype: torch.dtype) -> list[Layer]:
    """`n` independent random SwiGLU layers."""
    layers = []
    for _ in range(n):
        wg = torch.randn(d_ff, d) / d ** 0.5
        wu = torch.randn(d_ff, d) / d ** 0.5
        wd = torch.randn(d, d_ff) / d_ff ** 0.5
        x = torch.randn(d)
        gate_abs = F.silu(wg @ x).abs()
        layers.append(Layer(wg.to(dtype), wu.to(dtype), wd.to(dtype),
                            pack_mlp(wu, wd, "silu", w_gate=wg, fmt=dtype), x, gate_abs))
    return layers


def random_idx(d_ff: int, frac: float, n: int) -> list[torch.Tensor]:
    """Per layer, a random unsorted kept set of round(frac * d_ff) neurons (like top-k)."""
    k = round(d_ff * frac)
    return [torch.randperm(d_ff)[:k] for _ in range(n)]


def bench_mlp(layers: list[Layer], calls: int, rounds: int, dtype: torch.dtype) -> list[Row]:
    """Every method at every kept fraction, all interleaved in one measurement."""
    d_ff, d = layers[0].w_up.shape
    esz = torch.finfo(dtype).bits // 8
    neuron_bytes = 3 * d * esz
    n = len(layers)
    out = torch.empty(d)

    def torch_dense(i: int) -> torch.Tensor:
        ly = layers[i]
        xx = ly.x.to(dtype)
        return F.linear(F.silu(F.linear(xx, ly.w_gate)) * F.linear(xx, ly.w_up), ly.w_down)

    def fallback(i: int, idx: list[torch.Tensor]) -> torch.Tensor:
        p = layers[i].packed
        return _torch_impl.sparse_mlp(layers[i].x, p.w_in, p.w_down_t, None, None, idx[i], p.act_id)

    methods: dict[tuple[str, float], Callable[[int], object]] = {
        ("torch dense (3x F.linear)", 1.0): torch_dense,
        ("kernel dense (idx=None)", 1.0):
            lambda i: sparse_mlp(layers[i].x, layers[i].packed, None, out),
    }
    nbytes = {key: d_ff * neuron_bytes for key in methods}
    for frac in FRACTIONS:
        idx = random_idx(d_ff, frac, n)
        srt = [t.sort().values for t in idx]
        taus = [float(ly.gate_abs.quantile(1.0 - frac)) if frac < 1 else -1.0 for ly in layers]
        k = idx[0].numel()
        group = {
            "kernel sparse (random idx)":
                lambda i, idx=idx: sparse_mlp(layers[i].x, layers[i].packed, idx[i], out),
            "kernel sparse (sorted idx)":
                lambda i, srt=srt: sparse_mlp(layers[i].x, layers[i].packed, srt[i], out),
            "torch fallback sparse (random idx)": lambda i, idx=idx: fallback(i, idx),
            "kernel threshold (gate mode)":
                lambda i, taus=taus: sparse_mlp_threshold(layers[i].x, layers[i].packed, taus[i],
                                                          "gate", out),
        }
        for name, fn in group.items():
            methods[(name, frac)] = fn
            nbytes[(name, frac)] = k * neuron_bytes
        nbytes[("kernel threshold (gate mode)", frac)] = d_ff * d * esz + k * 2 * d * esz
    times = measure(methods, n, calls, rounds)
    return [Row(name, frac, times[(name, frac)], nbytes[(name, frac)]) for name, frac in methods]


def bench_linear(n: int, d_in: int, d_out: int, calls: int, rounds: int,
                 dtype: torch.dtype) -> list[Row]:
    """input_sparse_linear by idx and by tau vs F.linear, all fractions interleaved."""
    esz = torch.finfo(dtype).bits // 8
    ws = [(torch.randn(d_out, d_in) / d_in ** 0.5) for _ in range(n)]
    packed: list[PackedLinear] = [pack_linear(w, fmt=dtype) for w in ws]
    ws = [w.to(dtype) for w in ws]
    xs = [torch.randn(d_in) for _ in range(n)]
    out = torch.empty(d_out)
    tag = f"{d_in}->{d_out}"
    methods: dict[tuple[str, float], Callable[[int], object]] = {
        (f"torch F.linear {tag}", 1.0): lambda i: F.linear(xs[i].to(dtype), ws[i]),
    }
    nbytes = {key: d_in * d_out * esz for key in methods}
    for frac in FRACTIONS:
        idx = random_idx(d_in, frac, n)
        taus = [float(x.abs().quantile(1.0 - frac)) if frac < 1 else -1.0 for x in xs]
        methods[(f"input_sparse_linear idx {tag}", frac)] = \
            lambda i, idx=idx: input_sparse_linear(xs[i], packed[i], idx[i], out=out)
        methods[(f"input_sparse_linear tau {tag}", frac)] = \
            lambda i, taus=taus: input_sparse_linear(xs[i], packed[i], tau=taus[i], out=out)
        for kind in ("idx", "tau"):
            nbytes[(f"input_sparse_linear {kind} {tag}", frac)] = round(d_in * frac) * d_out * esz
    times = measure(methods, n, calls, rounds)
    return [Row(name, frac, times[(name, frac)], nbytes[(name, frac)]) for name, frac in methods]


def print_table(title: str, rows: list[Row]) -> None:
    """One line per (method, kept fraction); speedup is against the first row (the torch
    dense baseline, measured interleaved with everything else)."""
    base_us = rows[0].us
    print(f"\n{title}")
    print(f"{'method':<38} {'kept':>5} {'median us':>10} {'speedup':>8} {'GB/s':>6}")
    for r in sorted(rows, key=lambda r: (-r.kept, r is not rows[0])):
        gbs = r.bytes_read / (r.us * 1e-6) / 1e9
        print(f"{r.method:<38} {r.kept:>5.2f} {r.us:>10.1f} {base_us / r.us:>7.2f}x {gbs:>6.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--d-ff", type=int, default=1536)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--layers", type=int, default=30, help="independent weight copies cycled")
    ap.add_argument("--calls", type=int, default=60, help="timed calls per round")
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds (best is kept)")
    ap.add_argument("--skip-linear", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()} | CPU {cpu_name()} "
          f"| backend {backend_name()} | dtype {args.dtype} | d {args.d} d_ff {args.d_ff}")
    print(f"{args.layers} weight copies cycled (not cache-resident); best of {args.rounds} "
          f"interleaved rounds of the median of {args.calls} calls; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    layers = make_layers(args.layers, args.d, args.d_ff, dtype)
    rows = bench_mlp(layers, args.calls, args.rounds, dtype)
    print_table("SwiGLU MLP (speedup = torch dense time / method time)", rows)
    del layers
    if not args.skip_linear:
        for d_in, d_out in ((args.d, args.d_ff), (args.d_ff, args.d)):
            rows = bench_linear(args.layers, d_in, d_out, args.calls, args.rounds, dtype)
            print_table(f"input-sparse linear {d_in}->{d_out} (speedup vs F.linear)", rows)


if __name__ == "__main__":
    main()
