"""benchmarks/task_sweep.py on a tiny model: the report files, resuming from finished
cells, and a refused resume into another grid."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from moyu import MoyuError

pytest.importorskip("lm_eval")
_spec = importlib.util.spec_from_file_location(
    "task_sweep", Path(__file__).resolve().parents[1] / "benchmarks" / "task_sweep.py")
task_sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(task_sweep)


@pytest.mark.slow   # seconds of end-to-end work: the full suite runs it
def test_grid_report_and_resume(tiny_gguf, tmp_path, monkeypatch, one_thread, temp_cache):
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"the heat {i} in the sun then thin" for i in range(200)))
    out = tmp_path / "grid"
    args = ["--model", str(tiny_gguf), "--methods", "cats,griffin", "--sparsities", "0.5", "--tasks", "boolq",
            "--limit", "3", "--calib-tokens", "1000", "--calib-text", str(calib), "--out", str(out)]
    assert task_sweep.main(args) == 0
    rep = json.loads((out / "task_sweep.json").read_text())
    assert rep["limit"] == 3 and {(c["method"], c["target"]) for c in rep["cells"]} == {("cats", 0.5), ("griffin", 0.5)}
    for c in rep["cells"]:
        t = c["tasks"]["boolq"]
        assert t["n"] == 3 and t["diff"] == pytest.approx(t["sparse"] - t["dense"])
        assert c["average"]["diff"] == pytest.approx(t["diff"]) and 0.3 < c["measured"] < 0.7
    md = (out / "task_sweep.md").read_text()
    assert "| cats |" in md and "| boolq | 3 |" in md and (out / "task_sweep.png").stat().st_size > 0
    assert sorted(p.name for p in out.iterdir()) == ["cells.json", "task_sweep.json", "task_sweep.md",
                                                     "task_sweep.png"]

    # a rerun computes only the missing cell (griffin at 0.7) and keeps the others
    import moyu.methods
    real = moyu.methods.calibrate
    seen = []
    monkeypatch.setattr(moyu.methods, "calibrate", lambda *a, **k: seen.append(k["method"]) or real(*a, **k))
    assert task_sweep.main(args[:5] + ["0.5,0.7", "--methods", "griffin"] + args[6:]) == 0
    assert seen == ["griffin"]
    cells = json.loads((out / "cells.json").read_text())["cells"]
    assert set(cells) == {"dense", "cats@0.5", "griffin@0.5", "griffin@0.7"}

    # --report rewrites the files from the saved cells, naming every run that made them
    (out / "task_sweep.md").unlink()
    assert task_sweep.main(["--report", "--out", str(out)]) == 0
    md = (out / "task_sweep.md").read_text()
    assert md.startswith("Made by the workers") and "--methods griffin" in md and "| griffin |" in md

    with pytest.raises(MoyuError, match="holds another grid"):
        task_sweep.main(args[:9] + ["4"] + args[10:])
