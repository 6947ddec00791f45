"""Served speed vs the runtime's own: `moyu serve` driven by the ``openai`` client, beside
`moyu bench`'s timed run for the same model, profile, weights, threads, prompt and length,
interleaved in one run.

The method is calibrated once (`moyu calibrate`) and saved as a profile (or ``--profile``).
`moyu serve --profile` runs in its own process, as a user would start it. This process
builds the same runtime as `moyu bench` (``lean_model`` with the profile and weights) and
times it with `moyu bench`'s own runner (``moyu.bench._lean_variant``: prefill + decode of
exactly ``--new-tokens``). Each round times both, one after the other, alternating which
goes first, so drift in the load of a shared machine hits both; the other side idles.

Served: one streamed ``/v1/completions`` request with the same prompt ids per round; time
to first token (first text chunk), tokens/s over the whole request (request sent -> last
text chunk, as the runtime's tok/s counts prefill + decode) and decode tokens/s (first ->
last chunk). Checks that both sides decoded the same number of tokens from the same prompt
with the same method and sparsity. Reports medians, the ratio served / runtime (of the
medians, and the spread of the per-round ratios), the CPU with its flags and the load.

    python benchmarks/bench_serve.py --model smollm2-135m --method sketch-reuse --sparsity 0.5
        [--profile F] [--weights fp32] [--threads N] [--prompt-tokens 64] [--new-tokens 64]
        [--rounds 5] [--stream-interval 1] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moyu import data  # noqa: E402
from moyu.bench import cpu_flags, environment  # noqa: E402
from moyu.cli import add_method_args, add_model_args, add_weights_arg  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, profile: str | None, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "moyu.cli", "serve", "--model", args.model, "--dtype", args.dtype,
           "--weights", args.weights, "--threads", str(args.threads),
           "--ctx", str(args.ctx), "--port", str(port), "--max-queue", "1",
           "--stream-interval", str(args.stream_interval)]
    if profile:
        cmd += ["--profile", profile]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_up(client, proc: subprocess.Popen, limit: float = 900) -> str:
    t0 = time.monotonic()
    while True:
        try:
            return client.models.list().data[0].id
        except Exception:   # noqa: BLE001 - not listening yet
            if proc.poll() is not None:
                raise SystemExit(f"moyu serve exited: {proc.stderr.read()}")
            if time.monotonic() - t0 > limit:
                raise SystemExit("moyu serve did not come up")
            time.sleep(0.5)


def served(client, name: str, ids: list[int], new: int, per_event: int = 1) -> dict:
    """One streamed completion: TTFT, tokens/s, decode tokens/s, counts and the server's figures.

    ``per_event``: tokens per streamed event (the server's --stream-interval): the first event
    then arrives after that many tokens, and the decode rate counts the tokens after it."""
    t0 = time.perf_counter()
    first = last = None
    usage = timings = None
    stream = client.completions.create(model=name, prompt=ids, max_tokens=new, stream=True,
                                       stream_options={"include_usage": True})
    for ch in stream:
        now = time.perf_counter()
        if ch.choices and ch.choices[0].text:
            first = first or now
            last = now
        if ch.usage:
            usage, timings = ch.usage, (ch.model_extra or {}).get("timings", {})
    n = usage.completion_tokens
    return {"ttft_s": first - t0, "tok_s": n / (last - t0), "decode_tok_s": (n - per_event) / max(last - first, 1e-9),
            "tokens": n, "prompt_tokens": usage.prompt_tokens, "server": timings}


def runtime_runner(args, model, profile: str | None, ids):
    """`moyu bench`'s runtime and timed run for this configuration: () -> figures of one run."""
    from moyu.bench import _lean_variant
    from moyu.kernels import weight_format
    from moyu.profile import Profile
    from moyu.runtime import lean_model
    prof = Profile.load(profile) if profile else None
    lean = lean_model(model, prof, weight_format(args.weights), ids.shape[0] + args.new_tokens + 8)
    variant = _lean_variant("moyu_sparse" if prof else "moyu_dense", lean, ids, args.new_tokens)

    def run() -> dict:
        n, secs, per_tok = variant.run()
        return {"tok_s": n / secs, "decode_tok_s": 1.0 / per_tok, "tokens": n, "prefill_s": secs - per_tok * (n - 1)}

    def sparsity() -> float | None:   # as `moyu bench` reports it, over the runs so far
        shares = [getattr(L.mlp, "kept_share", 1.0) for L in lean.layers]
        return round(1 - sum(shares) / len(shares), 4) if prof else None
    return run, sparsity


def calibrate(args, tmp: str) -> str:
    """Calibrate ``--method`` once, in its own process; the profile's path."""
    profile = str(Path(tmp) / "profile.moyu")
    cmd = [sys.executable, "-m", "moyu.cli", "calibrate", "--model", args.model, "--dtype", args.dtype,
           "--method", args.method, "--sparsity", str(args.sparsity), "--calib-tokens",
           str(args.calib_tokens), "--out", profile] + [f"--option={o}" for o in args.option]
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
    return profile


def measure(args, model, tok, profile: str | None) -> dict:
    import openai
    ids = data.tokens(tok, "eval", args.prompt_tokens)
    run_runtime, runtime_sparsity = runtime_runner(args, model, profile, ids)
    port = free_port()
    proc = start_server(args, profile, port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                               timeout=1800)
        name = wait_up(client, proc)
        run_served = lambda: served(client, name, ids.tolist(), args.new_tokens, args.stream_interval)  # noqa: E731
        run_runtime(), run_served()                                   # warm-up
        load = [os.getloadavg()[0]]
        rt, sv = [], []
        for i in range(args.rounds):
            for side in (("runtime", "served") if i % 2 == 0 else ("served", "runtime")):
                (rt if side == "runtime" else sv).append(run_runtime() if side == "runtime" else run_served())
            load.append(os.getloadavg()[0])
            if not args.json:
                print(f"  round {i + 1}: runtime {rt[-1]['tok_s']:6.2f} tok/s, served {sv[-1]['tok_s']:6.2f} "
                      f"tok/s ({sv[-1]['tok_s'] / rt[-1]['tok_s']:.3f}), load {load[-1]:.1f}", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(30)

    sparsity = runtime_sparsity()
    same = {"tokens": {r["tokens"] for r in rt} | {s["tokens"] for s in sv} == {args.new_tokens},
            "prompt_tokens": {s["prompt_tokens"] for s in sv} == {len(ids)},
            "method": {s["server"].get("method") for s in sv} == {args.method_name},
            "sparsity": sparsity is None or all(abs(s["server"]["sparsity"] - sparsity) < 0.005 for s in sv)}
    med = lambda rows, k: round(statistics.median(r[k] for r in rows), 4)  # noqa: E731
    ratios = [s["tok_s"] / r["tok_s"] for s, r in zip(sv, rt)]
    return {"model": args.model, "method": args.method_name, "target": args.sparsity if args.method else None,
            "sparsity": sparsity, "weights": args.weights, "threads": args.threads,
            "stream_interval": args.stream_interval,
            "prompt_tokens": len(ids), "new_tokens": args.new_tokens, "rounds": args.rounds,
            "runtime": {"tok_s": med(rt, "tok_s"), "decode_tok_s": med(rt, "decode_tok_s"),
                        "prefill_s": med(rt, "prefill_s"),
                        "runs": [round(r["tok_s"], 2) for r in rt]},
            "served": {"tok_s": med(sv, "tok_s"), "decode_tok_s": med(sv, "decode_tok_s"),
                       "ttft_s": med(sv, "ttft_s"), "runs": [round(s["tok_s"], 2) for s in sv],
                       "server_prefill_s": round(statistics.median(s["server"]["prefill_s"] for s in sv), 4),
                       "server_decode_tok_s": round(statistics.median(s["server"]["decode_tok_s"] for s in sv), 2)},
            "served_vs_runtime_tok_s": round(med(sv, "tok_s") / med(rt, "tok_s"), 3),
            "served_vs_runtime_decode": round(med(sv, "decode_tok_s") / med(rt, "decode_tok_s"), 3),
            "round_ratios": [round(x, 3) for x in ratios],
            "same_work": same, "load_avg": [round(x, 1) for x in load]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap)
    add_weights_arg(ap)
    add_method_args(ap)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (one run of each side per round)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on both sides (default: all cores)")
    ap.add_argument("--stream-interval", type=int, default=1,
                    help="the server's --stream-interval (tokens per streamed event; default 1)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    args.ctx = args.prompt_tokens + args.new_tokens + 8
    import moyu
    model, tok = moyu.load(args.model, dtype=getattr(torch, args.dtype), verbose=False)
    with tempfile.TemporaryDirectory() as tmp:
        profile = args.profile or (calibrate(args, tmp) if args.method else None)
        if profile:
            from moyu.profile import Profile
            args.method_name = Profile.load(profile).method
        else:
            args.method_name = None
        out = measure(args, model, tok, profile)
    out["environment"] = {**environment(), "cpu_flags": cpu_flags()}
    if args.json:
        print(json.dumps(out))
        return 0
    env, rt, sv = out["environment"], out["runtime"], out["served"]
    print(f"{args.model} {out['method'] or 'dense'} (sparsity {out['sparsity']}), {args.weights}, "
          f"{out['threads']} threads, {args.stream_interval} token(s) per streamed event, prompt {out['prompt_tokens']} tokens, {out['new_tokens']} new, "
          f"median of {args.rounds} interleaved rounds; {env['cpu']} ({', '.join(env['cpu_flags'])}), "
          f"load average {min(out['load_avg']):.1f}-{max(out['load_avg']):.1f}")
    print(f"  runtime (moyu bench's run)  {rt['tok_s']:7.2f} tok/s   decode {rt['decode_tok_s']:7.2f} tok/s   "
          f"prefill {1000 * rt['prefill_s']:.0f} ms")
    print(f"  served (openai client)      {sv['tok_s']:7.2f} tok/s   decode {sv['decode_tok_s']:7.2f} tok/s   "
          f"time to first token {1000 * sv['ttft_s']:.0f} ms (server prefill {1000 * sv['server_prefill_s']:.0f} ms)")
    print(f"  served / runtime: {out['served_vs_runtime_tok_s']} (tok/s; rounds "
          f"{min(out['round_ratios']):.3f}-{max(out['round_ratios']):.3f}), {out['served_vs_runtime_decode']} (decode)"
          f"; target >= 0.95: {'met' if out['served_vs_runtime_tok_s'] >= 0.95 else 'not met'}")
    lo, hi = min(out["round_ratios"]), max(out["round_ratios"])
    if hi / lo > 1.25:
        print(f"  note: the rounds' ratios spread {lo:.2f}-{hi:.2f}: the machine was too busy for a firm verdict")
    bad = [k for k, ok in out["same_work"].items() if not ok]
    if bad:
        print(f"  warning: the two sides differ in {', '.join(bad)}: the comparison is not like for like")
    return 0


if __name__ == "__main__":
    sys.exit(main())
