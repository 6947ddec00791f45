"""Served speed vs the runtime's own: `moyu serve` driven by the ``openai`` client, beside
`moyu bench` for the same model, profile, prompt and length, in one run.

The method is calibrated once (`moyu calibrate`) and saved as a profile. `moyu bench
--profile` then times the runtime's own decode (moyu dense and sparse alternately, medians),
and `moyu serve --profile` is started in a separate process, as a user would run it, and
sent the same prompt ids as a streamed ``/v1/completions`` request each round: time to
first token (first SSE chunk), tokens/s over the whole request and decode tokens/s
between the first and the last chunk. Each process decodes alone (the other idles).
Reports medians, the ratio served / runtime, and the CPU with its flags.

    python benchmarks/bench_serve.py --model smollm2-135m --method sketch-reuse --sparsity 0.5
        [--prompt-tokens 64] [--new-tokens 128] [--runs 5] [--json]
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
           "--weights", args.weights,
           "--ctx", str(args.ctx), "--port", str(port), "--max-queue", "1"]
    if profile:
        cmd += ["--profile", profile]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_up(client, proc: subprocess.Popen, limit: float = 600) -> str:
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


def served(client, name: str, ids: list[int], new: int) -> dict:
    """One streamed completion: TTFT, tokens/s, decode tokens/s, the text."""
    t0 = time.perf_counter()
    first = last = None
    text, usage = [], None
    stream = client.completions.create(model=name, prompt=ids, max_tokens=new, stream=True,
                                       stream_options={"include_usage": True})
    for ch in stream:
        now = time.perf_counter()
        if ch.choices:
            first = first or now
            last = now
            text.append(ch.choices[0].text)
        if ch.usage:
            usage = ch.usage
    n = usage.completion_tokens
    return {"ttft_s": first - t0, "tok_s": n / (last - t0), "decode_tok_s": (n - 1) / max(last - first, 1e-9),
            "tokens": n, "text": "".join(text)}


def run_bench(args, profile: str | None) -> dict:
    """`moyu bench --json` for the same configuration (the runtime's own decode speed)."""
    cmd = [sys.executable, "-m", "moyu.cli", "bench", "--model", args.model, "--dtype", args.dtype, "--no-hf",
           "--weights", args.weights,
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
           "--runs", str(args.runs), "--json"] + (["--profile", profile] if profile else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return res["moyu_sparse" if profile else "moyu_dense"] | {"sparsity": res.get("sparsity")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap)
    add_weights_arg(ap)
    add_method_args(ap)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    args.ctx = args.prompt_tokens + args.new_tokens + 8
    import openai

    import moyu
    _, tok = moyu.load(args.model, verbose=False)
    ids = data.tokens(tok, "eval", args.prompt_tokens).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        profile = args.profile
        if args.method:          # calibrate once, in its own process; bench and server load the profile
            profile = str(Path(tmp) / "profile.moyu")
            cmd = [sys.executable, "-m", "moyu.cli", "calibrate", "--model", args.model, "--dtype", args.dtype,
                   "--method", args.method, "--sparsity", str(args.sparsity), "--calib-tokens",
                   str(args.calib_tokens), "--out", profile] + [f"--option={o}" for o in args.option]
            subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                           stdout=subprocess.DEVNULL)
        runtime = run_bench(args, profile)
        port = free_port()
        proc = start_server(args, profile, port)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                   timeout=600)
            name = wait_up(client, proc)
            rows = [served(client, name, ids, args.new_tokens) for _ in range(args.runs + 1)][1:]  # 1st: warm-up
        finally:
            proc.terminate()
            proc.wait(30)

    med = {m: round(statistics.median(r[m] for r in rows), 4) for m in ("ttft_s", "tok_s", "decode_tok_s")}
    out = {"model": args.model, "method": args.method, "target": args.sparsity if args.method else None,
           "sparsity": runtime["sparsity"], "prompt_tokens": len(ids), "new_tokens": rows[0]["tokens"],
           "runs": args.runs, "served": med,
           "runtime": {"tok_s": runtime["tok_s"], "decode_tok_s": runtime["decode_tok_s"]},
           "served_vs_runtime_tok_s": round(med["tok_s"] / runtime["tok_s"], 3),
           "served_vs_runtime_decode": round(med["decode_tok_s"] / runtime["decode_tok_s"], 3),
           "served_tok_s_runs": [round(r["tok_s"], 2) for r in rows], "runtime_tok_s_runs": runtime["runs"],
           "environment": {**environment(), "cpu_flags": cpu_flags(), "load_avg": os.getloadavg()}}
    if args.json:
        print(json.dumps(out))
        return 0
    env = out["environment"]
    print(f"{args.model} {args.method or 'dense'} (sparsity {out['sparsity']}), prompt {len(ids)} tokens, "
          f"{out['new_tokens']} new, median of {args.runs}; {env['cpu']} ({', '.join(env['cpu_flags'])}), "
          f"{env['threads']} threads, load average {env['load_avg'][0]:.1f}")
    print(f"  runtime (moyu bench)  {runtime['tok_s']:7.2f} tok/s   decode {runtime['decode_tok_s']:7.2f} tok/s")
    print(f"  served (openai)       {med['tok_s']:7.2f} tok/s   decode {med['decode_tok_s']:7.2f} tok/s   "
          f"time to first token {1000 * med['ttft_s']:.0f} ms")
    print(f"  served / runtime: {out['served_vs_runtime_tok_s']} (tok/s), {out['served_vs_runtime_decode']} (decode)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
