"""The code corpus: the Python standard library split by module into disjoint, deterministic
halves, selectable with ``--corpus code`` on every command that reads text."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from moyu import MoyuError, cli, code_corpus, data


def _one_line(e):
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def _rel(paths):
    root = code_corpus.stdlib_dir()
    return [p.relative_to(root) for p in paths]


def test_splits_share_no_module_and_no_file():
    ev, ca = _rel(code_corpus.files("eval")), _rel(code_corpus.files("calib"))
    assert len(ev) > 50 and len(ca) > 50
    assert not set(ev) & set(ca)
    ev_mods = {code_corpus.module_of(r) for r in ev}
    ca_mods = {code_corpus.module_of(r) for r in ca}
    assert not ev_mods & ca_mods
    # a package's files all land on one side
    for pkg in ("json", "email", "asyncio"):
        sides = {code_corpus.split_of(code_corpus.module_of(r)) for r in ev + ca if r.parts[0] == pkg}
        assert len(sides) == 1, pkg
    # test suites, third-party packages and machine-specific files are not in either split
    for r in ev + ca:
        assert not {"test", "tests", "site-packages"} & set(r.parts), r
        assert not r.name.startswith("_sysconfigdata"), r


def test_split_texts_do_not_overlap():
    ev, ca = code_corpus.code_text("eval"), code_corpus.code_text("calib")
    ev_files = {ln for ln in ev.splitlines() if ln.startswith("# file: ")}
    ca_files = {ln for ln in ca.splitlines() if ln.startswith("# file: ")}
    assert ev_files and ca_files and not ev_files & ca_files
    cut = code_corpus.code_text("eval", max_chars=5_000)
    assert len(cut) == 5_000 and ev.startswith(cut)
    assert cut.count("# file: ") >= 2          # a short text already spans several modules


def test_split_rule_is_a_fixed_hash_of_the_module_name():
    # sha256 parity, never Python's salted hash(): same answer in every process
    for name in ("json", "os", "typing", "asyncio", "zipfile"):
        odd = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 2
        assert code_corpus.split_of(name) == ("eval" if odd else "calib")


@pytest.mark.slow   # seconds of end-to-end work: the full suite runs it
def test_same_text_in_a_fresh_interpreter_with_another_hash_seed():
    here = {s: hashlib.sha256(code_corpus.code_text(s, 200_000).encode()).hexdigest() for s in ("eval", "calib")}
    code = ("import hashlib, json; from moyu import code_corpus as c; print(json.dumps({s: "
            "hashlib.sha256(c.code_text(s, 200_000).encode()).hexdigest() for s in ('eval', 'calib')}))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == here


def test_info_records_the_python_version():
    import platform

    info = code_corpus.corpus_info()
    assert info["python"] == platform.python_version() and info["python"] in info["source"]
    assert info["eval_modules"] > 20 and info["calib_modules"] > 20 and len(info["files_sha256"]) == 16
    assert data.corpus_label("code") == f"code corpus ({info['source']})"
    assert data.corpus_label("prose") == "eval corpus"


def test_tokens_from_the_code_corpus(tiny_gguf, temp_cache):
    import moyu

    _, tok = moyu.load(str(tiny_gguf), verbose=False)
    ev = data.tokens(tok, "eval", 500, corpus="code")
    ca = data.tokens(tok, "calib", 500, corpus="code")
    assert len(ev) == len(ca) == 500 and not (ev == ca).all()
    head = tok(code_corpus.code_text("eval", 3_000), add_special_tokens=False).input_ids
    assert ev[:100].tolist() == head[:100]


def test_bad_corpus_and_missing_sources_are_one_line(monkeypatch, tmp_path):
    with pytest.raises(MoyuError) as e:
        data.tokens(None, "eval", 10, corpus="poetry")
    assert "poetry" in _one_line(e) and "code" in str(e.value)
    with pytest.raises(MoyuError) as e:
        code_corpus.files("train")
    assert "calib" in _one_line(e)
    monkeypatch.setattr(code_corpus, "stdlib_dir", lambda: tmp_path / "no-stdlib")
    with pytest.raises(MoyuError) as e:
        code_corpus.code_text("eval")
    assert "--text" in _one_line(e)


@pytest.fixture
def spy(monkeypatch):
    """Record which split of the code corpus each command reads."""
    seen = []
    real = code_corpus.code_text

    def recording(split="eval", max_chars=None):
        seen.append(split)
        return real(split, max_chars)

    monkeypatch.setattr(code_corpus, "code_text", recording)
    return seen


TINY = ["--prompt-len", "16", "--scored-len", "16"]


def test_corpus_flag_on_eval_calibrate_and_sweep(tiny_gguf, tmp_path, capsys, spy, monkeypatch):
    from moyu.models import cache_dir

    real = cache_dir()     # an isolated cache that still sees the fetched prose corpus
    monkeypatch.setenv("MOYU_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "data").symlink_to(real / "data")
    gguf = str(tiny_gguf)
    assert cli.main(["eval", "--model", gguf, *TINY, "--tokens", "200", "--corpus", "code", "--json"]) == 0
    code = json.loads(capsys.readouterr().out)
    assert spy == ["eval"] and code["text"].startswith("code corpus (Python ")
    spy.clear()
    prof = tmp_path / "cats.moyu"
    assert cli.main(["calibrate", "--model", gguf, *TINY, "--method", "cats", "--calib-tokens", "300",
                     "--corpus", "code", "--out", str(prof)]) == 0
    assert spy == ["calib"] and prof.stat().st_size > 0
    spy.clear()
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "--model", gguf, *TINY, "--tokens", "200", "--methods", "cats",
                     "--sparsities", "0.5", "--calib-tokens", "300", "--corpus", "code",
                     "--out", str(out)]) == 0
    assert sorted(spy) == ["calib", "eval"]
    assert json.loads((out / "sweep.json").read_text())["text"].startswith("code corpus")
    spy.clear()
    capsys.readouterr()
    assert cli.main(["eval", "--model", gguf, *TINY, "--tokens", "200", "--json"]) == 0   # prose default
    prose = json.loads(capsys.readouterr().out)
    assert spy == [] and prose["text"] == "eval corpus" and prose["ppl"] != code["ppl"]
