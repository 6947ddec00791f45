"""Write analysis reports: ``report.json``, PNG figures and one self-contained ``report.html``.

Everything is written into a temporary folder next to the target and renamed into place
at the end, so a failed or interrupted run never leaves a partial report. The HTML embeds
every figure as a base64 PNG and loads nothing from the network; a small inline script
records each image's rendered size and any script error in the DOM (``#render-check``),
which the browser test reads back.
"""
from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import MoyuError


def _k03(row: dict) -> dict:
    return row.get("0.3", next(iter(row.values())))


def check_out(out: str | Path) -> Path:
    """Fail early, in one line, if ``out`` cannot be created (before minutes of analysis)."""
    p = Path(out).expanduser().resolve()
    if p.exists() and not p.is_dir():
        raise MoyuError(f"--out {p} exists and is not a folder: pick a folder path")
    parent = p.parent
    if not parent.is_dir():
        raise MoyuError(f"--out parent folder {parent} does not exist: create it first")
    try:
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{p.name}.")
        os.rmdir(tmp)
    except OSError as e:
        raise MoyuError(f"cannot write into {parent} ({e.strerror}): choose a writable --out") from None
    return p


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", Path(name).name).strip("-").lower() or "model"


def _figures(rep: dict, folder: Path, prefix: str) -> dict[str, str]:
    """Draw one model's figures; returns {logical name: file name}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .capture import BINS_PER_DECADE, LOG_MIN

    files: dict[str, str] = {}
    title = f"{rep['model']} ({rep['activation']}, {'gated' if rep['gated'] else 'plain'} MLP)"
    L = rep["n_layers"]
    xs = np.arange(L)
    cmap = plt.get_cmap("viridis")

    def save(fig, name):
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fn = f"{prefix}{name}.png"
        fig.savefig(folder / fn, dpi=90)
        plt.close(fig)
        files[name] = fn

    ov = rep["overactivation"]["layers"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    for key, lab in (("share_50", "50 % of mass"), ("share_90", "90 %"), ("share_99", "99 %")):
        ax[0].plot(xs, [r[key] for r in ov], marker=".", label=f"share for {lab}")
    ax[0].plot(xs, [r["gaussian_share_90"] for r in ov], "k--", label="iid Gaussian, 90 %")
    ax[0].plot(xs, [r["natural_sparsity"] for r in ov], label="natural sparsity")
    ax[0].plot(xs, [r["heavy_hitters_topk"] for r in ov], label="heavy hitters (top-k)")
    ax[0].set_xlabel("layer"); ax[0].set_ylabel("share of neurons"); ax[0].legend(fontsize=7)
    for t, ls in (("0.1", ":"), ("0.2", "-"), ("0.3", "--")):
        ax[1].plot(xs, [r[f"sparsity_at_cett_{t}"] for r in ov], ls, marker=".", label=f"CETT <= {t}")
    ax[1].set_xlabel("layer"); ax[1].set_ylabel("sparsity reachable"); ax[1].legend(fontsize=7)
    ax[1].set_ylim(0, 1)
    save(fig, "overactivation")

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for li, r in enumerate(ov):
        cv = r["cett_curve"]
        ax.plot(cv["sparsity"], cv["cett"], color=cmap(li / max(L - 1, 1)), lw=1)
    for t in (0.1, 0.2, 0.3):
        ax.axhline(t, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("sparsity (share of neurons dropped, weakest first)"); ax.set_ylabel("mean CETT")
    ax.set_ylim(0, 1.05)
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, L - 1))
    fig.colorbar(sm, ax=ax, label="layer")
    save(fig, "cett")

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for li in sorted({0, L // 2, L - 1}):
        h = np.asarray(ov[li]["hist"][1:-1], dtype=float)
        edges = 10 ** (LOG_MIN + np.arange(len(h)) / BINS_PER_DECADE)
        ax.plot(edges, h / max(h.sum(), 1), label=f"layer {li}", lw=1)
    ax.set_xscale("log"); ax.set_xlabel("|a| (MLP activation entering down_proj)"); ax.set_ylabel("share")
    ax.legend(fontsize=7)
    save(fig, "activation_hist")

    hist, pred = rep["history"]["layers"], rep["predictor"]["layers"]
    ks = list(hist[0].keys())
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    for j, k in enumerate(ks):
        c = f"C{j}"
        ax[0].plot(xs, [r[k]["cross_history"] for r in hist], color=c, marker=".", label=f"across histories, k={k}")
        ax[0].plot(xs, [r[k]["same_history"] for r in hist], color=c, ls=":", label=f"same history, k={k}")
        ax[0].plot(xs, [r[k]["unrelated"] for r in hist], color=c, ls="--", label=f"unrelated tokens, k={k}")
        ax[1].plot(xs, [r[k]["recall"] for r in pred], color=c, marker=".", label=f"recall, k={k}")
        ax[1].plot(xs, [r[k]["chance"] for r in pred], color=c, ls="--", label=f"chance, k={k}")
    ax[0].set_xlabel("layer"); ax[0].set_ylabel("Jaccard of top-k sets"); ax[0].legend(fontsize=6, ncol=2)
    ax[0].set_ylim(0, 1.05)
    ax[1].axhline(1.0, color="k", lw=0.6)
    ax[1].set_xlabel("layer"); ax[1].set_ylabel(f"rank-{rep['predictor']['rank']} predictor recall (held out)")
    ax[1].legend(fontsize=6); ax[1].set_ylim(0, 1.05)
    save(fig, "history")

    ine = rep["inertia"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    m = ine["mean"]
    ax[0].plot(m["distance"], m["by_distance_natural"], marker="o", label="natural")
    ax[0].plot(m["distance"], m["by_distance_random"], marker="s", label="random tokens")
    ax[0].axhline(m["chance"], color="k", ls="--", lw=0.7, label="chance")
    ax[0].set_xlabel(f"tokens after the first {ine['first_n']}"); ax[0].set_ylabel("overlap with first-activations set")
    ax[0].legend(fontsize=7)
    lr = ine["layers"]
    ax[1].plot(xs, [r["overlap_natural"] for r in lr], marker=".", label="natural")
    ax[1].plot(xs, [r["overlap_random"] for r in lr], marker=".", label="random tokens")
    ax[1].plot(xs, [r["cross_sequence_natural"] for r in lr], ls="--", label="other sequence's set (natural)")
    ax[1].plot(xs, [r["always_on_jaccard"] for r in lr], ls=":", label="always-on natural vs random (Jaccard)")
    ax[1].axhline(m["chance"], color="k", ls="--", lw=0.7)
    ax[1].set_xlabel("layer"); ax[1].set_ylim(0, 1.05); ax[1].legend(fontsize=7)
    save(fig, "inertia")

    cons = rep["consistency"]["layers"]
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    ax.bar(xs, [max(r["max_rel_diff"], 1e-12) for r in cons])
    ax.set_yscale("log"); ax.set_xlabel("layer"); ax.set_ylabel("max |a_par - a_seq| / max |a|")
    save(fig, "consistency")
    return files


def _compare_figure(reps: list[dict], folder: Path) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [
        ("share of neurons for 90 % mass", lambda r: [x["share_90"] for x in r["overactivation"]["layers"]]),
        ("sparsity at CETT 0.2", lambda r: [x["sparsity_at_cett_0.2"] for x in r["overactivation"]["layers"]]),
        ("Jaccard across natural histories (k=0.3)",
         lambda r: [_k03(x).get("cross_natural", _k03(x)["cross_history"]) for x in r["history"]["layers"]]),
        ("predictor recall (k=0.3)",
         lambda r: [x.get("0.3", next(iter(x.values())))["recall"] for x in r["predictor"]["layers"]]),
        ("inertia overlap: natural", lambda r: [x["overlap_natural"] for x in r["inertia"]["layers"]]),
        ("inertia overlap: random", lambda r: [x["overlap_random"] for x in r["inertia"]["layers"]]),
    ]
    fig, axs = plt.subplots(2, 3, figsize=(13, 6))
    for ax, (name, fn) in zip(axs.flat, panels):
        for r in reps:
            y = fn(r)
            ax.plot(np.linspace(0, 1, len(y)), y, marker=".", label=f"{r['model']} ({r['activation']})")
        ax.set_title(name, fontsize=9); ax.set_xlabel("relative depth"); ax.set_ylim(0, 1.05)
    axs.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "compare.png", dpi=90)
    plt.close(fig)
    return "compare.png"


def _img(folder: Path, fn: str, alt: str) -> str:
    b64 = base64.b64encode((folder / fn).read_bytes()).decode()
    return f'<figure><img class="fig" alt="{html.escape(alt)}" data-name="{fn}" src="data:image/png;base64,{b64}"><figcaption>{html.escape(fn)}</figcaption></figure>'


_CHECK_SCRIPT = """<script>
window.moyuErrors = [];
window.addEventListener('error', function (e) { window.moyuErrors.push(String(e.message)); });
window.addEventListener('load', function () {
  var out = document.getElementById('render-check');
  var imgs = document.querySelectorAll('img.fig');
  var rows = [];
  for (var i = 0; i < imgs.length; i++) {
    var im = imgs[i];
    rows.push(im.getAttribute('data-name') + ' ' + im.naturalWidth + 'x' + im.naturalHeight +
              ' shown ' + im.clientWidth + 'x' + im.clientHeight);
  }
  out.setAttribute('data-images', String(imgs.length));
  out.setAttribute('data-errors', String(window.moyuErrors.length));
  out.textContent = rows.join('\\n') + (window.moyuErrors.length ? '\\nERRORS: ' + window.moyuErrors.join('; ') : '');
});
</script>"""

_CSS = """body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:4px 6px;vertical-align:top}
th{background:#f3f3f3}.supported,.holds{color:#0a0}.partly{color:#a60}.not-supported,.fails{color:#c00}
img.fig{max-width:100%;height:auto}figure{margin:0.5em 0}pre#render-check{font-size:0.7em;color:#888}"""


def _html(reps: list[dict], figs: list[dict[str, str]], folder: Path, compare: str | None) -> str:
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             "<title>moyu analyze report</title>", f"<style>{_CSS}</style>", _CHECK_SCRIPT, "</head><body>",
             "<h1>MOYU diagnostics</h1>",
             "<p>Claims of the seed paper (MOYU, arXiv 2406.12569, and its companions) beside what "
             "each model measured here. Every number is computed from the model; the verdict rule "
             "is stated in each row. Keys of <code>report.json</code>: see docs/analyze.md.</p>"]
    claim_ids = [c["id"] for c in reps[0]["claims"]]
    parts.append("<h2>Summary</h2><table><tr><th>claim</th>" + "".join(
        f"<th>{html.escape(r['model'])} ({html.escape(r['activation'])})</th>" for r in reps) + "<th>rule</th></tr>")
    for cid in claim_ids:
        row = [c for c in reps[0]["claims"] if c["id"] == cid][0]
        cells = []
        for r, f in zip(reps, figs):
            c = next((c for c in r["claims"] if c["id"] == cid), None)
            if c is None:
                cells.append("<td>-</td>")
                continue
            v = html.escape(c["verdict"])
            link = f.get(c["figure"].removesuffix(".png"), "")
            cells.append(f"<td><b class='{v.replace(' ', '-')}'>{v}</b>: {html.escape(c['measured'])} "
                         f"<a href='#{link}'>[{html.escape(link)}]</a></td>")
        parts.append(f"<tr><td>{html.escape(row['claim'])}</td>{''.join(cells)}<td>{html.escape(row['rule'])}</td></tr>")
    parts.append("</table>")
    if compare:
        parts.append(f"<h2>Comparison</h2>{_img(folder, compare, 'comparison of models')}")
    for r, f in zip(reps, figs):
        parts.append(f"<h2>{html.escape(r['model'])}</h2><p>{html.escape(r['model_type'])}, "
                     f"{r['n_layers']} layers, d_ff {r['d_ff']}, hidden {r['hidden']}, "
                     f"{html.escape(r['activation'])} ({'gated' if r['gated'] else 'plain'} MLP); "
                     f"{r['config']['tokens']} streamed tokens; stage seconds: "
                     f"{html.escape(json.dumps(r['seconds']))}</p>")
        for name, fn in f.items():
            parts.append(f"<h3 id='{fn}'>{html.escape(name)}</h3>{_img(folder, fn, name)}")
    parts.append("<pre id='render-check'></pre></body></html>")
    return "\n".join(parts)


def write_report(reports: list, out: str | Path) -> Path:
    """Write ``report.json``, figures and ``report.html`` for one or more reports into ``out``.

    ``reports`` holds :class:`moyu.analysis.Report` objects or their dicts. ``out`` is
    replaced atomically (written next to it, then renamed).
    """
    target = check_out(out)
    reps = [r if isinstance(r, dict) else r.to_dict() for r in reports]
    if not reps:
        raise MoyuError("no reports to write")
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        figs = []
        for i, r in enumerate(reps):
            prefix = "" if len(reps) == 1 else f"{i}-{_slug(r['model'])}-"
            figs.append(_figures(r, tmp, prefix))
        compare = _compare_figure(reps, tmp) if len(reps) > 1 else None
        doc = {"models": [r["model"] for r in reps], "reports": reps,
               "figures": [dict(f) for f in figs], "compare_figure": compare}
        (tmp / "report.json").write_text(json.dumps(doc, indent=1, allow_nan=False))
        (tmp / "report.html").write_text(_html(reps, figs, tmp, compare), encoding="utf-8")
        os.chmod(tmp, 0o755)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
            os.rmdir(old)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_reports(path: str | Path) -> list[dict]:
    """The per-model report dicts in a folder (or file) written by :func:`write_report`."""
    p = Path(path)
    f = p / "report.json" if p.is_dir() else p
    try:
        doc = json.loads(f.read_text())
        return list(doc["reports"])
    except (OSError, ValueError, KeyError, TypeError):
        raise MoyuError(f"{f} is not a moyu analyze report.json: pass a folder written by "
                        "`moyu analyze --out`") from None
