"""One Markdown table from several ``moyu sweep`` outputs: perplexity change vs dense per
method and target sparsity, models side by side (what docs/methods.md shows).

    python benchmarks/summarize_sweeps.py docs/results/smollm2-135m docs/results/gemma3-270m

``--at-target`` prints each method at exactly the target sparsity instead (interpolated along
its own curve, :func:`moyu.sweep.at_targets`; `*`: extrapolated, `-`: too far outside).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(dirs: list[str]) -> int:
    at_target = "--at-target" in dirs
    dirs = [d for d in dirs if d != "--at-target"]
    sweeps = {}
    for d in dirs:
        meta = json.loads((Path(d) / "sweep.json").read_text())
        if at_target:
            from moyu.sweep import at_targets
            pts = [dict(p, sparsity=p["target"]) for p in at_targets(meta["rows"])]
            sweeps[meta["model"]] = {(p["method"], p["target"]): p for p in pts if p["ppl_ratio"] is not None}
            continue
        sweeps[meta["model"]] = {(r["method"], r["target"]): r for r in meta["rows"]}
    models = list(sweeps)
    targets = sorted({t for rows in sweeps.values() for _, t in rows})
    methods = list(dict.fromkeys(m for rows in sweeps.values() for m, _ in rows))
    head = ["method"] + [f"{m} @ {t:.0%}" for m in models for t in targets]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for meth in methods:
        cells = [meth]
        for m in models:
            for t in targets:
                r = sweeps[m].get((meth, t))
                ci = "" if r is None or "ppl_ratio_ci" not in r else \
                    " [{:+.1f}, {:+.1f}]".format(*(100 * (v - 1) for v in r["ppl_ratio_ci"]))
                if r is None:
                    cells.append("-")
                    continue
                tail = ("*" if r.get("extrapolated") else "") if at_target else f" ({r['sparsity']:.2f})"
                cells.append(
                             f"{100 * (r['ppl_ratio'] - 1):+.1f} %{ci}{tail}")
        print("| " + " | ".join(cells) + " |")
    if at_target:
        print("\nperplexity change vs dense at exactly the target sparsity, interpolated along each method's "
              "measured curve [interval interpolated likewise]; *: extrapolated, -: no value")
        return 0
    dense = ", ".join(f"{m} {next(iter(rows.values()))['dense_ppl']:.2f}" for m, rows in sweeps.items())
    print(f"\nperplexity change vs dense [95 % paired block-bootstrap interval, where measured] "
          f"(achieved sparsity); dense perplexity: {dense}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
