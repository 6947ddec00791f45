"""The fused decode loop (one C++ call per token) gives the per-op loop's bits."""
from __future__ import annotations

import pytest
import torch

from moyu.evaluate import Windows
from moyu.fakequant import QuantizedWeights
from moyu.kernels import quant_ops
from moyu.methods import calibrate
from moyu.runtime import lean_model
from moyu.tiny import tiny_model

W = Windows(prompt=12, scored=12)
needs_cpp = pytest.mark.skipif(quant_ops.quant_backend_name() != "cpp", reason="C++ quantized kernels not built")


def _ids(n, seed):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def _pair(model, prof, fmt):
    fused, per_op = (lean_model(model, prof, fmt, max_seq=64) for _ in range(2))
    per_op.fused = False
    return fused, per_op


def _decode(lean, ids, p):
    """Teacher-forced logits and per-layer kept counts of every decoded position."""
    lean.reset()
    rows, kept = [lean.prefill(ids[:p])], []
    for t in ids[p:]:
        rows.append(lean.decode_step(int(t)))
        kept.append(lean.kept())
    return torch.stack(rows), kept


@needs_cpp
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3_text", "qwen3"])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("method", [None, "sketch-reuse", "cats"])
def test_fused_equals_per_op(arch, fmt, method):
    model = tiny_model(arch)
    prof = None
    if method:
        with QuantizedWeights(model, fmt):
            prof = calibrate(model, _ids(600, 1), method=method, sparsity=0.5, windows=W)
    fused, per_op = _pair(model, prof, fmt)
    assert fused.plan is not None and fused.fused_reason is None
    assert fused._fused_ends   # embedding lookup and lm_head inside the same call
    ids = _ids(30, 3)
    a, ka = _decode(fused, ids, 10)
    b, kb = _decode(per_op, ids, 10)
    assert torch.equal(a, b)
    assert ka == kb
    if method:   # the rule really skipped neurons
        d_ff = fused.layers[0].mlp.packed.d_ff
        assert 0 < sum(map(sum, ka)) < len(ka) * len(ka[0]) * d_ff


@needs_cpp
def test_fused_greedy_generation_is_the_per_op_generation():
    model = tiny_model("llama", layers=3)
    fused, per_op = _pair(model, None, "int8")
    out_f, _ = fused.generate(_ids(9, 4), 20)
    out_p, _ = per_op.generate(_ids(9, 4), 20)
    assert torch.equal(out_f, out_p)


@needs_cpp
def test_fused_scalar_path_is_close():
    """The plan's scalar attention and norm (CPUs without AVX2) agree to float tolerance."""
    model = tiny_model("llama")
    fused, per_op = _pair(model, None, "int8")
    ids = _ids(20, 5)
    ref, _ = _decode(per_op, ids, 8)
    quant_ops.set_quant_isa("scalar")
    try:
        got, _ = _decode(fused, ids, 8)
    finally:
        quant_ops.set_quant_isa(None)
    assert torch.allclose(got, ref, atol=1e-3), (got - ref).abs().max()


@pytest.mark.parametrize("arch, fmt, method, reason", [
    ("llama", "fp32", None, "float weights"),
    ("olmo", "int8", None, "norms"),
    ("llama", "int8", "dejavu-linear", "has no fused form"),
])
def test_runs_per_op_where_it_cannot_fuse(arch, fmt, method, reason):
    model = tiny_model(arch)
    prof = None
    if method:
        with QuantizedWeights(model, fmt):
            prof = calibrate(model, _ids(600, 1), method=method, sparsity=0.5, windows=W)
    lean = lean_model(model, prof, fmt, max_seq=32)
    if quant_ops.quant_backend_name() != "cpp" and fmt != "fp32":
        reason = "not in use"
    assert lean.plan is None and reason in lean.fused_reason
    lean.prefill(_ids(5, 6))
    assert torch.isfinite(lean.decode_step(3)).all()


@needs_cpp
def test_turned_off_says_so():
    lean = lean_model(tiny_model("llama"), None, "int8", max_seq=32)
    lean.fused = False
    assert lean.fused_reason == "turned off (fused = False)"


@needs_cpp
def test_plan_decode_token_rejects_bad_ids_and_buffers():
    lean = lean_model(tiny_model("llama"), None, "int8", max_seq=16)
    vocab = lean.flat.lm_head.out_features
    h, logits = torch.zeros(lean.flat.d), torch.zeros(vocab)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        lean.plan.decode_token(vocab, 0, h, logits)
    with pytest.raises(RuntimeError, match="logits must be float32"):
        lean.plan.decode_token(1, 0, h, torch.zeros(vocab - 1))


@needs_cpp
def test_plan_step_rejects_a_wrong_hidden_state():
    lean = lean_model(tiny_model("llama"), None, "int8", max_seq=16)
    with pytest.raises(RuntimeError, match="h must be float32"):
        lean.plan.step(torch.zeros(3), 0)
    with pytest.raises(RuntimeError, match="outside the cache"):
        lean.plan.step(torch.zeros(lean.flat.d), 99)


@needs_cpp
def test_plan_timers_are_off_by_default_and_reset_when_read():
    """Per-part timers of the fused loop: nothing accrues while off; with them on every part
    of a step accrues time, and reading returns and clears them."""
    lean = lean_model(tiny_model("llama"), None, "int8", max_seq=32)
    lean.prefill(_ids(4, 0))
    lean.decode_step(5)
    assert torch.equal(lean.plan.read_times(), torch.zeros(4, dtype=torch.float64))
    lean.plan.set_timing(True)
    for t in (6, 7, 8):
        lean.decode_step(t)
    times = lean.plan.read_times()
    assert times.shape == (4,) and bool((times > 0).all())
    assert torch.equal(lean.plan.read_times(), torch.zeros(4, dtype=torch.float64))
    lean.plan.set_timing(False)
