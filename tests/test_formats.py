"""Weight formats in the runtime: int8/int4 decode close to fp32, every decodable method
runs on them, byte counts come from the format, bad names fail in one line."""
from __future__ import annotations

import pytest
import torch

from moyu import MoyuError
from moyu.evaluate import Windows
from moyu.kernels import FORMATS, weight_format
from moyu.methods import METHODS, calibrate
from moyu.runtime import LeanModel, decodable, lean_model
from moyu.tiny import tiny_model

W = Windows(prompt=12, scored=12)


def _ids(n, seed=0):
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed))


def test_unknown_format_is_one_line():
    with pytest.raises(MoyuError) as e:
        weight_format("int3")
    assert "\n" not in str(e.value) and all(name in str(e.value) for name in FORMATS)
    assert weight_format(torch.bfloat16).name == "bf16" and weight_format("float32").name == "fp32"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_quantized_weights_decode_close_to_fp32_in_fewer_bytes(arch):
    model = tiny_model(arch)
    ids = _ids(24)
    ref = LeanModel.from_hf(model, max_seq=32).logits(ids, n_prefill=6)
    sizes = {}
    for name, tol in (("bf16", 0.03), ("int8", 0.05), ("int4", 0.35)):
        lean = LeanModel.from_hf(model, weights=name, max_seq=32)
        got = lean.logits(ids, n_prefill=6)
        err = float((got - ref).abs().max() / ref.abs().max())
        assert err < tol, (name, err)
        sizes[name] = lean.nbytes
    assert sizes["int4"] < sizes["int8"] < sizes["bf16"]


def test_every_decodable_method_runs_on_quantized_weights(one_thread):
    model = tiny_model("llama")
    ids = _ids(24, 1)
    dense = {fmt: lean_model(model, None, fmt, max_seq=32).logits(ids, n_prefill=10) for fmt in ("int8", "int4")}
    for name in METHODS:
        if name == "dense" or not decodable(name):
            continue
        zero = calibrate(model, _ids(600, 2), method=name, sparsity=0.0, windows=W)
        half = calibrate(model, _ids(600, 2), method=name, sparsity=0.5, windows=W)
        for fmt in ("int8", "int4"):
            got = lean_model(model, zero, fmt, max_seq=32).logits(ids, n_prefill=10)
            assert torch.allclose(got, dense[fmt], atol=1e-5), (name, fmt)   # a full kept set is dense
            lean = lean_model(model, half, fmt, max_seq=32)
            out = lean.logits(ids, n_prefill=10)
            assert torch.isfinite(out).all(), (name, fmt)
            kept = [L.mlp.kept_share for L in lean.layers]
            assert 0 < sum(kept) / len(kept) < 1, (name, fmt, kept)
