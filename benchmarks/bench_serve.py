"""Served speed vs the runtime's own: `moyu serve` driven by the ``openai`` client, beside
``LeanModel.generate`` for the same model, method, prompt and length, in one run.

The method is calibrated once (`moyu calibrate`) and saved as a profile; this process builds its engine from
that profile (through ``moyu.cli.load_engine``, as the CLI does) and starts ``moyu serve
--profile`` in a separate process, as a user would. Each round, alternately: a streamed
``/v1/completions`` request (time to first token = first SSE chunk; tokens/s over the
whole request; decode tokens/s between the first and the last chunk), then the runtime's
own ``generate`` of exactly as many tokens from the same prompt ids, then the engine's
in-process stream (to separate HTTP cost from the engine's detokenisation). Medians and
ratios of medians are reported, with the CPU and its flags.

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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moyu import data  # noqa: E402
from moyu.bench import environment  # noqa: E402
from moyu.cli import add_engine_args, load_engine  # noqa: E402
from moyu.engine import GenerationParams  # noqa: E402

FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile")


def cpu_flags() -> list[str]:
    """The SIMD flags the kernels care about that this CPU reports."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in FLAGS if f in have]
    except OSError:
        pass
    return []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, profile: str | None, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "moyu.cli", "serve", "--model", args.model, "--dtype", args.dtype,
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_args(ap)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    import openai

    with tempfile.TemporaryDirectory() as tmp:
        args.prompt_len, args.scored_len = 256, 256
        profile = None
        if args.method:          # calibrate once, in its own process; server and runtime load the profile
            profile = Path(tmp) / "profile.moyu"
            cmd = [sys.executable, "-m", "moyu.cli", "calibrate", "--model", args.model, "--dtype", args.dtype,
                   "--method", args.method, "--sparsity", str(args.sparsity), "--calib-tokens",
                   str(args.calib_tokens), "--out", str(profile)] + [f"--option={o}" for o in args.option]
            subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                           stdout=subprocess.DEVNULL)
            args.profile, args.method = str(profile), None
        engine = load_engine(args)
        ids = data.tokens(engine.tok, "eval", args.prompt_tokens).tolist()
        port = free_port()
        proc = start_server(args, str(profile) if profile else None, port)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                   timeout=600)
            name = wait_up(client, proc)
            rows = {"served": [], "runtime": [], "engine": []}
            for r in range(args.runs + 1):          # round 0 warms up both sides
                s = served(client, name, ids, args.new_tokens)
                engine.runtime.reset()
                toks, t = engine.runtime.generate(torch.tensor(ids), s["tokens"])
                c = engine.complete(ids, GenerationParams(max_tokens=s["tokens"]))
                if r == 0:
                    same = s["text"] == engine.tok.decode(toks, skip_special_tokens=True) == c.text
                    continue
                rows["served"].append(s)
                rows["runtime"].append({"ttft_s": t.prefill_s, "tok_s": t.tok_s, "decode_tok_s": t.decode_tok_s})
                rows["engine"].append({"ttft_s": c.prefill_s, "tok_s": c.tok_s, "decode_tok_s": c.decode_tok_s})
        finally:
            proc.terminate()
            proc.wait(30)

    med = {k: {m: round(statistics.median(r[m] for r in v), 4) for m in ("ttft_s", "tok_s", "decode_tok_s")}
           for k, v in rows.items()}
    out = {"model": args.model, "method": engine.method,
           "target": None if engine.method is None else args.sparsity,
           "sparsity": None if engine.sparsity() is None else round(engine.sparsity(), 4),
           "prompt_tokens": len(ids), "new_tokens": rows["served"][0]["tokens"], "runs": args.runs,
           "same_greedy_text": same, **med,
           "served_vs_runtime_tok_s": round(med["served"]["tok_s"] / med["runtime"]["tok_s"], 3),
           "served_vs_runtime_decode": round(med["served"]["decode_tok_s"] / med["runtime"]["decode_tok_s"], 3),
           "served_tok_s_runs": [round(r["tok_s"], 2) for r in rows["served"]],
           "runtime_tok_s_runs": [round(r["tok_s"], 2) for r in rows["runtime"]],
           "environment": {**environment(), "cpu_flags": cpu_flags(), "load_avg": os.getloadavg()}}
    if args.json:
        print(json.dumps(out))
        return 0
    env = out["environment"]
    print(f"{args.model} {engine.method or 'dense'} (sparsity {out['sparsity']}), prompt {len(ids)} tokens, "
          f"{out['new_tokens']} new, median of {args.runs}; {env['cpu']} ({', '.join(env['cpu_flags'])}), "
          f"{env['threads']} threads, load average {env['load_avg'][0]:.1f}")
    for k in ("runtime", "engine", "served"):
        m = med[k]
        print(f"  {k:<8} time to first token {1000 * m['ttft_s']:7.1f} ms   {m['tok_s']:7.2f} tok/s   "
              f"decode {m['decode_tok_s']:7.2f} tok/s")
    print(f"  served / runtime: {out['served_vs_runtime_tok_s']} (tok/s), {out['served_vs_runtime_decode']} "
          f"(decode); same greedy text: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
