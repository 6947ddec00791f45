"""benchmarks/scale_study.py on a tiny GGUF: cells are written once and skipped on a
rerun, and the report gathers them into a table and a figure."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import moyu
import pytest

_spec = importlib.util.spec_from_file_location(
    "scale_study", Path(__file__).resolve().parents[1] / "benchmarks" / "scale_study.py")
scale_study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scale_study)


@pytest.fixture
def tiny_cells(tiny_gguf, monkeypatch):
    """A loader of the tiny GGUF that records each load, with sweeps on small windows."""
    from moyu.evaluate import Windows
    import moyu.sweep as sweep
    real = sweep.run_sweep
    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: real(
        *a, **{**k, "windows": Windows(prompt=16, scored=16), "progress": False}))
    loads = []

    def load(name):
        loads.append(name)
        return moyu.load(str(tiny_gguf), verbose=False)
    return load, loads


def test_sweep_cells_resume_and_report(tiny_cells, tmp_path, one_thread):
    load, loads = tiny_cells
    args = scale_study.argparse.Namespace(
        models=["tiny"], cells="sweep", corpora=["prose"], methods=["cats", "sketch"],
        sparsities=[0.5], tokens=600, calib_tokens=600, out=str(tmp_path))
    scale_study.run_cells(args, load=load)
    cells = tmp_path / "cells" / "tiny"
    assert sorted(p.name for p in cells.glob("*.json")) == [
        "model.json", "sweep-prose-cats.json", "sweep-prose-sketch.json"]
    assert not list(cells.glob("*.tmp"))
    before = (cells / "sweep-prose-cats.json").read_text()
    scale_study.run_cells(args, load=load)           # every cell done: nothing loads
    assert loads == ["tiny"] and (cells / "sweep-prose-cats.json").read_text() == before
    scale_study.report(tmp_path)
    md = (tmp_path / "scale.md").read_text()
    assert "| dense ppl | cats | sketch |" in md and (tmp_path / "scale.png").stat().st_size > 0
    assert "Sweep protocol (evaluation tokens, calibration tokens per corpus): 600, 600" in md
    assert md.count(" [") >= 2          # each ppl change comes with its interval
    rows = json.loads((tmp_path / "scale.json").read_text())["models"][0]["cells"]["sweep-prose-cats"]["rows"]
    assert rows[0]["method"] == "cats" and rows[0]["target"] == 0.5


def test_others_to_splits_one_run_between_the_50_and_the_30_70_cells(tiny_cells, tmp_path, one_thread):
    """--others-to: one run of a method's targets, the 50 % row to --out, the rest to DIR."""
    load, loads = tiny_cells
    args = scale_study.argparse.Namespace(
        models=["tiny"], cells="sweep", corpora=["prose"], methods=["teal"], sparsities=[0.3, 0.5],
        tokens=600, calib_tokens=600, out=str(tmp_path / "main"), others_to=str(tmp_path / "others"))
    scale_study.run_cells(args, load=load)
    scale_study.run_cells(args, load=load)           # both halves written: nothing loads
    main, rest = (json.loads((tmp_path / d / "cells" / "tiny" / "sweep-prose-teal.json").read_text())
                  for d in ("main", "others"))
    assert loads == ["tiny"]
    assert [r["target"] for r in main["rows"]] == [0.5] and [r["target"] for r in rest["rows"]] == [0.3]
    assert (tmp_path / "others" / "cells" / "tiny" / "model.json").exists()


def test_statistic_mean_and_layer_range():
    name = "share of neurons for 90 % of the output"
    rep = {"overactivation": {"mean": {"share_90": 0.5}, "layers": [{"share_90": 0.7}, {"share_90": 0.4}]}}
    assert scale_study.statistic(rep, name) == 0.5
    assert scale_study.statistic_range(rep, name) == (0.4, 0.7)


def _cell(root, model: str, corpus: str, method: str, targets, tokens: int = 600) -> None:
    d = root / "cells" / model
    d.mkdir(parents=True, exist_ok=True)
    rows = [{"method": method, "target": t, "sparsity": t, "weights_skipped": t / 2, "ppl": 10 + t,
             "dense_ppl": 10.0, "ppl_ratio": (10 + t) / 10, "kl": t / 10, "top1_agree": 1 - t,
             "ppl_ratio_ci": [(10 + t) / 10 - 0.01, (10 + t) / 10 + 0.01]} for t in targets]
    (d / f"sweep-{corpus}-{method}.json").write_text(json.dumps(
        {"corpus": corpus, "method": method, "rows": rows, "tokens": tokens, "calib_tokens": 600}))


def test_sweep_cells_become_sweep_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _cell(a, "m", "prose", "cats", [0.5])
    _cell(a, "m", "prose", "sketch", [0.5])
    _cell(a, "m", "code", "cats", [0.5])
    _cell(b, "m", "prose", "cats", [0.3, 0.5, 0.7])       # another run adds 0.3 and 0.7
    scale_study.main(["--out", str(a), "--also-cells", str(b), "--sweeps-to", str(tmp_path / "out")])
    prose = json.loads((tmp_path / "out" / "m" / "sweep.json").read_text())
    assert [(r["method"], r["target"]) for r in prose["rows"]] == [
        ("cats", 0.3), ("cats", 0.5), ("cats", 0.7), ("sketch", 0.5)]
    assert prose["eval_tokens"] == 600 and "[" in (tmp_path / "out" / "m" / "sweep.md").read_text()
    code = json.loads((tmp_path / "out" / "m-code" / "sweep.json").read_text())
    assert [r["method"] for r in code["rows"]] == ["cats"] and "code" in code["text"]
    _cell(b, "m", "code", "sketch", [0.5], tokens=999)     # a different protocol cannot join
    with pytest.raises(SystemExit, match="cannot share a table"):
        scale_study.main(["--out", str(a), "--also-cells", str(b), "--sweeps-to", str(tmp_path / "out")])


def test_ranking_marks_overlapping_intervals(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "summarize_sweeps", Path(__file__).resolve().parents[1] / "benchmarks" / "summarize_sweeps.py")
    summ = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summ)
    rows = [{"method": m, "target": 0.5, "sparsity": s, "ppl_ratio": r, "ppl_ratio_ci": ci, "kl": 0.1,
             "ppl": 10 * r, "dense_ppl": 10.0}
            for m, s, r, ci in [("a", 0.5, 1.02, [1.01, 1.03]), ("b", 0.49, 1.025, [1.02, 1.04]),
                                ("c", 0.5, 1.30, [1.25, 1.35])]]
    from moyu.sweep import at_targets
    line = summ.ranking(at_targets(rows, [0.5]), 0.5, rows)
    # a and b overlap (~), b and c are apart (<); b's single point says where it was measured
    assert line == "a +2.0 [+1.0, +3.0] ~ b +2.5 [+2.0, +4.0] (0.490) < c +30.0 [+25.0, +35.0]"


def test_bench_cell_in_another_format_is_its_own_cell(tmp_path, tiny_gguf):
    """--bench-weights int8 writes cells/<model>/bench-int8.json (an fp32 bench cell would be
    bench.json) and the report lists it with its format."""
    import moyu
    args = scale_study.argparse.Namespace(
        models=["tiny"], cells="bench", corpora=["prose"], methods=[], sparsities=[0.5], tokens=600,
        calib_tokens=800, out=str(tmp_path), bench_tokens=4, bench_runs=1, bench_weights="int8",
        bench_no_hf=True)
    scale_study.run_cells(args, load=lambda name: moyu.load(str(tiny_gguf), verbose=False))
    cell = json.loads((tmp_path / "cells" / "tiny" / "bench-int8.json").read_text())
    assert cell["weights"] == "int8" and "moyu_sparse" in cell and "hf" not in cell
    scale_study.report(tmp_path)
    assert "| tiny | int8 |" in (tmp_path / "scale.md").read_text()
