"""How fast the fp32/bf16 runtime's int8 sketch scores neurons, against the weight bytes.

Times ``sketch_act`` (the scoring ``sketch``/``sketch-reuse`` run for every neuron) for one
decode position on layers shaped like Qwen2.5-Coder-1.5B's MLP (d 1536, d_ff 8960, gate and
up: 27.5 MB of int8 codes per layer, eight copies cycled so they come from DRAM), on one
thread and on all threads, and prints the GB/s of codes read.

    python benchmarks/sketch_probe.py [--d 1536] [--d-ff 8960] [--layers 8] [--rounds 6]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from moyu.bench import cpu_flags, cpu_name
from moyu.kernels import ops


def main() -> None:
    """Time the scoring per thread count and print GB/s."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=1536)
    ap.add_argument("--d-ff", type=int, default=8960)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    impl = ops._backend()
    torch.manual_seed(0)
    codes = [torch.randint(-127, 128, (args.d_ff, 2, args.d), dtype=torch.int8) for _ in range(args.layers)]
    scales = [torch.rand(args.d_ff, 2) * 0.01 for _ in range(args.layers)]
    x = torch.randn(args.d)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__} | CPU {cpu_name()} | flags {' '.join(cpu_flags())} | kernels "
          f"{ops.backend_name()} | d {args.d}, d_ff {args.d_ff}, {codes[0].nbytes / 1e6:.1f} MB of codes per layer")
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        times = []
        for r in range(args.rounds + 1):
            t0 = time.perf_counter()
            for c, s in zip(codes, scales):
                impl.sketch_act(x, c, s, None, 0)
            if r:
                times.append((time.perf_counter() - t0) / args.layers)
        t = statistics.median(times)
        print(f"{n} thread(s): {t * 1e3:.2f} ms per layer, {codes[0].nbytes / t / 1e9:.1f} GB/s of codes")
    torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
