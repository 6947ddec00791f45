"""The HTML report opens in a real browser offline: every figure renders, no console errors.

Uses headless Chromium (Debian: ``apt-get install -y chromium``) with ``--dump-dom``; the
report's inline script writes each image's natural and shown size and any script error
into ``#render-check``, which the dumped DOM carries back.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from moyu.analysis import AnalyzeConfig, analyze
from moyu.report import write_report
from moyu.tiny import tiny_model

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome"))
                 if p), None)
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="Chromium not found (apt-get install -y chromium)"),
              pytest.mark.slow]   # a headless browser: seconds per page

SMALL = dict(tokens=128, window=64, cett_tokens=8, cett_grid=8, histories=4, history_len=12,
             probes=1, probe_len=6, predictor_tokens=96, predictor_eval=48, inertia_seqs=2,
             inertia_len=32, first_n=6, prompt_n=12, consistency_seqs=1, consistency_len=6)


def _dump(html: Path) -> tuple[str, str]:
    with tempfile.TemporaryDirectory() as prof:
        res = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={prof}", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=5000", "--dump-dom", html.as_uri()],
            capture_output=True, text=True, timeout=90)
    return res.stdout, res.stderr


def _console_errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines()
            if "CONSOLE" in ln and re.search(r"error|uncaught", ln, re.I)]


def _check(dom: str) -> tuple[int, int, list[tuple[int, int, int, int]]]:
    m = re.search(r'<pre id="render-check" data-images="(\d+)" data-errors="(\d+)">(.*?)</pre>', dom, re.S)
    assert m, "the report's render check did not run"
    sizes = [tuple(map(int, s)) for s in re.findall(r"(\d+)x(\d+) shown (\d+)x(\d+)", m.group(3))]
    return int(m.group(1)), int(m.group(2)), sizes


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    reps = []
    for mt in ("llama", "gpt2"):
        g = torch.Generator().manual_seed(3)
        reps.append(analyze(tiny_model(mt), None, AnalyzeConfig(**SMALL),
                            eval_ids=torch.randint(0, 256, (1500,), generator=g),
                            calib_ids=torch.randint(0, 256, (800,), generator=g), progress=False))
    return write_report(reps, tmp_path_factory.mktemp("browser") / "rep")


def test_report_renders_without_errors(report_dir):
    dom, err = _dump(report_dir / "report.html")
    n_img, n_err, sizes = _check(dom)
    assert n_img == len(list(report_dir.glob("*.png"))) == len(sizes) > 0
    assert n_err == 0
    assert all(w > 0 and h > 0 and sw > 0 and sh > 0 for w, h, sw, sh in sizes), sizes
    assert _console_errors(err) == []


def test_check_detects_broken_page(report_dir, tmp_path):
    """The checks can fail: a script error and a broken image are both caught."""
    html = (report_dir / "report.html").read_text()
    html = html.replace("<pre id='render-check'>",
                        "<img class='fig' data-name='broken' src='data:image/png;base64,AAAA'>"
                        "<script>undefinedFunction();</script><pre id='render-check'>")
    bad = tmp_path / "bad.html"
    bad.write_text(html)
    dom, err = _dump(bad)
    _, n_err, sizes = _check(dom)
    assert n_err == 1
    assert any(w == 0 for w, *_ in sizes)
    assert _console_errors(err)
