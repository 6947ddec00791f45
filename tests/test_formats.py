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


def _on_int4_grid(model):
    """``model`` with every decoder-layer linear rounded onto the int4 grid (a 4-bit GGUF source)."""
    from moyu.kernels.quant import quantize
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                mod.weight.copy_(quantize(mod.weight.float(), "int4").dequantize())
    return model


def test_int8_keeps_a_matrix_the_int4_grid_holds_exactly_in_int4():
    from moyu.kernels.quant import pack_quantized, quantize
    g = torch.Generator().manual_seed(0)
    exact = quantize(torch.randn(16, 96, generator=g), "int4").dequantize()
    q = pack_quantized(exact, "int8")
    assert q.fmt == "int4" and torch.equal(q.dequantize(), exact)
    near = exact.clone()
    near[11, :32] += 0.1 * torch.randn(32, generator=g)   # one block off the grid: int8 is closer overall
    assert pack_quantized(near, "int8").fmt == "int8"
    tiny = exact.clone()
    tiny[11, 5] += 1e-4   # off the grid by less than int8's own rounding: int4 still wins
    assert pack_quantized(tiny, "int8").fmt == "int4"
    rand = torch.randn(16, 96, generator=g)
    assert torch.equal(pack_quantized(rand, "int8").qs, quantize(rand, "int8").qs)
    assert pack_quantized(exact, "int4").fmt == "int4"


def test_int8_on_a_4bit_source_is_lossless_where_int4_is():
    # gate/up/attention on the int4 grid: int8 stores them as int4 (exactly), down stays int8
    # (its neuron-major blocks cross the grid), so the format computes what int4 computes
    from moyu.fakequant import QuantizedWeights
    model = _on_int4_grid(tiny_model("llama"))
    lean = LeanModel.from_hf(model, weights="int8", max_seq=32)
    packed = lean.layers[0].mlp.packed
    assert (packed.w_in.fmt, packed.w_down_t.fmt) == ("int4", "int8")
    ids = torch.randint(3, 256, (20,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        with QuantizedWeights(model, "int8"):
            sim8 = model(ids[None], use_cache=False).logits[0]
        with QuantizedWeights(model, "int4"):
            sim4 = model(ids[None], use_cache=False).logits[0]
    assert torch.equal(sim8, sim4)
    fp32 = LeanModel.from_hf(model, weights="fp32", max_seq=32).logits(ids, n_prefill=8)[8:]
    int8 = lean.logits(ids, n_prefill=8)[8:]
    int4 = LeanModel.from_hf(model, weights="int4", max_seq=32).logits(ids, n_prefill=8)[8:]
    assert torch.equal(int8, int4) and not torch.equal(int8, fp32)


def _q4k_like(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Values as GGUF Q4_K stores them: per 256-wide super-block an fp16 ``d`` and ``dmin``,
    per 32-wide sub-block 6-bit ``sc`` and ``m``, codes 0..15 that need not span the range."""
    g = torch.Generator().manual_seed(seed)
    sb = cols // 256
    d = (torch.rand(rows, sb, 1, 1, generator=g) * 1e-3 + 1e-4).half().float()
    dmin = (torch.rand(rows, sb, 1, 1, generator=g) * 1e-3 + 1e-4).half().float()
    sc = torch.randint(1, 64, (rows, sb, 8, 1), generator=g).float()
    mn = torch.randint(0, 64, (rows, sb, 8, 1), generator=g).float()
    lo = torch.randint(0, 3, (rows, sb, 8, 1), generator=g)
    hi = torch.randint(12, 16, (rows, sb, 8, 1), generator=g)
    q = (lo + (torch.rand(rows, sb, 8, 32, generator=g) * (hi - lo + 1)).floor()).clamp(max=15)
    return (d * sc * q - dmin * mn).reshape(rows, cols)


def test_int4_holds_a_q4k_source_on_its_own_steps():
    """Q4_K sub-blocks whose codes do not span 0..15: min/max steps would re-quantize them;
    int4 finds each block's own step (exact up to its fp16 rounding), and int8 keeps them int4."""
    from moyu.kernels.quant import block_errors, pack_quantized, quantize
    w = _q4k_like(8, 512)
    q4 = quantize(w, "int4")
    step = (w.view(8, -1, 32).amax(-1) - w.view(8, -1, 32).amin(-1)) / 15
    e4, e8 = block_errors(w, q4), block_errors(w, quantize(w, "int8"))
    assert float((e4 / step).max()) < 0.05      # the fp16 offset's rounding, not a requantization
    assert bool((e4 <= e8).all()) and float(e4.mean()) < 0.1 * float(e8.mean())
    assert pack_quantized(w, "int8").fmt == "int4"
    r = torch.randn(8, 512, generator=torch.Generator().manual_seed(1))
    minmax_step = (r.view(8, -1, 32).amax(-1) - r.view(8, -1, 32).amin(-1)) / 15
    assert float((block_errors(r, quantize(r, "int4")) / minmax_step).max()) <= 0.5 + 1e-3
