"""Per-call time and read bandwidth of the quantized kernels vs the fp32 kernels.

SwiGLU layers of one model shape (SmolLM2-135M by default: d 576, d_ff 1536) in fp32
(PackedMLP, the existing kernels), int8 and int4 (QuantMLP): dense, with a random 50 %
kept set ("50%"), and with the first half of the neurons ("50%run": the same bytes in one
run, no gaps for the hardware prefetcher); the two primitives alone (gate/up q_matvec
over every row, down q_axpy) and the sketch rule. Like bench_kernels.py, each timing
cycles through ``--layers`` independent weight copies so weights come from DRAM, and
reports the best of interleaved rounds of median per-call times. GB/s counts the weight
bytes a call must read (kept rows only; every gate/up row for the sketch). The last rows
run the same int8/int4 MLP on each C++ code path this CPU has, without the software
prefetching of the axpy passes (the default), and with dot loops prefetching
``--prefetch`` rows ahead, interleaved with the rest.

    python benchmarks/bench_quant_kernels.py [--d 576 --d-ff 1536 --threads 2]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import measure, random_idx  # noqa: E402

from moyu.bench import cpu_flags, cpu_name  # noqa: E402
from moyu.kernels import PackedLinear, backend_name, input_sparse_linear, pack_mlp, sparse_mlp  # noqa: E402
from moyu.kernels import quant_ops  # noqa: E402
from moyu.kernels.quant import QuantMLP, quantize_mlp  # noqa: E402
from moyu.kernels.quant_ops import (ISAS, q_axpy, q_matvec, q_mlp, q_mlp_act, q_sketch_mlp,  # noqa: E402
                                    quant_backend_name, quant_isa)



@dataclass
class Layer:
    """One layer in every format, plus the input and the per-layer sketch threshold."""

    packed: object
    down_fp32: PackedLinear
    q: dict[str, QuantMLP]
    x: torch.Tensor
    a: torch.Tensor
    down_norm: dict[str, torch.Tensor]
    tau50: dict[str, float]


def make_layers(n: int, d: int, d_ff: int) -> list[Layer]:
    layers = []
    for _ in range(n):
        wg, wu = torch.randn(d_ff, d) / d ** 0.5, torch.randn(d_ff, d) / d ** 0.5
        wd = torch.randn(d, d_ff) / d_ff ** 0.5
        packed = pack_mlp(wu, wd, "silu", w_gate=wg)
        qs = {fmt: quantize_mlp(wu, wd, "silu", fmt, w_gate=wg) for fmt in ("int8", "int4")}
        x = torch.randn(d)
        norms = {fmt: q.down_norm() for fmt, q in qs.items()}
        taus = {fmt: float((q_mlp_act(x, q)[0].abs() * norms[fmt]).quantile(0.5)) for fmt, q in qs.items()}
        layers.append(Layer(packed, PackedLinear(wt=packed.w_down_t), qs, x, torch.randn(d_ff), norms, taus))
    return layers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=576)
    ap.add_argument("--d-ff", type=int, default=1536)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=30, help="independent weight copies cycled")
    ap.add_argument("--calls", type=int, default=60, help="timed calls per round")
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds (best is kept)")
    ap.add_argument("--prefetch", type=int, default=8,
                    help="also time the MLP with dot loops prefetching this many rows ahead (0: skip)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    d, d_ff, n = args.d, args.d_ff, args.layers
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()} | CPU {cpu_name()} | "
          f"flags {' '.join(cpu_flags())}")
    print(f"fp32 backend {backend_name()} | quant backend {quant_backend_name()} ({quant_isa()}) | "
          f"d {d} d_ff {d_ff} | {n} weight copies cycled; best of {args.rounds} interleaved rounds "
          f"of the median of {args.calls} calls")
    layers = make_layers(n, d, d_ff)
    idx50 = random_idx(d_ff, 0.5, n)
    k50 = idx50[0].numel()
    first50 = torch.arange(k50)  # the same count as one contiguous run: no gaps for the prefetcher
    out = torch.empty(d)
    q0 = layers[0].q
    neuron = {"fp32": 3 * d * 4}
    neuron.update({f: 2 * q.w_in.row_nbytes + q.w_down_t.row_nbytes for f, q in q0.items()})
    methods: dict[tuple[str, str, str], Callable[[int], object]] = {}
    nbytes: dict[tuple[str, str, str], int] = {}

    def add(fmt: str, what: str, kept: str, fn: Callable[[int], object], size: int) -> None:
        methods[(fmt, what, kept)] = fn
        nbytes[(fmt, what, kept)] = size

    L = layers
    add("fp32", "mlp", "100%", lambda i: sparse_mlp(L[i].x, L[i].packed, None, out), d_ff * neuron["fp32"])
    add("fp32", "mlp", "50%", lambda i: sparse_mlp(L[i].x, L[i].packed, idx50[i], out), k50 * neuron["fp32"])
    add("fp32", "mlp", "50%run", lambda i: sparse_mlp(L[i].x, L[i].packed, first50, out), k50 * neuron["fp32"])
    add("fp32", "down (input_sparse_linear)", "100%",
        lambda i: input_sparse_linear(L[i].a, L[i].down_fp32, None, out=out), d_ff * d * 4)
    add("fp32", "down (input_sparse_linear)", "50%",
        lambda i: input_sparse_linear(L[i].a, L[i].down_fp32, idx50[i], out=out), k50 * d * 4)
    for fmt in ("int8", "int4"):
        win, wdt = q0[fmt].w_in, q0[fmt].w_down_t
        add(fmt, "mlp", "100%", lambda i, f=fmt: q_mlp(L[i].x, L[i].q[f], None, out), d_ff * neuron[fmt])
        add(fmt, "mlp", "50%", lambda i, f=fmt: q_mlp(L[i].x, L[i].q[f], idx50[i], out), k50 * neuron[fmt])
        add(fmt, "mlp", "50%run", lambda i, f=fmt: q_mlp(L[i].x, L[i].q[f], first50, out), k50 * neuron[fmt])
        add(fmt, "sketch mlp", "~50%",
            lambda i, f=fmt: q_sketch_mlp(L[i].x, L[i].q[f], L[i].down_norm[f], L[i].tau50[f], out),
            d_ff * 2 * win.row_nbytes + k50 * wdt.row_nbytes)
        add(fmt, "gate/up q_matvec", "100%", lambda i, f=fmt: q_matvec(L[i].x, L[i].q[f].w_in),
            2 * d_ff * win.row_nbytes)
        add(fmt, "down q_axpy", "100%", lambda i, f=fmt: q_axpy(L[i].a, L[i].q[f].w_down_t, out=out),
            d_ff * wdt.row_nbytes)
        add(fmt, "down q_axpy", "50%", lambda i, f=fmt: q_axpy(L[i].a, L[i].q[f].w_down_t, idx50[i], out=out),
            k50 * wdt.row_nbytes)
    ext = quant_ops._impl
    if quant_backend_name() == "cpp":
        for isa in ISAS[1:ext.best_isa() + 1]:
            for fmt in ("int8", "int4"):
                def run(i: int, f: str = fmt, code: int = ISAS.index(isa)) -> object:
                    ext.set_isa(code)
                    y = q_mlp(L[i].x, L[i].q[f], None, out)
                    ext.set_isa(ext.best_isa())
                    return y
                add(fmt, f"mlp [{isa} path]", "100%", run, d_ff * neuron[fmt])
        for fmt in ("int8", "int4"):   # the axpy passes' own prefetching off, then more of it
            for setting in (-1, args.prefetch) if args.prefetch > 0 else (-1,):
                for kept, idx in (("100%", None), ("50%", idx50)):
                    def other(i: int, f: str = fmt, s: int = setting, ix=idx) -> object:
                        ext.set_prefetch(s)
                        y = q_mlp(L[i].x, L[i].q[f], None if ix is None else ix[i], out)
                        ext.set_prefetch(0)
                        return y
                    label = "no sw prefetch" if setting < 0 else f"prefetch {setting} rows"
                    add(fmt, f"mlp [{label}]", kept, other, (d_ff if idx is None else k50) * neuron[fmt])
    times = measure(methods, n, args.calls, args.rounds)
    base = times[("fp32", "mlp", "100%")]
    print(f"\n{'format':<6} {'kernel':<28} {'kept':>5} {'median us':>10} {'vs fp32 mlp':>11} {'GB/s':>6} "
          f"{'MB read':>8}")
    for key, us in times.items():
        fmt, what, kept = key
        print(f"{fmt:<6} {what:<28} {kept:>5} {us:>10.1f} {base / us:>10.2f}x "
              f"{nbytes[key] / (us * 1e-6) / 1e9:>6.1f} {nbytes[key] / 1e6:>8.2f}")


if __name__ == "__main__":
    main()
