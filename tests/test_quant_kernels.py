"""moyu.kernels quantized formats and integer kernels.

Every kernel runs on every backend this machine has (the PyTorch fallback and each C++
instruction-set path the CPU can execute) against one reference: float64 products of the
dequantized weights with the dequantized, quantized activations (tight tolerance), plus
a bounded-error check against fp32 activations.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moyu.kernels import _build, _quant_torch, quant_ops
from moyu.kernels.quant import (QBLOCK, QuantMatrix, from_gguf, interleave_rows, quantize,
                                quantize_mlp)
from moyu.kernels.quant_ops import (ISAS, q_axpy, q_matvec, q_mlp, q_mlp_act, q_mlp_threshold,
                                    q_sketch_mlp, quantize_activation)

FORMATS = ("int8", "int4")
ACT_REF = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
           "relu": F.relu}


def _load_cpp():
    try:
        return _build.build_quant_extension(), ""
    except Exception as exc:  # noqa: BLE001
        return None, f"quantized C++ extension cannot build here: {_build._reason(exc)}"


_CPP, _CPP_SKIP = _load_cpp()
_PATHS = ISAS[:_CPP.best_isa() + 1] if _CPP is not None else ()
BACKENDS = ["torch"] + [f"cpp-{isa}" for isa in _PATHS]
needs_cpp = pytest.mark.skipif(_CPP is None, reason=_CPP_SKIP or "no C++ extension")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread (shared 2-core machine); chunked paths have their own test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Routes quant_ops to the fallback or to one C++ instruction-set path."""
    if request.param == "torch":
        monkeypatch.setattr(quant_ops, "_impl", _quant_torch)
        monkeypatch.setattr(quant_ops, "_name", "torch")
    else:
        monkeypatch.setattr(quant_ops, "_impl", _CPP)
        monkeypatch.setattr(quant_ops, "_name", "cpp")
        before = _CPP.get_isa()
        _CPP.set_isa(ISAS.index(request.param.split("-", 1)[1]))
        yield request.param
        _CPP.set_isa(before)
        return
    yield request.param


def _xhat(x: torch.Tensor, cols: int) -> torch.Tensor:
    """x as the kernels see it: dequantized int8 per-block activations, float64 [n, cols]."""
    nb = (cols + QBLOCK - 1) // QBLOCK
    q, dx = _quant_torch.quantize_act(x, nb)
    return (q.view(-1, nb, QBLOCK).double() * dx.double().unsqueeze(-1)).reshape(-1, nb * QBLOCK)[:, :cols]


def _assert_close(y: torch.Tensor, ref: torch.Tensor, rel: float = 2e-6) -> None:
    """Tight: fp32 rounding of a sum whose terms are bounded by the reference's scale."""
    scale = max(1.0, float(ref.abs().max()))
    err = float((y.double() - ref.double()).abs().max()) if y.numel() else 0.0
    assert err <= rel * scale * 8, f"max error {err:.3g} vs scale {scale:.3g}"


def _rand(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * cols ** -0.5
    w[:, :: max(1, cols // 7)] *= 6  # outlier columns
    return w


# ------------------------------------------------------------------ formats


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cols", [32, 100, 576])
def test_quantize_error_within_half_a_step(fmt, cols):
    w = _rand(23, cols)
    m = quantize(w, fmt)
    assert m.shape == (23, cols) and m.blocks == (cols + 31) // 32
    step = m.d.float().repeat_interleave(QBLOCK, dim=1)[:, :cols]
    err = (m.dequantize() - w).abs()
    assert bool((err <= 0.5 * step + 2 ** -10 * w.abs().max()).all())


def test_sizes_match_gguf_blocks():
    m8, m4 = quantize(_rand(3, 576), "int8"), quantize(_rand(3, 576), "int4")
    assert m8.row_nbytes == 18 * 34 and m4.row_nbytes == 18 * 20
    assert m8.nbytes == 3 * 18 * 34 and m4.nbytes == 3 * 18 * 20


@pytest.mark.parametrize("fmt", FORMATS)
def test_slice_and_interleave(fmt):
    a, b = quantize(_rand(10, 70, 1), fmt), quantize(_rand(10, 70, 2), fmt)
    rows = torch.tensor([7, 2, 2, 9])
    assert torch.equal(a.slice(rows).dequantize(), a.dequantize()[rows])
    mixed = interleave_rows(a, b)
    assert torch.equal(mixed.dequantize()[0::2], a.dequantize())
    assert torch.equal(mixed.dequantize()[1::2], b.dequantize())
    with pytest.raises(IndexError):
        a.slice(torch.tensor([10]))


def test_bad_format_and_shapes():
    with pytest.raises(ValueError, match="int8, int4"):
        quantize(torch.zeros(2, 32), "int3")
    with pytest.raises(ValueError, match="inf or nan"):
        quantize(torch.full((2, 32), float("nan")), "int8")
    m = quantize(_rand(4, 64), "int8")
    with pytest.raises(ValueError, match="codes"):
        QuantMatrix("int8", 64, m.qs[:, :32], m.d)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_activation_quantization_is_identical(backend_name):
    """The fallback quantizes activations bit for bit like the C++ code."""
    x = torch.randn(3, 100) * torch.tensor([1.0] * 99 + [50.0])
    x[1, :40] = 0.0  # an all-zero block
    q_ref, dx_ref = _quant_torch.quantize_act(x, 4)
    impl = _CPP if backend_name != "torch" else _quant_torch
    q, dx = impl.quantize_act(x, 4)
    assert torch.equal(q, q_ref) and torch.equal(dx, dx_ref)
    assert int(q.abs().max()) == 127 and bool((q[:, 100:] == 0).all())


# ------------------------------------------------------------------ primitives


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows,cols", [(37, 100), (13, 33), (9, 150), (70, 640)])
def test_matvec_against_reference(backend, fmt, rows, cols):
    w = _rand(rows, cols)
    m = quantize(w, fmt)
    wd = m.dequantize().double()
    x = torch.randn(2, cols)
    xh = _xhat(x, cols)
    _assert_close(q_matvec(x, m), xh @ wd.t())
    _assert_close(q_matvec(x[0], m), (xh[0] @ wd.t()))
    sel = torch.tensor([5, 0, 5, rows - 1], dtype=torch.int32)
    bias = torch.randn(rows)
    out = torch.empty(2, 4)
    y = q_matvec(x, m, sel, bias=bias, out=out)
    assert y.data_ptr() == out.data_ptr()
    _assert_close(y, xh @ wd[sel.long()].t() + bias[sel.long()].double())
    assert q_matvec(x, m, torch.tensor([], dtype=torch.long)).shape == (2, 0)
    # Bounded error against fp32 activations: each block moves by at most half a step.
    steps = _quant_torch.quantize_act(x, m.blocks)[1].double().repeat_interleave(QBLOCK, 1)
    bound = 0.5 * (wd.abs() @ steps[:, :cols].t()).t()
    assert bool(((q_matvec(x, m).double() - x.double() @ wd.t()).abs() <= bound * 1.001 + 1e-5).all())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cols", [576, 544, 200])   # 18 blocks, 17 (odd), 7 (one padded)
def test_four_row_dots_equal_one_row_dots(backend, fmt, cols):
    """Consecutive rows go through the four-row kernel, scattered ones through the one-row
    kernel: the same bits either way (decode and calibration may take different paths)."""
    if backend == "torch":
        pytest.skip("the fallback makes no such promise: its batched ops sum in shape-dependent order")
    m = quantize(torch.randn(70, cols, generator=torch.Generator().manual_seed(3)), fmt)
    x = torch.randn(cols)
    perm = torch.randperm(70, generator=torch.Generator().manual_seed(4))
    scattered = torch.empty(70)
    scattered[perm] = q_matvec(x, m, perm)
    assert torch.equal(q_matvec(x, m), scattered)


@needs_cpp
@pytest.mark.parametrize("fmt", FORMATS)
def test_dequant_rows_is_dequantize(fmt):
    """The C++ widening a prompt's GEMM uses gives QuantMatrix.dequantize's values exactly."""
    m = quantize(torch.randn(40, 70, generator=torch.Generator().manual_seed(5)), fmt)
    got = _CPP.dequant_rows(*m.args(), 7, 31)[:, :70]
    assert torch.equal(got, m.dequantize()[7:31])
    with pytest.raises(RuntimeError, match="outside"):
        _CPP.dequant_rows(*m.args(), 30, 41)


@pytest.mark.parametrize("fmt", FORMATS)
def test_axpy_against_reference(backend, fmt):
    rows, cols = 45, 100
    m = quantize(_rand(rows, cols), fmt)
    wd = m.dequantize().double()
    a = torch.randn(2, rows)
    _assert_close(q_axpy(a, m), a.double() @ wd)
    sel = torch.tensor([44, 3, 3, 17])
    bias = torch.randn(cols)
    _assert_close(q_axpy(a[0], m, sel, bias=bias), a[0, sel].double() @ wd[sel] + bias.double())
    masked = torch.where(a.abs() > 0.7, a, torch.zeros_like(a))
    _assert_close(q_axpy(a, m, tau=0.7), masked.double() @ wd)
    empty = q_axpy(a[0], m, torch.tensor([], dtype=torch.long), bias=bias)
    assert torch.equal(empty, bias)
    full = q_axpy(a[0], m, torch.arange(rows))
    _assert_close(full, q_axpy(a[0], m).double())


@pytest.mark.parametrize("fmt", FORMATS)
def test_saturated_codes(backend, fmt):
    """Extreme codes (int8 -128/+127, int4 0/15) and full-scale activations: no overflow."""
    rows, nb = 9, 5
    g = torch.Generator().manual_seed(3)
    if fmt == "int8":
        qs = torch.where(torch.rand(rows, nb * 32, generator=g) > 0.5, 127, -128).to(torch.int8)
        m = QuantMatrix("int8", nb * 32, qs, torch.full((rows, nb), 0.01).half())
    else:
        qs = torch.where(torch.rand(rows, nb * 16, generator=g) > 0.5, 0xFF, 0x0F).to(torch.uint8)
        qs[0] = 0xFF
        m = QuantMatrix("int4", nb * 32, qs, torch.full((rows, nb), 0.01).half(),
                        torch.full((rows, nb), -0.07).half())
    wd = m.dequantize().double()
    x = torch.where(torch.rand(nb * 32, generator=g) > 0.5, 3.0, -3.0)
    x[:32] = 3.0  # all codes +127 in the first block
    xh = _xhat(x, nb * 32)
    _assert_close(q_matvec(x, m), xh @ wd.t())
    a = torch.full((rows,), 1000.0)
    _assert_close(q_axpy(a, m), a.double() @ wd)


# ------------------------------------------------------------------ fused MLP


class QMlp:
    """A random quantized MLP and its float64 reference on the kernels' activations."""

    def __init__(self, fmt, act="silu", gated=True, bias=True, d=150, d_ff=200, seed=0, down_fmt=None):
        g = torch.Generator().manual_seed(seed)
        self.act, self.gated = act, gated
        w_up = torch.randn(d_ff, d, generator=g) * d ** -0.5
        w_gate = torch.randn(d_ff, d, generator=g) * d ** -0.5 if gated else None
        w_down = torch.randn(d, d_ff, generator=g) * d_ff ** -0.5
        b = (lambda n: torch.randn(n, generator=g) * 0.1) if bias else (lambda n: None)
        self.q = quantize_mlp(w_up, w_down, act, fmt, w_gate, b(d_ff), b(d_ff) if gated else None, b(d),
                              down_fmt=down_fmt)
        self.d, self.d_ff = d, d_ff

    def coefs(self, x):
        """(a [n, d_ff], act(gate) [n, d_ff]) in float64 from the dequantized rows."""
        xh = _xhat(x, self.d)
        pre = xh @ self.q.w_in.dequantize().double().t()
        if self.q.b_in is not None:
            pre = pre + self.q.b_in.double().reshape(-1)
        act = ACT_REF[self.act]
        if not self.gated:
            a = act(pre)
            return a, a
        g = act(pre[:, 0::2])
        return g * pre[:, 1::2], g

    def down(self, a):
        y = a @ self.q.w_down_t.dequantize().double()
        return y if self.q.b_down is None else y + self.q.b_down.double()


def _gap_tau(scores: torch.Tensor) -> float:
    """A threshold in the widest gap of the middle scores (no neuron near it)."""
    s = scores.flatten().sort().values
    mid = s[len(s) // 4: 3 * len(s) // 4]
    k = int((mid[1:] - mid[:-1]).argmax())
    return float((mid[k] + mid[k + 1]) / 2)


@pytest.mark.parametrize("fmt,down_fmt", [("int8", None), ("int4", None), ("int4", "int8")])
@pytest.mark.parametrize("act,gated,bias", [("silu", True, True), ("gelu_tanh", True, False),
                                            ("gelu", False, True), ("relu", False, False)])
def test_mlp_dense_and_kept(backend, fmt, down_fmt, act, gated, bias):
    mlp = QMlp(fmt, act, gated, bias, down_fmt=down_fmt)
    x = torch.randn(2, mlp.d)
    a, _ = mlp.coefs(x)
    _assert_close(q_mlp(x, mlp.q), mlp.down(a))
    idx = torch.randperm(mlp.d_ff)[:77]
    kept = torch.zeros_like(a)
    kept[:, idx] = a[:, idx]
    _assert_close(q_mlp(x, mlp.q, idx), mlp.down(kept))
    _assert_close(q_mlp(x, mlp.q, torch.arange(mlp.d_ff)), q_mlp(x, mlp.q).double())
    empty = q_mlp(x[0], mlp.q, torch.tensor([], dtype=torch.long))
    expect = torch.zeros(mlp.d) if mlp.q.b_down is None else mlp.q.b_down
    assert torch.equal(empty, expect)
    # bounded error against the fp32 dense MLP on the dequantized weights
    wi = mlp.q.w_in.dequantize()
    pre = x @ wi.t() + (0 if mlp.q.b_in is None else mlp.q.b_in.reshape(-1))
    a32 = ACT_REF[act](pre[:, 0::2]) * pre[:, 1::2] if gated else ACT_REF[act](pre)
    y32 = mlp.down(a32.double())
    rel = float((q_mlp(x, mlp.q).double() - y32).norm() / y32.norm())
    assert rel < 0.03


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("gated", [True, False])
def test_sliced_mlp_equals_kept_list(backend, fmt, gated):
    mlp = QMlp(fmt, "silu", gated, True, seed=3)
    idx = torch.tensor([150, 3, 77, 4, 199])
    part = mlp.q.slice(idx)
    assert part.d_ff == 5 and torch.equal(part.neurons, idx)
    x = torch.randn(mlp.d)
    _assert_close(q_mlp(x, part), q_mlp(x, mlp.q, idx).double())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("gated", [True, False])
def test_mlp_threshold_and_sketch(backend, fmt, gated):
    mlp = QMlp(fmt, "silu", gated, True, seed=1)
    x = torch.randn(1, mlp.d)
    a, g = mlp.coefs(x)
    for mode, score in (("gate", g.abs()), ("act", a.abs())):
        tau = _gap_tau(score)
        keep = score > tau
        y, n = q_mlp_threshold(x[0], mlp.q, tau, mode)
        assert n == int(keep.sum())
        _assert_close(y, mlp.down(torch.where(keep, a, torch.zeros_like(a)))[0])
    dn = mlp.q.down_norm()
    score = a.abs() * dn.double()
    tau = _gap_tau(score)
    keep = score > tau
    y, n = q_sketch_mlp(x[0], mlp.q, dn, tau)
    assert n == int(keep.sum())
    _assert_close(y, mlp.down(torch.where(keep, a, torch.zeros_like(a)))[0])
    y0, n0 = q_sketch_mlp(x[0], mlp.q, dn, float("inf"))
    assert n0 == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_mlp_act_is_what_decode_thresholds(backend, fmt):
    """q_mlp_act gives the decode kernels' activations bit for bit: with tau set to a
    neuron's exact score, decode keeps exactly the neurons scoring strictly above it."""
    mlp = QMlp(fmt, "gelu_tanh", True, True, seed=2)
    x = torch.randn(mlp.d)
    a = q_mlp_act(x, mlp.q)[0]
    gate = q_mlp_act(x, mlp.q, gate_only=True)[0]
    _assert_close(a, mlp.coefs(x.unsqueeze(0))[0][0])
    dn = mlp.q.down_norm()
    score = a.abs() * dn
    for tau in score.sort().values[[10, 100, 150]].tolist():
        assert q_sketch_mlp(x, mlp.q, dn, tau)[1] == int((score > tau).sum())
    for tau in gate.abs().sort().values[[20, 120]].tolist():
        assert q_mlp_threshold(x, mlp.q, tau, "gate")[1] == int((gate.abs() > tau).sum())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("d,d_ff,act", [(576, 1536, "silu"), (640, 2048, "gelu_tanh")],
                         ids=["smollm2-135m", "gemma3-270m"])
def test_real_model_shapes(backend, fmt, d, d_ff, act):
    mlp = QMlp(fmt, act, True, False, d=d, d_ff=d_ff, seed=4)
    x = torch.randn(1, d) * 3
    a, _ = mlp.coefs(x)
    _assert_close(q_mlp(x, mlp.q), mlp.down(a))
    half = torch.randperm(d_ff)[: d_ff // 2]
    kept = torch.zeros_like(a)
    kept[:, half] = a[:, half]
    _assert_close(q_mlp(x[0], mlp.q, half), mlp.down(kept)[0])


# ------------------------------------------------------------------ backends


@needs_cpp
def test_fallback_equals_cpp(monkeypatch):
    mlp = QMlp("int4", "silu", True, True, d=96, d_ff=64, seed=5)
    x = torch.randn(96)
    ys = []
    for impl in (_quant_torch, _CPP):
        monkeypatch.setattr(quant_ops, "_impl", impl)
        ys.append((q_mlp(x, mlp.q), q_matvec(x, mlp.q.w_in), q_axpy(torch.randn(64, generator=torch.Generator().manual_seed(0)),
                                                                     mlp.q.w_down_t)))
    for t, c in zip(*ys):
        _assert_close(c, t.double())


@needs_cpp
def test_multithreaded_chunks(monkeypatch):
    """Several chunks with per-thread partial sums give the single-thread result; software
    prefetching changes no bit."""
    monkeypatch.setattr(quant_ops, "_impl", _CPP)
    mlp = QMlp("int8", "silu", True, True, d=256, d_ff=1024, seed=6)
    x = torch.randn(256)
    idx = torch.randperm(1024)[:700]
    a = torch.randn(1024)
    torch.set_num_threads(1)
    single = (q_mlp(x, mlp.q, idx), q_sketch_mlp(x, mlp.q, mlp.q.down_norm(), 0.01)[0],
              q_matvec(x, mlp.q.w_in), q_axpy(a, mlp.q.w_down_t, tau=0.5))
    torch.set_num_threads(2)
    multi = (q_mlp(x, mlp.q, idx), q_sketch_mlp(x, mlp.q, mlp.q.down_norm(), 0.01)[0],
             q_matvec(x, mlp.q.w_in), q_axpy(a, mlp.q.w_down_t, tau=0.5))
    _CPP.set_prefetch(4)
    try:
        ahead = (q_mlp(x, mlp.q, idx), q_sketch_mlp(x, mlp.q, mlp.q.down_norm(), 0.01)[0],
                 q_matvec(x, mlp.q.w_in), q_axpy(a, mlp.q.w_down_t, tau=0.5))
    finally:
        _CPP.set_prefetch(0)
    for s, m, p in zip(single, multi, ahead):
        _assert_close(m, s.double())
        assert torch.equal(p, m)  # prefetching never changes a result


@needs_cpp
def test_prefetch_distances_change_no_bit_and_reject_bad_values(monkeypatch):
    """The dot products' and the axpy passes' prefetch distances are timing knobs only."""
    monkeypatch.setattr(quant_ops, "_impl", _CPP)
    mlp = QMlp("int8", "silu", True, True, d=256, d_ff=1024, seed=7)
    x, a = torch.randn(256), torch.randn(1024)
    idx = torch.randperm(1024)[:600]

    def run():
        return (q_matvec(x, mlp.q.w_in), q_mlp(x, mlp.q, idx), q_axpy(a, mlp.q.w_down_t, tau=0.3))

    base = run()
    try:
        for rows, passes in ((4, 1), (64, 8)):
            _CPP.set_dot_prefetch(rows)
            _CPP.set_axpy_prefetch(passes)
            for got, want in zip(run(), base):
                assert torch.equal(got, want)
        for bad in (0, 6, 68):
            with pytest.raises(RuntimeError, match="set_dot_prefetch"):
                _CPP.set_dot_prefetch(bad)
        for bad in (0, 9):
            with pytest.raises(RuntimeError, match="set_axpy_prefetch"):
                _CPP.set_axpy_prefetch(bad)
    finally:
        _CPP.set_dot_prefetch(16)
        _CPP.set_axpy_prefetch(3)


@needs_cpp
def test_isa_selection():
    assert set(_PATHS) >= {"scalar"}
    before = _CPP.get_isa()
    try:
        with pytest.raises(ValueError, match="expected one of"):
            quant_ops._set_isa(_CPP, "sse9")
        if _CPP.best_isa() < len(ISAS) - 1:
            with pytest.raises(ValueError, match="cannot run"):
                quant_ops._set_isa(_CPP, ISAS[-1])
        quant_ops._set_isa(_CPP, "scalar")
        assert _CPP.get_isa() == 0
    finally:
        _CPP.set_isa(before)
    assert "rtdispatch" in _build.quant_extension_name()


def test_failed_build_falls_back_with_one_warning(capsys, monkeypatch):
    monkeypatch.delenv("MOYU_KERNELS", raising=False)

    def broken():
        raise RuntimeError("error: no compiler\nmore output")

    assert _build.load_backend(broken, "quantized kernel") is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "quantized kernel build failed" in err[0] and "fallback" in err[0]


# ------------------------------------------------------------------ GGUF


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_gguf_blocks_are_used_verbatim(qtype):
    gguf = pytest.importorskip("gguf")
    rows, cols = 6, 96
    w = _rand(rows, cols, 7).numpy().astype(np.float32)
    t = getattr(gguf.GGMLQuantizationType, qtype)
    raw = gguf.quants.quantize(w, t)
    ref = gguf.quants.dequantize(raw, t)
    m = from_gguf(raw, t, rows, cols)
    assert m.fmt == ("int8" if qtype == "Q8_0" else "int4")
    assert np.array_equal(m.dequantize().numpy(), ref.reshape(rows, cols))
    assert m.nbytes == raw.nbytes
    with pytest.raises(ValueError, match="bytes"):
        from_gguf(raw, t, rows + 1, cols)
