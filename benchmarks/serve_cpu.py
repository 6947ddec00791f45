"""Where a served token's time goes: CPU per streamed event in the ``openai`` client and in
each server thread, and the server's own decode rate streamed vs not streamed, beside the
runtime's (`moyu bench`'s timed run), interleaved in one run.

    python benchmarks/serve_cpu.py [--weights int8] [--stream-interval 1] [--rounds 6]

The server runs as `moyu serve` in its own process (as benchmarks/bench_serve.py starts it);
its threads' CPU times come from /proc (Linux). A non-streamed request keeps the client idle
while the server decodes, so the gap between the two server rates is what streaming costs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve as bs  # noqa: E402


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of every thread of process ``pid``, keyed ``name:tid``."""
    hz = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            st = open(f"/proc/{pid}/task/{tid}/stat").read()
        except OSError:
            continue
        fields = st[st.rindex(")") + 2:].split()
        out[f"{st[st.index('(') + 1: st.rindex(')')]}:{tid}"] = (int(fields[11]) + int(fields[12])) / hz
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--weights", default="int8")
    ap.add_argument("--method", default="sketch-reuse")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--stream-interval", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    import openai
    import torch

    import moyu
    from moyu import data
    from moyu.bench import cpu_flags, environment
    args.dtype, args.threads, args.calib_tokens, args.option = "float32", torch.get_num_threads(), 8192, []
    args.ctx = 64 + args.new_tokens + 8
    model, tok = moyu.load(args.model, verbose=False)
    ids = data.tokens(tok, "eval", 64)
    with tempfile.TemporaryDirectory() as tmp:
        prof = bs.calibrate(args, tmp)
        run_rt, _ = bs.runtime_runner(args, model, prof, ids)
        port = bs.free_port()
        proc = bs.start_server(args, prof, port)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                   timeout=1800)
            name = bs.wait_up(client, proc)

            def plain() -> float:
                r = client.completions.create(model=name, prompt=ids.tolist(), max_tokens=args.new_tokens)
                return r.model_extra["timings"]["decode_tok_s"]

            def streamed() -> float:
                return bs.served(client, name, ids.tolist(), args.new_tokens,
                                 args.stream_interval)["server"]["decode_tok_s"]
            run_rt(), plain(), streamed()                      # warm-up
            rates = {"runtime": [], "server, not streamed": [], "server, streamed": []}
            cpu = {"client": 0.0}
            for _ in range(args.rounds):
                rates["runtime"].append(run_rt()["decode_tok_s"])
                rates["server, not streamed"].append(plain())
                before, c0 = thread_cpu(proc.pid), time.process_time()
                rates["server, streamed"].append(streamed())
                cpu["client"] += time.process_time() - c0
                for k, v in thread_cpu(proc.pid).items():
                    cpu[k] = cpu.get(k, 0.0) + v - before.get(k, 0.0)
        finally:
            proc.terminate()
            proc.wait(30)
    env = {**environment(), "cpu_flags": cpu_flags()}
    events = args.rounds * -(-args.new_tokens // args.stream_interval)
    print(f"{args.model} {args.method} {args.sparsity:.0%}, {args.weights}, {args.threads} threads, "
          f"{args.stream_interval} token(s) per event, {args.rounds} interleaved rounds; {env['cpu']} "
          f"({', '.join(env['cpu_flags'])})")
    for k, v in rates.items():
        print(f"  decode tok/s, {k:22s} median {statistics.median(v):7.1f}  {[round(x, 1) for x in v]}")
    print("  CPU per streamed event (ms):")
    for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]):
        if v > 0:
            print(f"    {k:28s} {1000 * v / events:8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
