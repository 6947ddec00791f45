"""Entry points of the quantized integer kernels (C++ ``quant_kernels.cpp`` or the fallback).

Two primitives cover every linear of a decoder, plus fused MLP kernels (one call per layer):

* :func:`q_matvec` ``y[j] = W[rows[j]] . x``: row-major linears (``[out, in]``, blocks
  along ``in``: q/k/v/o, gate/up, lm_head), output-sparse when ``rows`` is given.
* :func:`q_axpy` ``y = sum_r a[r] * W[r]``: matrices stored transposed, one row per input
  (the MLP down projection stored neuron-major, input-sparse TEAL-style linears as W^T).
* :func:`q_mlp` / :func:`q_mlp_threshold` / :func:`q_sketch_mlp`: the whole MLP; gate/up of
  the listed (or all) neurons by integer dot products, then ``q_axpy`` over the kept
  neurons' down rows. :func:`q_mlp_act` returns the activations those kernels compute,
  bit for bit, for calibration and evaluation.

Integer semantics (both backends): ``x`` is quantized once per call to int8 with one fp32
scale per 32-block (:func:`quantize_activation`); each 32-block of a weight row gives an
exact integer dot product, scaled by ``d_w * dx`` (plus ``m_w * dx * sum(q_x)`` for int4)
and summed in fp32. ``q_axpy`` dequantizes the listed rows (``d * q (+ m)``) and
accumulates in fp32; its input ``a`` is not quantized.

Backend: the C++ extension is built on first use (``MOYU_KERNELS=torch|cpp`` as for the
fp32 kernels; a failed build falls back with one warning line). It picks its code path at
run time (``avx512`` = AVX-512 VNNI, ``avx2``, ``scalar``); ``MOYU_QUANT_ISA`` or
:func:`set_quant_isa` forces a narrower one (for tests, or to compare paths).
"""
from __future__ import annotations

import os
import threading
from types import ModuleType

from torch import Tensor

from . import _quant_torch
from ._build import build_quant_extension, load_backend
from .quant import QuantMatrix, QuantMLP

ISAS: tuple[str, ...] = ("scalar", "avx2", "avx512")
"""C++ code paths, narrowest first (``avx512`` needs AVX-512 F/BW/VL + VNNI)."""

_ENV_ISA = "MOYU_QUANT_ISA"
MODES: dict[str, int] = {"all": 0, "gate": 1, "act": 2}
"""Neuron rules of the fused MLP kernels: every neuron, ``|act(gate)| > tau``, or
``|a_i| * down_norm_i > tau`` (the C++ ``Mode`` ids)."""
_impl: ModuleType | None = None
_name: str | None = None
_lock = threading.Lock()


def _backend() -> ModuleType:
    global _impl, _name
    with _lock:
        if _impl is None:
            ext = load_backend(build_quant_extension, "quantized kernel")
            if ext is not None and os.environ.get(_ENV_ISA):
                _set_isa(ext, os.environ[_ENV_ISA])
            _impl, _name = (ext, "cpp") if ext is not None else (_quant_torch, "torch")
    return _impl


def _set_isa(ext: ModuleType, isa: str) -> None:
    isa = isa.strip().lower()
    if isa not in ISAS:
        raise ValueError(f"unknown instruction set '{isa}': expected one of {', '.join(ISAS)}")
    best = ISAS[ext.best_isa()]
    if ISAS.index(isa) > ext.best_isa():
        raise ValueError(f"this CPU cannot run the {isa} path (widest available: {best})")
    ext.set_isa(ISAS.index(isa))


def quant_backend_name() -> str:
    """``"cpp"`` when the compiled extension is in use, ``"torch"`` for the fallback."""
    _backend()
    return _name  # type: ignore[return-value]


def quant_isa() -> str:
    """Code path in use: ``"avx512"``, ``"avx2"``, ``"scalar"``, or ``"torch"`` (fallback)."""
    impl = _backend()
    return "torch" if impl is _quant_torch else ISAS[impl.get_isa()]


def best_quant_isa() -> str:
    """Widest code path this CPU can run (``"torch"`` without the extension)."""
    impl = _backend()
    return "torch" if impl is _quant_torch else ISAS[impl.best_isa()]


def set_quant_isa(isa: str | None) -> None:
    """Forces the C++ code path (``None``: the widest this CPU runs). ``ValueError`` for an
    unknown name or one this CPU lacks; no effect on the fallback."""
    impl = _backend()
    if impl is _quant_torch:
        return
    _set_isa(impl, ISAS[impl.best_isa()] if isa is None else isa)


def quantize_activation(x: Tensor, cols_padded: int) -> tuple[Tensor, Tensor]:
    """The kernels' activation quantization of ``x`` ``[..., cols]``: int8 codes
    ``[n, cols_padded]`` (zero padded) and fp32 per-32-block scales ``[n, cols_padded/32]``."""
    impl = _impl or _backend()
    return impl.quantize_act(x, cols_padded // 32)


def q_matvec(x: Tensor, m: QuantMatrix, rows: Tensor | None = None, bias: Tensor | None = None,
             out: Tensor | None = None) -> Tensor:
    """``y[..., j] = W[rows[j]] . x (+ bias[rows[j]])``: reads only the listed rows.

    Args:
        x: ``[cols]`` or ``[n, cols]`` (quantized per call; rows of a batch share the
            weights read).
        m: the weight, ``[out, in]`` with blocks along ``in``.
        rows: int64/int32 row ids in any order (output order follows it); None: all rows.
        bias: float32 ``[m.rows]`` (indexed by row id), or None.
        out: optional contiguous float32 output ``[k]`` / ``[n, k]``, ``k = len(rows)``.
    """
    impl = _impl or _backend()
    return impl.q_matvec(x, *m.args(), rows, bias, out)


def q_axpy(a: Tensor, m: QuantMatrix, rows: Tensor | None = None, tau: float | None = None,
           bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """``y = sum_{r in R} a[r] * dequant(W[r]) (+ bias)``: reads only rows in ``R``.

    Args:
        a: ``[m.rows]`` or ``[n, m.rows]``: one coefficient per row of ``m`` (fp32, not
            quantized); e.g. the input of a linear stored as ``W^T``.
        m: ``[rows, cols]`` matrix, one row per coefficient.
        rows: ``R`` as int64/int32 ids (any order; duplicates count twice); None: all
            rows, or with ``tau`` the rows where ``|a[r]| > tau`` (decided in the kernel).
        bias: float32 ``[m.cols]``, or None.
        out: optional contiguous float32 output ``[cols]`` / ``[n, cols]``.
    """
    impl = _impl or _backend()
    return impl.q_axpy(a, *m.args(), rows, None if tau is None else float(tau), bias, out)


def _mlp(x: Tensor, q: QuantMLP, idx: Tensor | None, mode: int, tau: float,
         down_norm: Tensor | None, out: Tensor | None) -> tuple[Tensor, int]:
    impl = _impl or _backend()
    fi, _, qi, di, mi = q.w_in.args()
    fd, _, qd, dd, md = q.w_down_t.args()
    return impl.q_mlp(x, fi, qi, di, mi, fd, qd, dd, md, q.b_in, q.b_down, idx, q.act_id, mode,
                      float(tau), down_norm, out)


def q_mlp(x: Tensor, q: QuantMLP, idx: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """MLP output over neurons ``idx`` (None: all, the dense path; empty: bias only).

    ``y = sum_{i in idx} a_i * W_down[:, i] (+ b_down)``, ``a_i = act(g_i + bg_i) * (u_i +
    bu_i)`` (gated) or ``act(u_i + bu_i)``; ``g_i, u_i`` are integer dot products of the
    quantized rows with the quantized ``x``. Reads only the listed neurons' rows.
    """
    return _mlp(x, q, idx, MODES["all"], 0.0, None, out)[0]


def q_mlp_threshold(x: Tensor, q: QuantMLP, tau: float, mode: str = "gate",
                    out: Tensor | None = None) -> tuple[Tensor, int]:
    """CATS-style: ``mode="gate"`` keeps neurons with ``|act(g_i)| > tau`` (gated MLPs read
    every gate row, up and down rows only for the kept; plain MLPs threshold
    ``|act(u_i)|``); ``mode="act"`` keeps ``|a_i| > tau`` (gate and up rows read for
    every neuron, down rows for the kept). Returns ``(y, n_kept)``."""
    if mode not in ("gate", "act"):
        raise ValueError(f"unknown threshold mode '{mode}': expected 'gate' or 'act'")
    return _mlp(x, q, None, MODES[mode], tau, None, out)


def q_sketch_mlp(x: Tensor, q: QuantMLP, down_norm: Tensor, tau: float,
                 out: Tensor | None = None) -> tuple[Tensor, int]:
    """The sketch rule on quantized weights: ``a_i`` for every neuron from the quantized
    gate/up rows, kept when ``|a_i| * down_norm[i] > tau``, then only the kept neurons'
    down rows. ``down_norm`` is float32 ``[d_ff]`` (e.g. :meth:`QuantMLP.down_norm`).
    Returns ``(y, n_kept)`` (kept neurons summed over the rows of ``x``)."""
    return _mlp(x, q, None, MODES["act"], tau, down_norm, out)


def q_mlp_act(x: Tensor, q: QuantMLP, gate_only: bool = False) -> Tensor:
    """Activations of every neuron, float32 ``[n, d_ff]``, bit-identical to those the fused
    kernels compute (same code path), so thresholds calibrated on them select the same
    neurons at decode. ``gate_only``: ``act(g_i + bg_i)`` instead (what CATS gate mode
    thresholds; for plain MLPs both are ``act(u_i + bu_i)``)."""
    impl = _impl or _backend()
    fi, _, qi, di, mi = q.w_in.args()
    return impl.q_mlp_act(x, fi, qi, di, mi, q.r, q.b_in, q.act_id, bool(gate_only))
