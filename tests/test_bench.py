"""moyu bench: side-by-side timing, ratios, roofline and metering on a tiny model."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moyu.bench import bench, memory_bandwidth
from moyu.evaluate import Windows
from moyu.methods import calibrate


def _ids(n, seed=0):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["copy", "read"])
def test_memory_bandwidth_is_plausible(kind):
    bw = memory_bandwidth(mb=32, repeats=2, kind=kind)
    assert 1e8 < bw < 1e13


def test_memory_bandwidth_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown bandwidth kind"):
        memory_bandwidth(mb=1, repeats=1, kind="write")


@pytest.mark.parametrize("method", ["sketch-reuse", "cats", "griffin", "teal"])
def test_bench_reports_ratios_roofline_and_measured_sparsity(tiny, one_thread, method):
    model = tiny("llama")
    prof = calibrate(model, _ids(600, 1), method=method, sparsity=0.5, windows=Windows(prompt=12, scored=12))
    res = bench(model, SimpleNamespace(pad_token_id=0), prof, _ids(12, 2), new_tokens=6, runs=2,
                progress=False)
    for name in ("hf_dense", "moyu_dense", "moyu_sparse"):
        r = res[name]
        assert len(r["runs"]) == 2 and r["tok_s"] > 0 and r["roofline_tok_s"] > 0
        assert 0 < r["roofline_share"] and r["memory_bytes"] > 0
        assert r["read_roofline_share"] > 0
    # ratios are the ratios of the medians printed beside them
    assert res["speedup_vs_dense"] == pytest.approx(res["moyu_sparse"]["tok_s"] / res["moyu_dense"]["tok_s"], rel=1e-2)
    assert res["speedup_vs_hf"] == pytest.approx(res["moyu_sparse"]["tok_s"] / res["hf_dense"]["tok_s"], rel=1e-2)
    # sparsity is what decode computed, not the target; skipped neurons mean fewer bytes
    assert 0.2 < res["sparsity"] < 0.8
    assert res["moyu_sparse"]["bytes_per_token"] < res["moyu_dense"]["bytes_per_token"]
    assert res["environment"]["kernel_backend"] in ("cpp", "torch")
    if method == "griffin":   # the slice made after prefill is held too, and counted; it is timed
        assert res["memory_ratio"] > 1.1
        assert res["slice_seconds"] > 0
    else:
        assert res["slice_seconds"] == 0


def test_bench_dense_only(tiny, one_thread):
    res = bench(tiny("gpt2"), SimpleNamespace(pad_token_id=0), None, _ids(8), new_tokens=4, runs=1,
                progress=False)
    assert "moyu_sparse" not in res and res["dense_vs_hf"] > 0


def test_bytes_per_token_counts_every_tensor_once(tiny, one_thread):
    """Before any decode call every step reports reading all it holds, so a variant's bytes
    per token equal the runtime's bytes held: nothing missed, nothing counted twice."""
    from moyu.bench import _lean_variant
    from moyu.runtime import lean_model
    model = tiny("llama")
    for method in ("sketch", "dejavu-linear", "cats", "griffin", "teal"):
        prof = calibrate(model, _ids(600, 1), method=method, sparsity=0.5,
                         windows=Windows(prompt=12, scored=12))
        lean = lean_model(model, prof, max_seq=32)
        v = _lean_variant("x", lean, _ids(8), 2)
        assert v.bytes_per_token() == pytest.approx(lean.nbytes, rel=1e-6), method


@pytest.mark.parametrize("arch,fmt", [("llama", "fp32"), ("llama", "int8"), ("gemma3_text", "int8")])
def test_decode_split_adds_up_and_leaves_the_runtime_as_it_was(tiny, one_thread, arch, fmt):
    """gemma3_text's tiny model ties its embedding to the head: the timed head must not break
    the embedding lookup that shares its table."""
    from moyu.bench import decode_split
    from moyu.runtime import lean_model
    model = tiny(arch)
    prof = calibrate(model, _ids(600, 1), method="sketch-reuse", sparsity=0.5,
                     windows=Windows(prompt=12, scored=12))
    lean = lean_model(model, prof, fmt, max_seq=40)
    before = lean.logits(_ids(20, 3), n_prefill=8)
    split = decode_split(lean, _ids(12, 2), 8)
    parts = ("mlp", "attn_linears", "attn_core", "head", "rest")
    assert sum(split[p]["ms"] for p in parts) == pytest.approx(split["total"]["ms"])
    assert all(split[p]["ms"] > 0 for p in ("mlp", "attn_linears", "attn_core", "head"))
    assert 0 < split["mlp"]["bytes"] < sum(L.mlp.nbytes for L in lean.layers)   # half the down rows
    assert split["head"]["bytes"] == lean.flat.lm_head.nbytes
    assert torch.equal(lean.logits(_ids(20, 3), n_prefill=8), before)       # no timer left behind
    assert "decode" not in vars(lean.layers[0].mlp)
