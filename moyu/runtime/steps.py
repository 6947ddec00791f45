"""The runtime's dense steps: the default MLP step and the dense linear.

The runtime never computes an MLP or an attention projection itself: it asks an
``mlp_factory(layer) -> MLPStep`` and a ``linear_factory(layer_index, role, weight, bias)
-> callable`` for them once, at conversion time. Sparse methods plug in their own steps
(:mod:`moyu.runtime.sparse`); the defaults here are dense. Every step packs its weights at
construction in a :class:`~moyu.kernels.WeightFormat` and keeps no reference to the HF
module it came from.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import kernels as K
from ..arch import MLPLayer
from ..errors import MoyuError
from ..kernels.formats import WeightFormat, weight_format
from ..kernels.packing import PackedMLP, activation_kind

# Rows of a low-precision weight converted to fp32 at a time for a prompt GEMM: the fp32
# copy is a bounded scratch, never the whole matrix.
_PREFILL_ROWS = 1024


@runtime_checkable
class MLPStep(Protocol):
    """One layer's MLP as the runtime calls it.

    ``prefill`` gets the normed MLP input of every prompt position ``[T, d]`` and must
    return the dense MLP output ``[T, d]`` (sequence-level methods record prompt
    statistics here and may slice their weights once). ``decode`` gets one position
    ``[d]`` (float32, contiguous) and returns ``[d]``; it sets ``kept`` to the number
    of neurons it computed.

    Prompt reuse (:meth:`LeanModel.prefill` with ``reuse``) hands ``prefill`` only the new
    positions. A step whose prefill records prompt statistics must therefore also have a
    ``keep_prompt`` flag and ``prefill_from(x, start)`` (as
    :class:`~moyu.runtime.sparse.PromptStep`); one without ``keep_prompt`` is taken to
    keep no state across positions.
    """

    kept: int

    def prefill(self, x: Tensor) -> Tensor: ...

    def decode(self, x: Tensor) -> Tensor: ...


MLPFactory = Callable[[MLPLayer], MLPStep]
LinearStep = Callable[[Tensor], Tensor]
LinearFactory = Callable[[int, str, Tensor, "Tensor | None"], LinearStep]


def _n_rows(w) -> int:
    return w.shape[0] if isinstance(w, Tensor) else w.rows


def _rows_f32(w, r0: int, r1: int) -> Tensor:
    """Rows ``r0:r1`` of a float tensor or a :class:`~moyu.kernels.quant.QuantMatrix` as fp32."""
    if isinstance(w, Tensor):
        return w[r0:r1].float()
    from ..kernels import quant_ops
    if quant_ops.quant_backend_name() == "cpp":   # one pass in C++, the same values
        r1 = min(r1, w.rows)
        return quant_ops._impl.dequant_rows(*w.args(), r0, r1)[:, :w.cols]
    return replace(w, qs=w.qs[r0:r1], d=w.d[r0:r1], m=None if w.m is None else w.m[r0:r1]).dequantize()


def rows_matmul(x: Tensor, w) -> Tensor:
    """``x [T, in] @ w[rows, in]^T`` in fp32 for weights stored in any format.

    fp32 weights go to one GEMM; other formats are widened a block of rows at a time (CPUs
    without native bf16 have no fast bf16 GEMM, and a whole fp32 copy per prompt would
    double the memory held). Block-quantized weights go through the decode kernel's integer
    dot products for all rows at once (the C++ backend: 1.5x faster than widening them to
    fp32 for a GEMM here), so a prompt position computes what the same position computes
    when decoded; the fallback rounds ``x`` as those kernels do and widens the weights.
    """
    if isinstance(w, Tensor):
        if w.dtype == torch.float32:
            return F.linear(x, w)
    else:
        from ..kernels.quant_ops import q_matvec, quant_backend_name
        if quant_backend_name() == "cpp":   # decode's own integer dots, every row at once
            return q_matvec(x, w)
        from ..kernels.quant import round_activations
        x = round_activations(x)
    n = _n_rows(w)
    out = x.new_empty(x.shape[0], n)
    for r0 in range(0, n, _PREFILL_ROWS):
        out[:, r0:r0 + _PREFILL_ROWS] = F.linear(x, _rows_f32(w, r0, r0 + _PREFILL_ROWS))
    return out


def cols_matmul(a: Tensor, wt) -> Tensor:
    """``a [T, k] @ wt [k, out]`` in fp32 for a transposed weight stored in any format."""
    if isinstance(wt, Tensor) and wt.dtype == torch.float32:
        return a @ wt
    n = _n_rows(wt)
    out = None
    for r0 in range(0, n, _PREFILL_ROWS):
        part = a[:, r0:r0 + _PREFILL_ROWS] @ _rows_f32(wt, r0, r0 + _PREFILL_ROWS)
        out = part if out is None else out.add_(part)
    return out


def pack_layer(layer: MLPLayer, fmt: "str | WeightFormat" = "fp32"):
    """The layer's MLP packed for the kernels: a :class:`~moyu.kernels.PackedMLP` for float
    formats, a :class:`~moyu.kernels.quant.QuantMLP` for block-quantized ones."""
    fmt = weight_format(fmt)
    args = dict(w_gate=layer.w_gate, b_up=layer.b_up, b_gate=layer.b_gate, b_down=layer.b_down)
    if fmt.quantized:
        from ..kernels.quant import quantize_mlp
        down = fmt.for_role("down").name
        return quantize_mlp(layer.w_up, layer.w_down, activation_kind(layer.act), fmt.name, down_fmt=down, **args)
    return K.pack_mlp(layer.w_up, layer.w_down, activation_kind(layer.act), fmt=fmt, **args)


class MLPKernels:
    """The decode kernels of one packed MLP's format, chosen once at construction."""

    def __init__(self, packed):
        if isinstance(packed, PackedMLP):
            self.mlp, self.threshold = K.sparse_mlp, K.sparse_mlp_threshold
            self.sketch = None
        else:
            from ..kernels import quant_ops as Q
            self.mlp = Q.q_mlp
            self.threshold = Q.q_mlp_threshold
            self.sketch = Q.q_sketch_mlp


def packed_activations(x: Tensor, packed: PackedMLP) -> Tensor:
    """The MLP activation vector ``a [T, d_ff]`` of prompt rows ``x [T, d]`` from packed weights.

    ``w_in`` viewed as ``[r * d_ff, d]`` is an ordinary linear whose outputs interleave
    gate and up per neuron, so no second copy of the weights is needed.
    """
    w_in = packed.w_in.reshape(-1, packed.d) if isinstance(packed.w_in, Tensor) else packed.w_in
    h = rows_matmul(x, w_in).view(x.shape[0], packed.d_ff, -1)
    if packed.b_in is not None:
        h = h + packed.b_in
    act = K.ACTIVATION_FNS[packed.act_id]
    return act(h[..., 0]) * h[..., 1] if packed.gated else act(h[..., 0])


def packed_mlp_matmul(x: Tensor, packed: PackedMLP, a: Tensor | None = None) -> Tensor:
    """Dense MLP of many rows ``[T, d]`` over a ``PackedMLP``'s own storage (two GEMMs).

    ``a``: the activations when the caller already has them (:func:`packed_activations`).
    """
    a = packed_activations(x, packed) if a is None else a
    y = cols_matmul(a, packed.w_down_t)
    return y if packed.b_down is None else y + packed.b_down


class DenseMLPStep:
    """The default MLP step: the kernels' dense path at decode, two GEMMs at prefill.

    It also meters what it reads, so sparse steps derive from it: ``count`` records the
    neurons one decode call computed and ``bytes_per_token`` is what a token reads.
    """

    def __init__(self, layer: MLPLayer, fmt: "str | WeightFormat" = "fp32"):
        self.fmt = weight_format(fmt)
        self.packed = pack_layer(layer, self.fmt)
        self.kernels = MLPKernels(self.packed)
        self.kept = self.packed.d_ff
        self.kept_sum = self.calls = 0
        self._out = torch.empty(self.packed.d)

    def prefill(self, x: Tensor) -> Tensor:
        """Dense MLP over the prompt, ``[T, d] -> [T, d]``."""
        return packed_mlp_matmul(x, self.packed)

    def decode(self, x: Tensor) -> Tensor:
        """Dense MLP of one position, ``[d] -> [d]`` (output buffer reused)."""
        return self.kernels.mlp(x, self.packed, None, self._out)

    def fused(self):
        """This step as the fused decode loop runs it (:class:`~moyu.runtime.fused.FusedMLP`),
        or None. Only the dense step itself qualifies here: a subclass that decodes
        differently must say how (or stay on the per-op loop)."""
        if type(self) is not DenseMLPStep or not self.fmt.quantized:
            return None
        from .fused import FusedMLP
        return FusedMLP(self.packed, "all")

    def count(self, kept: int) -> None:
        """Record one decode call that computed ``kept`` neurons."""
        self.kept = kept
        self.kept_sum += kept
        self.calls += 1

    @property
    def kept_share(self) -> float:
        """Mean share of neurons computed per decode call so far."""
        return self.kept_sum / (self.calls * self.packed.d_ff) if self.calls else 1.0

    @property
    def nbytes(self) -> int:
        """Bytes held: the packed weights (sparse steps add their selection structures)."""
        return self.packed.nbytes

    def bytes_per_token(self) -> float:
        """Mean weight bytes read per decoded token (selection structures included)."""
        return self.packed.nbytes


def dense_mlp_factory(fmt: "str | WeightFormat" = "fp32") -> MLPFactory:
    """Factory of :class:`DenseMLPStep`."""
    fmt = weight_format(fmt)
    return lambda layer: DenseMLPStep(layer, fmt)


class DenseLinear:
    """``y = W x + b`` for the attention projections and the lm_head; float32 in and out.

    Float weights are packed as ``W^T`` and a single position goes through
    ``input_sparse_linear`` with every channel (measured 2-4x faster than MKL's
    ``F.linear`` gemv here, in fp32 and bf16). Prompts (2-D ``x``) use one GEMM.

    Block-quantized formats keep ``W`` row-major (``[out, in]``, blocks along ``in``) and
    decode with integer dot products (:func:`moyu.kernels.quant_ops.q_matvec`).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, fmt: "str | WeightFormat" = "fp32",
                 transposed: bool = False, rowmajor: bool = False):
        self.fmt = weight_format(fmt)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.packed = self.q = self.qt = self.w = None
        if rowmajor and not self.fmt.quantized:
            # float W kept [out, in]: one dot product per output (the lm_head; see rows_matvec)
            self.w = weight.detach().to(self.fmt.dtype).contiguous()
        elif self.fmt.quantized:
            from ..kernels.quant import pack_quantized
            if transposed:   # W^T, one row per input channel: what input sparsity skips
                self.qt = pack_quantized(weight.detach().float().t(), self.fmt.name)
            else:
                self.q = pack_quantized(weight.detach(), self.fmt.name)
        else:
            self.packed = K.pack_linear(weight.detach(), self.bias, self.fmt)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def __call__(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """``W x + b``. ``out``: a float32 ``[out_features]`` buffer that a single quantized
        position writes into (saves allocating, and page-faulting, a large output such as
        the logits every token); other paths ignore it."""
        if self.q is not None:
            if x.dim() == 1:
                from ..kernels.quant_ops import q_matvec
                return q_matvec(x, self.q, None, self.bias, out=out)
            y = rows_matmul(x, self.q)
        elif self.qt is not None:
            if x.dim() == 1:
                from ..kernels.quant_ops import q_axpy
                return q_axpy(x, self.qt, None, bias=self.bias)
            y = cols_matmul(x, self.qt)
        elif self.w is not None:
            if x.dim() == 1:
                return K.rows_matvec(x, self.w, self.bias, out=out)
            y = rows_matmul(x, self.w)
        elif x.dim() == 1:
            return K.input_sparse_linear(x, self.packed)
        else:
            y = cols_matmul(x, self.packed.wt)
        return y if self.bias is None else y + self.bias

    def rows(self, ids: Tensor) -> Tensor:
        """Rows ``W[ids]`` as float32 (the embedding lookup of a tied lm_head)."""
        if self.q is not None:
            if ids.numel() == 1:   # a decoded token: one row straight from the codes (~10x faster)
                r = int(ids.reshape(-1)[0])
                if not 0 <= r < self.q.rows:
                    raise IndexError(f"row index out of range [0, {self.q.rows})")
                return _rows_f32(self.q, r, r + 1)
            return self.q.slice(ids).dequantize()
        if self.qt is not None:
            raise MoyuError("a transposed quantized linear cannot serve embedding rows")
        if self.w is not None:
            return self.w[ids].float()
        return self.packed.wt[:, ids].t().float()

    @property
    def nbytes(self) -> int:
        """Bytes of the weight and bias."""
        q = self.q if self.q is not None else self.qt
        if q is not None:
            return q.nbytes + (0 if self.bias is None else self.bias.nbytes)
        if self.w is not None:
            return self.w.nbytes + (0 if self.bias is None else self.bias.nbytes)
        return self.packed.nbytes


def dense_linear_factory(fmt: "str | WeightFormat" = "fp32") -> LinearFactory:
    """Factory of :class:`DenseLinear` (signature of ``linear_factory``)."""
    fmt = weight_format(fmt)
    return lambda index, role, weight, bias: DenseLinear(weight, bias, fmt)
