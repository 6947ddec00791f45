"""One Markdown table from several ``moyu sweep`` outputs: perplexity change vs dense per
method and target sparsity, models side by side (what docs/methods.md shows).

    python benchmarks/summarize_sweeps.py docs/results/smollm2-135m docs/results/gemma3-270m

``--at-target`` prints each method at exactly the target sparsity instead (interpolated along
its own curve, :func:`moyu.sweep.at_targets`; `*`: extrapolated, `-`: too far outside).
``--rank T`` prints, per sweep, the methods ordered by perplexity change at target T (at
equal achieved sparsity), with `<` where two neighbours' 95 % intervals are apart and `~`
where they overlap (the difference is not established). Columns are named by folder
(``smollm2-135m``, ``smollm2-135m-code``, ...).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def ranking(points: list[dict], target: float, rows: list[dict] = ()) -> str:
    """``a +1.0 [+0.5, +1.5] ~ b +1.2 [...] < c ...`` at ``target``: lowest change first.

    A method with no interpolated value (one measured point, not exactly at the target)
    enters with its measured point, its achieved sparsity in parentheses."""
    pts = [p for p in points if abs(p["target"] - target) < 1e-9 and p["ppl_ratio"] is not None]
    have = {p["method"] for p in pts}
    pts += [dict(r, achieved=r["sparsity"]) for r in rows
            if abs(r["target"] - target) < 1e-9 and r["method"] not in have]
    pts.sort(key=lambda p: p["ppl_ratio"])
    out = []
    for i, p in enumerate(pts):
        lo, hi = p.get("ppl_ratio_ci") or (p["ppl_ratio"], p["ppl_ratio"])
        if i:
            prev_hi = (pts[i - 1].get("ppl_ratio_ci") or (0, pts[i - 1]["ppl_ratio"]))[1]
            out.append("<" if lo > prev_hi else "~")
        flag = ("*" if p.get("extrapolated") else "") + (f" ({p['achieved']:.3f})" if "achieved" in p else "")
        out.append(f"{p['method']} {100 * (p['ppl_ratio'] - 1):+.1f} [{100 * (lo - 1):+.1f}, {100 * (hi - 1):+.1f}]{flag}")
    return " ".join(out)


def main(dirs: list[str]) -> int:
    at_target = "--at-target" in dirs
    rank = None
    if "--rank" in dirs:
        i = dirs.index("--rank")
        rank = float(dirs[i + 1])
        dirs = dirs[:i] + dirs[i + 2:]
    dirs = [d for d in dirs if d != "--at-target"]
    if rank is not None:
        from moyu.sweep import at_targets
        for d in dirs:
            meta = json.loads((Path(d) / "sweep.json").read_text())
            print(f"- {Path(d).name}: {ranking(at_targets(meta['rows'], [rank]), rank, meta['rows'])}")
        print(f"\nperplexity change vs dense at exactly {rank:.0%} sparsity [95 % interval]; <: intervals apart, "
              "~: intervals overlap; *: extrapolated; (s): a single measured point at achieved sparsity s")
        return 0
    sweeps = {}
    for d in dirs:
        meta = json.loads((Path(d) / "sweep.json").read_text())
        meta["model"] = Path(d).name
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
