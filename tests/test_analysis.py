"""moyu analyze: the analyses compute what they claim, on tiny models of a gated and a plain MLP."""
from __future__ import annotations

import json
import math
import os
import stat

import pytest
import torch

from moyu.analysis import AnalyzeConfig, Report, analyze, claims
from moyu.analysis.inertia import griffin_scores
from moyu.analysis.overactivation import _LayerAcc
from moyu.errors import MoyuError
from moyu.predictor import LowRankPredictor, fit_lowrank, topk_recall
from moyu.report import write_report
from moyu.tiny import tiny_model

SMALL = dict(tokens=128, window=64, cett_tokens=16, cett_grid=10, histories=4, history_len=16,
             probes=1, probe_len=8, predictor_tokens=128, predictor_eval=64, inertia_seqs=3,
             inertia_len=40, first_n=8, prompt_n=24, consistency_seqs=2, consistency_len=8)


def _ids(seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def reports() -> dict[str, Report]:
    out = {}
    for mt in ("llama", "gpt2"):
        out[mt] = analyze(tiny_model(mt), None, AnalyzeConfig(**SMALL), eval_ids=_ids(1, 2000),
                          calib_ids=_ids(2, 1000), progress=False)
    return out


def _numbers(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _numbers(v)
    elif isinstance(x, list):
        for v in x:
            yield from _numbers(v)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield x


@pytest.mark.parametrize("mt", ["llama", "gpt2"])
def test_ranges_and_sanity(reports, mt):
    r = reports[mt]
    assert r.gated == (mt == "llama")
    assert all(math.isfinite(v) for v in _numbers(r.to_dict()))
    for row in r.overactivation["layers"]:
        assert 0 < row["share_50"] <= row["share_90"] <= row["share_99"] <= 1
        assert 0 <= row["natural_sparsity"] <= 1 and 0 <= row["heavy_hitters_topk"] <= 1
        cett = row["cett_curve"]["cett"]
        assert cett[0] == pytest.approx(1.0, abs=1e-4)        # nothing kept: all dropped
        assert cett[-1] == pytest.approx(0.0, abs=1e-4)       # everything kept
        assert row["sparsity_at_cett_0.1"] <= row["sparsity_at_cett_0.2"] <= row["sparsity_at_cett_0.3"]
        assert sum(row["hist"]) == row["tokens"] * r.d_ff
    for row in r.history["layers"]:
        for k, v in row.items():
            assert v["same_history"] == 1.0                   # two separate runs, same history
            assert v["unrelated"] < v["cross_history"] < 1.0
    for row in r.predictor["layers"]:
        assert all(0 <= v["recall"] <= 1 for v in row.values())
    for row in r.inertia["layers"]:
        assert 0 <= row["overlap_natural"] <= 1 and 0 <= row["overlap_random"] <= 1
        assert row["semantic_irrelevant"] == (row["overlap_random"] >= row["overlap_natural"] - 0.05)
    fp = r.inertia["from_prompt"]          # the set chosen from a whole prompt, as GRIFFIN/TDA do
    assert fp["first_n"] == 24 and fp["length"] == 24 + 40 - 8 and len(fp["layers"]) == len(r.inertia["layers"])
    assert all(0 <= row["overlap_natural"] <= 1 for row in fp["layers"])
    assert fp["mean"]["overlap_natural"] != r.inertia["mean"]["overlap_natural"]
    for v in r.history["mean"].values():
        assert 0 <= v["cross_mixed"] <= 1 and v["cross_natural"] is not None
    assert r.consistency["max_rel_diff"] < 1e-4
    assert r.consistency["min_topk_jaccard"] > 0.99
    assert [c["id"] for c in r.claims] == [c["id"] for c in claims(r)]


def test_numbers_depend_on_the_model(reports):
    other = analyze(tiny_model("llama", seed=5), None, AnalyzeConfig(**SMALL), eval_ids=_ids(1, 2000),
                    calib_ids=_ids(2, 1000), progress=False)
    a, b = reports["llama"], other
    assert a.overactivation["mean"]["share_90"] != b.overactivation["mean"]["share_90"]
    assert a.history["mean"]["0.3"]["cross_history"] != b.history["mean"]["0.3"]["cross_history"]
    assert a.inertia["mean"]["overlap_natural"] != b.inertia["mean"]["overlap_natural"]


def test_cett_exact_against_masked_matmul():
    torch.manual_seed(0)
    W = torch.randn(32, 96)
    a = torch.randn(5, 96)
    cfg = AnalyzeConfig(cett_grid=8)
    acc = _LayerAcc(96, W.norm(dim=0), W, cfg)
    c = a.abs() * W.norm(dim=0)
    acc._cett(a, c)
    rank = c.argsort(-1, descending=True).argsort(-1)
    for g, frac in enumerate(acc.grid.tolist()):
        k = round(frac * 96)
        want = (((a * (rank >= k)) @ W.T).norm(dim=-1) / (a @ W.T).norm(dim=-1)).mean()
        assert float(acc.cett_sum[g] / 5) == pytest.approx(float(want), rel=1e-4, abs=1e-5)


def test_griffin_statistic():
    a = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])
    assert torch.allclose(griffin_scores(a), torch.tensor([0.6, 0.8, 1.0]))


def test_predictor_roundtrip_and_recall():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(400, 16, generator=g)
    A = torch.randn(16, 4, generator=g) @ torch.randn(4, 64, generator=g)
    Y = X @ A
    p = fit_lowrank(X, Y, rank=4)
    assert topk_recall(p.scores(X), Y, 16) > 0.95          # exactly low-rank: recovered
    q = LowRankPredictor.from_state_dict(p.state_dict())
    assert torch.equal(q.scores(X), p.scores(X))
    assert p.scores(X[:3, None]).shape == (3, 1, 64)
    a, b, bias = p.folded()                                  # dejavu-linear's raw-input form
    assert torch.allclose((X @ a) @ b + bias, p.scores(X), atol=1e-4)
    bad = fit_lowrank(X, torch.randn(400, 64, generator=g), rank=4)
    assert topk_recall(bad.scores(X[:100]), Y[:100], 16) < 0.5
    p2 = fit_lowrank(X, Y, rank=4, steps=5)
    assert topk_recall(p2.scores(X), Y, 16) > 0.9
    with pytest.raises(ValueError):
        topk_recall(Y, Y, 0)


def test_bad_config_errors():
    m = tiny_model("llama")
    with pytest.raises(MoyuError, match="too small"):
        analyze(m, None, AnalyzeConfig(**{**SMALL, "tokens": 10}), eval_ids=_ids(1, 2000), calib_ids=_ids(2, 1000))
    with pytest.raises(MoyuError, match="no neurons"):
        analyze(m, None, AnalyzeConfig(**{**SMALL, "ks": (0.001,)}), eval_ids=_ids(1, 2000), calib_ids=_ids(2, 1000))
    with pytest.raises(MoyuError, match="histories"):
        analyze(m, None, AnalyzeConfig(**{**SMALL, "histories": 2}), eval_ids=_ids(1, 2000), calib_ids=_ids(2, 1000))
    with pytest.raises(MoyuError, match="eval text has"):
        analyze(m, None, AnalyzeConfig(**SMALL), eval_ids=_ids(1, 100), calib_ids=_ids(2, 1000))


@pytest.mark.slow   # seconds of end-to-end work: the full suite runs it
def test_report_files_and_atomic_out(reports, tmp_path):
    out = write_report(list(reports.values()), tmp_path / "rep")
    doc = json.loads((out / "report.json").read_text())
    assert doc["models"] == ["tiny-llama", "tiny-gpt2"]
    html = (out / "report.html").read_text()
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html
    assert html.count("data:image/png;base64,") == len(list(out.glob("*.png")))
    assert (out / "compare.png").is_file()
    # rewriting replaces the folder; no temp folders are left next to it
    write_report([reports["llama"]], tmp_path / "rep")
    assert json.loads((out / "report.json").read_text())["models"] == ["tiny-llama"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_unwritable_out_nonroot(reports, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    with pytest.raises(MoyuError, match="cannot write"):
        write_report([reports["llama"]], ro / "rep")


def test_cli_bad_inputs(tmp_path, capsys):
    from moyu.cli import main
    assert main(["analyze", "--model", "no-such-model", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moyu: error:") and "\n" not in err
    assert main(["analyze", "--out", "/proc/no/such/dir/r"]) == 2
    assert "moyu: error:" in capsys.readouterr().err
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["analyze", "--out", str(f)]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["analyze", "--tokens", "5", "--out", str(tmp_path / "r")]) == 2
    assert "too small" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_cli_unsupported_architecture(tmp_path, monkeypatch, capsys):
    from moyu import cli
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model("bloom", hidden_size=32, n_layer=1, n_head=2, vocab_size=64)
    m = AutoModelForCausalLM.from_config(cfg)
    monkeypatch.setattr(cli, "load_model", lambda args, name=None: (m, None))
    assert cli.main(["analyze", "--out", str(tmp_path / "r")]) == 2
    assert "unsupported architecture" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_real_default_model_small(tmp_path):
    import moyu
    try:
        model, tok = moyu.load(verbose=False)
    except MoyuError as e:
        pytest.skip(f"default model not available: {e}")
    cfg = AnalyzeConfig(**{**SMALL, "tokens": 128, "window": 128})
    r = analyze(model, tok, cfg, progress=False)
    assert r.n_layers == 30 and r.gated
    assert r.consistency["max_rel_diff"] < 1e-3
    assert all(v["same_history"] == 1.0 for row in r.history["layers"] for v in row.values())


def test_long_prompt_inertia_can_be_skipped_and_is_checked():
    r = analyze(tiny_model("llama", seed=2), None, AnalyzeConfig(**{**SMALL, "prompt_n": 0}),
                eval_ids=_ids(1, 2000), calib_ids=_ids(2, 1000), progress=False)
    assert "from_prompt" not in r.inertia
    with pytest.raises(MoyuError, match="--prompt-n 8 must be longer than --first-n 8"):
        AnalyzeConfig(**{**SMALL, "prompt_n": 8}).validate(64)
    # a prompt longer than the model's context (256 positions) is shortened to fit
    r = analyze(tiny_model("llama"), None, AnalyzeConfig(**{**SMALL, "prompt_n": 300}),
                eval_ids=_ids(1, 3000), calib_ids=_ids(2, 1000), progress=False)
    assert r.inertia["from_prompt"]["first_n"] == 256 - 40 + 8 and r.config["prompt_n"] == 224


def test_analysis_bos_follows_the_tokenizer_rule():
    """Analysis windows start like evaluation windows: BOS only where the tokenizer adds one."""
    from moyu.analysis.common import bos_prefix
    model = tiny_model("llama")
    model.config.bos_token_id = 1
    assert bos_prefix(model, None).tolist() == []          # SmolLM2-like: nothing recorded
    model.moyu_bos = 1                                      # Gemma-like: load() recorded a BOS
    assert bos_prefix(model, None).tolist() == [1]

    class Tok:   # a tokenizer with a BOS id that does not add it (SmolLM2's)
        bos_token_id = 1

        def __call__(self, text, add_special_tokens=True):
            return type("E", (), {"input_ids": [5]})()
    assert bos_prefix(model, Tok()).tolist() == []


def test_inertia_layer_mean_skips_layers_without_always_on_neurons():
    from moyu.analysis.inertia import layer_mean
    rows = [{"overlap_natural": 0.5, "always_on_90_jaccard": None, "semantic_irrelevant": True},
            {"overlap_natural": 0.7, "always_on_90_jaccard": 0.25, "semantic_irrelevant": False}]
    assert layer_mean(rows) == pytest.approx({"overlap_natural": 0.6, "always_on_90_jaccard": 0.25})
    assert layer_mean(rows[:1])["always_on_90_jaccard"] is None
