"""Prefetch distances of the quantized kernels, one setting after another in every round.

Two probes on weights that do not fit in cache: an lm_head-sized int8 matvec
(``q_matvec``, 49,152 x 576 rows, three copies cycled) for each ``set_dot_prefetch`` rows
ahead, beside a plain tensor sum as the machine's read rate; and SmolLM2-sized int8 down
projections (``q_axpy`` over 1,536 x 576, 30 copies cycled, every row and a random half)
for each ``set_axpy_prefetch`` passes ahead. Prints medians over the rounds.

    python benchmarks/prefetch_probe.py [--rounds 10] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from moyu.bench import cpu_flags, cpu_name
from moyu.kernels import quant_ops
from moyu.kernels.quant import quantize


def main() -> None:
    """Run both probes and print their tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    impl = quant_ops._backend()
    if impl is None:
        raise SystemExit("the C++ quantized kernels are not available here")
    torch.manual_seed(0)
    print(f"torch {torch.__version__} | CPU {cpu_name()} | flags {' '.join(cpu_flags())} | "
          f"{args.threads} threads | quant ISA {quant_ops.quant_isa()}")
    heads = [quantize(torch.randn(49152, 576), "int8") for _ in range(3)]
    downs = [quantize(torch.randn(1536, 576), "int8") for _ in range(30)]
    x, a = torch.randn(576), torch.randn(1536)
    half = torch.sort(torch.randperm(1536)[:768]).values
    out_h, out_d = torch.empty(49152), torch.empty(576)
    big = torch.ones(64 << 20)
    head_bytes = 3 * heads[0].nbytes
    gbs: dict[object, list[float]] = {}
    us: dict[tuple, list[float]] = {}
    try:
        for r in range(args.rounds + 1):
            for rows in (4, 8, 16, 32, "sum"):
                t0 = time.perf_counter()
                if rows == "sum":
                    big.sum()
                    n = big.nbytes
                else:
                    impl.set_dot_prefetch(rows)
                    for m in heads:
                        quant_ops.q_matvec(x, m, out=out_h)
                    n = head_bytes
                if r:
                    gbs.setdefault(rows, []).append(n / (time.perf_counter() - t0) / 1e9)
            impl.set_dot_prefetch(16)
            for passes in (1, 2, 3, 4):
                impl.set_axpy_prefetch(passes)
                for name, rows_ in (("every row", None), ("random half", half)):
                    t0 = time.perf_counter()
                    for m in downs:
                        quant_ops.q_axpy(a, m, rows=rows_, out=out_d)
                    if r:
                        us.setdefault((name, passes), []).append((time.perf_counter() - t0) / len(downs) * 1e6)
    finally:
        impl.set_dot_prefetch(16)
        impl.set_axpy_prefetch(3)
    print("\nint8 lm_head q_matvec, GB/s of weights read (sum: a plain tensor sum):")
    print("| dot prefetch rows | GB/s |\n|---|---|")
    for k, v in gbs.items():
        print(f"| {k} | {statistics.median(v):.1f} |")
    print("\nint8 down q_axpy, us per call (Python call included):")
    print("| axpy prefetch passes | every row | random half |\n|---|---|---|")
    for p in (1, 2, 3, 4):
        print(f"| {p} | {statistics.median(us[('every row', p)]):.1f} | {statistics.median(us[('random half', p)]):.1f} |")


if __name__ == "__main__":
    main()
