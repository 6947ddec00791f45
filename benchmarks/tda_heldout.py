"""How far TDA's held-out sparsity can sit from its target, and why: text sample vs method.

TDA fixes one threshold per layer offline (calibrated so the mean sparsity over the
calibration prompts hits the target); the kept count then adapts to each prompt. Its
achieved sparsity on other text therefore depends on how alike the two texts are, more
than a per-token threshold does (a prompt-level statistic varies with the whole prompt).

This runs the dense model once over many windows of the calibration and evaluation splits
of a corpus (the evaluation protocol: BOS + 256-token prompts), keeps TDA's statistic per
window, and then, without any further forward pass, calibrates on the first ``16`` windows
(what ``moyu eval --calib-tokens 8192`` reads) or on all of them, and measures the held-out
sparsity on each consecutive slice of 31 evaluation windows (one 8,449-token evaluation,
as the published sweeps use) and on all evaluation windows. The spread over slices is
the sampling noise of an 8k-token check; the gap that remains with all windows on both
sides is the corpus split's own shift.

With ``--spread N`` it instead takes N prompts spaced evenly over the whole of each split
(so every file or play contributes, not the first few), and reports the held-out sparsity
over all N evaluation prompts for thresholds fitted on the first 16 windows of the
calibration split (TDA's calibration text before), on 16 windows of the spread sample
(``moyu.data.tokens(sample="spread")``, what TDA calibrates on now), and on all N
spread prompts: what TDA's threshold gives on the evaluation split as a whole rather than
on one 8k sample of it.

    python benchmarks/tda_heldout.py [--model smollm2-135m] [--corpora prose,code]
        [--tokens 33000] [--spread N] [--out docs/results/tda/heldout]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import moyu
from moyu import data
from moyu.atomic import write_json_atomic, write_text_atomic
from moyu.bench import cpu_name
from moyu.evaluate import Windows
from moyu.methods import calib as C
from moyu.methods.method import get_method

TARGETS = (0.3, 0.5, 0.7)
SLICE = 31          # windows in one 8,449-token evaluation (stride 256)
DEFAULT_CALIB = 16  # windows one default calibration reads


def window_stats(model, ids: torch.Tensor, windows: Windows, n: int) -> torch.Tensor:
    """TDA's full-prompt statistic per window and layer: [windows, layers, d_ff]."""
    tda = get_method("tda")
    fn = tda.prompt_summary(tda.make_options(by_length=False), windows)
    s = C.collect(model, ids, windows, set(), max_windows=n, prompts=fn, progress=True)
    return torch.stack([torch.stack(per_layer)[:, -1] for per_layer in s.prompts], 1)


def held_out(calib: torch.Tensor, evals: torch.Tensor, target: float) -> torch.Tensor:
    """Per evaluation window, the sparsity (mean over layers) under thresholds fitted on ``calib``."""
    theta = torch.tensor([C.quantile(calib[:, l], target) for l in range(calib.shape[1])])
    return (evals <= theta[None, :, None]).float().mean(-1).mean(-1)


def spread_ids(ids: torch.Tensor, n: int, chunk: int) -> torch.Tensor:
    """``n`` chunks of ``chunk`` tokens spaced evenly over ``ids``, concatenated so that the
    prompt of window ``i`` (stride ``chunk``) is chunk ``i``; one more chunk pads the tail."""
    last = len(ids) - chunk
    if last < n:
        raise SystemExit(f"split too short for {n} spread prompts: {len(ids)} tokens")
    starts = [round(i * last / n) for i in range(n + 2)]
    return torch.cat([ids[a:a + chunk] for a in starts])


def spread_rows(model, tok, windows: Windows, corpus: str, n: int) -> list[dict]:
    """Held-out sparsity over ``n`` spread evaluation prompts for three calibrations."""
    n_cal = DEFAULT_CALIB * windows.scored + 513
    head = window_stats(model, data.tokens(tok, "calib", n_cal, corpus=corpus), windows, DEFAULT_CALIB)
    moyu_spread = window_stats(model, data.tokens(tok, "calib", n_cal, corpus=corpus, sample="spread"),
                               windows, DEFAULT_CALIB)
    cal = window_stats(model, spread_ids(data.tokens(tok, "calib", None, corpus=corpus), n, windows.scored),
                       windows, n)
    ev = window_stats(model, spread_ids(data.tokens(tok, "eval", None, corpus=corpus), n, windows.scored),
                      windows, n)
    fits = ((f"head: first {DEFAULT_CALIB} windows (before)", head),
            (f"spread sample, {DEFAULT_CALIB} windows (TDA's default)", moyu_spread),
            (f"all {n} spread prompts", cal))
    rows = []
    for target in TARGETS:
        for label, fit in fits:
            per = held_out(fit, ev, target)
            half = 1.96 * float(per.std()) / len(per) ** 0.5
            row = {"corpus": corpus, "target": target, "calibration": label, "held_out": round(float(per.mean()), 4),
                   "ci95": [round(float(per.mean()) - half, 4), round(float(per.mean()) + half, 4)],
                   "window_sd": round(float(per.std()), 4)}
            rows.append(row)
            print(f"{corpus:5s} {target:.1f} calib {label:42s} held-out over {n} spread prompts "
                  f"{row['held_out']:.3f} [{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}]", flush=True)
    return rows


def main() -> None:
    """Measure every (corpus, target, calibration size) and write the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpora", default="prose,code")
    ap.add_argument("--tokens", type=int, default=4 * SLICE * 256 + 513,
                    help="tokens read from each split (default: four 31-window slices)")
    ap.add_argument("--spread", type=int, help="N prompts spaced evenly over each whole split instead")
    ap.add_argument("--out", help="write OUT.json and OUT.md")
    args = ap.parse_args()
    model, tok = moyu.load(args.model, verbose=False)
    windows = Windows().resolved(model)
    env = f"torch {torch.__version__} | CPU {cpu_name()} | {args.model} | {torch.get_num_threads()} threads"
    print(env, flush=True)
    if args.spread:
        write_spread(args, env, [r for c in args.corpora.split(",") for r in spread_rows(model, tok, windows, c, args.spread)])
        return
    rows = []
    for corpus in args.corpora.split(","):
        cal_ids = data.tokens(tok, "calib", args.tokens, corpus=corpus)
        ev_ids = data.tokens(tok, "eval", args.tokens, corpus=corpus)
        n = len(windows.starts(min(len(cal_ids), len(ev_ids))))
        cal, ev = window_stats(model, cal_ids, windows, n), window_stats(model, ev_ids, windows, n)
        for target in TARGETS:
            for label, fit in ((f"first {DEFAULT_CALIB} windows", cal[:DEFAULT_CALIB]), (f"all {n} windows", cal)):
                per_window = held_out(fit, ev, target)
                slices = [float(per_window[i:i + SLICE].mean()) for i in range(0, n - SLICE + 1, SLICE)]
                row = {"corpus": corpus, "target": target, "calibration": label,
                       "slices": [round(v, 4) for v in slices], "all": round(float(per_window.mean()), 4),
                       "window_sd": round(float(per_window.std()), 4),
                       "slice_range": round(max(slices) - min(slices), 4) if slices else None}
                rows.append(row)
                print(f"{corpus:5s} {target:.1f} calib {label:16s} held-out per 8k slice "
                      f"{' '.join(f'{v:.3f}' for v in slices)} | all {row['all']:.3f} "
                      f"(per-window sd {row['window_sd']:.3f})", flush=True)
    if args.out:
        write_table(args.out, f"python benchmarks/tda_heldout.py --model {args.model} --corpora {args.corpora} "
                    f"--tokens {args.tokens} --out {args.out}", env, rows,
                    ["TDA (`by_length=false`, full 257-position prompts) calibrated on the calibration split,",
                     "held-out sparsity on the evaluation split: per consecutive 31-window slice (one",
                     "8,449-token evaluation each) and over all windows."],
                    ["corpus", "target", "calibrated on", "held-out per 8k slice", "all windows", "spread of slices"],
                    [[r["corpus"], f"{r['target']:.1f}", r["calibration"], " / ".join(f"{v:.3f}" for v in r["slices"]),
                      f"{r['all']:.3f}", f"{r['slice_range']:.3f}"] for r in rows])


def write_spread(args, env: str, rows: list[dict]) -> None:
    """Write the ``--spread`` table (OUT.json, OUT.md) when ``--out`` is given."""
    if not args.out:
        return
    write_table(args.out, f"python benchmarks/tda_heldout.py --model {args.model} --corpora {args.corpora} "
                f"--spread {args.spread} --out {args.out}", env, rows,
                ["TDA (`by_length=false`, full 257-position prompts): threshold per layer fitted on the",
                 f"calibration split, held-out sparsity over {args.spread} prompts spaced evenly over the whole",
                 "evaluation split (95 % interval over prompts)."],
                ["corpus", "target", "calibrated on", "held-out sparsity", "95 % interval", "per-prompt sd"],
                [[r["corpus"], f"{r['target']:.1f}", r["calibration"], f"{r['held_out']:.3f}",
                  f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]", f"{r['window_sd']:.3f}"] for r in rows])


def write_table(path: str, cmd: str, env: str, rows: list[dict], caption: list[str],
                header: list[str], body: list[list[str]]) -> None:
    """``path``.json (the command, environment and rows) and ``path``.md (a markdown table)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out.with_suffix(".json"), {"command": cmd, "environment": env, "rows": rows}, indent=1)
    lines = [f"`{cmd}`", "", env, "", *caption, "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)] + ["| " + " | ".join(cells) + " |" for cells in body]
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
