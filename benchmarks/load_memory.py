"""Peak resident memory and wall time of first and cached model loads, per dtype.

Each load runs in a fresh child process (so one load's peak does not hide another's):
``moyu.load(model, dtype)``, then one forward pass over 32 tokens, which touches every
weight (a cached load maps its weights file, so its resident size grows as the weights are
first used: the peak after the forward pass is the honest footprint). Reported per load:
wall and CPU (user + system) seconds of ``moyu.load``, the 1-minute load average around it
(on a shared machine wall time stretches with it; CPU time much less), and peak RSS
(``ru_maxrss``) after the load and after the forward pass. For each model the sequence is: float32 first load (join + dequantise into a
fresh cache), float32 cached, bfloat16 first load (adds the bfloat16 folder), bfloat16
cached.

    python benchmarks/load_memory.py --models qwen2.5-coder-0.5b,qwen2.5-coder-1.5b \
        --cache /tmp/moyu-load-cache [--out docs/results/scale]

``--cache`` must be a scratch folder (it is emptied per model, so first loads are first
loads; the real cache is never touched). Each measured row is appended to
``OUT/load_memory.jsonl`` at once, and a rerun keeps the models whose four rows are all
there (resumable); then ``load_memory.json`` and ``load_memory.md`` are written.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, os, resource, sys, time, torch, moyu
name, dtype = sys.argv[1], getattr(torch, sys.argv[2])
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
t0, c0, load0 = time.perf_counter(), cpu(), os.getloadavg()[0]
model, tok = moyu.load(name, dtype=dtype, verbose=False)
seconds, cpu_seconds = time.perf_counter() - t0, cpu() - c0
after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
ids = tok("def fibonacci(n):\n    if n < 2:\n        return n\n" * 3, return_tensors="pt").input_ids[:, :32]
with torch.inference_mode():
    logits = model(ids).logits
assert torch.isfinite(logits).all()
print(json.dumps({"seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
                  "load_average": round((load0 + os.getloadavg()[0]) / 2, 1),
                  "peak_rss_after_load": after_load,
                  "peak_rss_after_forward": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "parameters": sum(p.numel() for p in model.parameters())}))
"""


def one_load(model: str, dtype: str, cache: Path) -> dict:
    """Run one load in a child process with ``MOYU_CACHE=cache``; its measurements."""
    env = {**os.environ, "MOYU_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, "-c", CHILD, model, dtype], env=env,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"load of {model} ({dtype}) failed: {res.stderr.strip()[-500:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def to_markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = ["| model | dtype | load | wall s | CPU s | machine load | peak RSS after load (GB) "
             "| peak RSS after a forward pass (GB) |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['dtype']} | {r['load']} | {r['seconds']:.1f} | "
                     f"{r['cpu_seconds']:.1f} | {r['load_average']:.1f} | "
                     f"{r['peak_rss_after_load'] / 1e9:.2f} | {r['peak_rss_after_forward'] / 1e9:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen2.5-coder-0.5b,qwen2.5-coder-1.5b")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--cache", required=True, type=Path, help="scratch cache folder (emptied)")
    ap.add_argument("--out", type=Path, help="folder for load_memory.json / .md")
    args = ap.parse_args()
    import platform

    import torch

    import moyu

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    log = args.out / "load_memory.jsonl" if args.out else None
    done = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()] if log and log.is_file() else []
    rows = []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        mine = [r for r in done if r["model"] == model and r["dtype"] in dtypes]
        if len(mine) == 2 * len(dtypes):          # measured by an earlier run
            rows += mine
            continue
        moyu.models.builtin_gguf(model) if model in moyu.models.BUILTINS else None  # installed?
        shutil.rmtree(args.cache, ignore_errors=True)
        for dtype in dtypes:
            for load in ("first", "cached"):
                r = {"model": model, "dtype": dtype, "load": load, **one_load(model, dtype, args.cache)}
                print(json.dumps(r), flush=True)
                if log:
                    log.parent.mkdir(parents=True, exist_ok=True)
                    with open(log, "a") as fh:
                        fh.write(json.dumps(r) + "\n")
                rows.append(r)
    shutil.rmtree(args.cache, ignore_errors=True)
    md = to_markdown(rows)
    print(md)
    if args.out:
        env = {"torch": torch.__version__, "python": platform.python_version(), "cores": os.cpu_count(),
               "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)}
        (args.out / "load_memory.json").write_text(json.dumps(
            {"rows": rows, "environment": env, "date": time.strftime("%Y-%m-%d")}, indent=1))
        (args.out / "load_memory.md").write_text(md)


if __name__ == "__main__":
    main()
