"""Block-quantized weight formats for the integer kernels: :class:`QuantMatrix`, :class:`QuantMLP`.

Two formats, both with blocks of :data:`QBLOCK` = 32 consecutive values along a row and
fp16 block parameters, laid out exactly like GGUF's blocks so GGUF tensors can be used
verbatim (:func:`from_gguf`):

* ``"int8"`` (GGUF Q8_0): ``qs`` int8 ``[rows, nb * 32]``, scale ``d`` fp16 ``[rows, nb]``;
  ``w = d * q`` with ``q`` in [-127, 127]. 34 bytes per 32 weights.
* ``"int4"`` (GGUF Q4_1): ``qs`` uint8 ``[rows, nb * 16]``, scale ``d`` and min ``m`` fp16
  ``[rows, nb]``; ``w = d * q + m`` with ``q`` in [0, 15]. Byte ``j`` of a block holds
  element ``j`` in its low nibble and element ``j + 16`` in its high nibble. 20 bytes per
  32 weights.

``nb = ceil(cols / 32)``; a row whose width is not a multiple of 32 is padded with zero
codes (the padding is never part of a result). The arrays of one row are contiguous, so a
kernel that skips a row reads none of its bytes.

The kernels (:mod:`moyu.kernels.quant_ops`) quantize the activation row once per call to
int8 with one fp32 scale per 32-block (``dx = amax / 127``, ``q = round(x * (127 /
amax))``), so hidden states with outlier channels only coarsen their own blocks.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from .packing import ACTIVATIONS, activation_id

QBLOCK = 32
"""Values per quantization block (both formats)."""

QUANT_FORMATS: tuple[str, ...] = ("int8", "int4")
"""Weight formats; the id passed to C++ is the position here."""

_FP16_MAX = 65504.0
_GGUF_TYPES = {"Q8_0": "int8", "Q4_1": "int4"}


def format_id(fmt: str) -> int:
    """Position of ``fmt`` in :data:`QUANT_FORMATS`; ``ValueError`` listing them if unknown."""
    try:
        return QUANT_FORMATS.index(fmt)
    except ValueError:
        raise ValueError(f"unknown weight format '{fmt}': expected one of "
                         f"{', '.join(QUANT_FORMATS)}") from None


def num_blocks(cols: int) -> int:
    """Blocks per row of ``cols`` values."""
    return (cols + QBLOCK - 1) // QBLOCK


@dataclass(eq=False)
class QuantMatrix:
    """A ``rows x cols`` matrix in a block-quantized format (see the module docstring).

    Attributes:
        fmt: ``"int8"`` or ``"int4"``.
        cols: true row width (``qs`` holds ``nb * 32`` values per row, zero padded).
        qs: codes, int8 ``[rows, nb * 32]`` (int8) or uint8 ``[rows, nb * 16]`` (int4).
        d: fp16 block scales ``[rows, nb]``.
        m: fp16 block mins ``[rows, nb]`` (int4), else None.
    """

    fmt: str
    cols: int
    qs: Tensor
    d: Tensor
    m: Tensor | None = None

    def __post_init__(self) -> None:
        format_id(self.fmt)
        nb = num_blocks(self.cols)
        width = nb * QBLOCK if self.fmt == "int8" else nb * QBLOCK // 2
        dtype = torch.int8 if self.fmt == "int8" else torch.uint8
        if self.qs.dtype != dtype or self.qs.dim() != 2 or self.qs.shape[1] != width:
            raise ValueError(f"{self.fmt} codes must be {dtype} [rows, {width}], got "
                             f"{self.qs.dtype} {list(self.qs.shape)}")
        if self.d.dtype != torch.float16 or tuple(self.d.shape) != (self.qs.shape[0], nb):
            raise ValueError(f"scales must be float16 [{self.qs.shape[0]}, {nb}]")
        if (self.fmt == "int4") != (self.m is not None):
            raise ValueError("int4 needs mins (m); int8 has none")
        if self.m is not None and (self.m.dtype != torch.float16 or self.m.shape != self.d.shape):
            raise ValueError("mins must be float16 shaped like the scales")

    @property
    def fmt_id(self) -> int:
        """Format id the C++ kernels take."""
        return format_id(self.fmt)

    @property
    def rows(self) -> int:
        """Number of rows."""
        return self.qs.shape[0]

    @property
    def blocks(self) -> int:
        """Blocks per row (``nb``)."""
        return self.d.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)``."""
        return self.rows, self.cols

    @property
    def row_nbytes(self) -> int:
        """Bytes one row occupies (codes, scales and mins): what a kernel reads per kept row."""
        per_block = 2 if self.m is None else 4
        return self.qs.shape[1] + self.blocks * per_block

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors held."""
        return self.rows * self.row_nbytes

    def args(self) -> tuple:
        """``(fmt_id, cols, qs, d, m)``: the matrix as the C++ entry points take it."""
        return self.fmt_id, self.cols, self.qs, self.d, self.m

    def slice(self, rows: Tensor) -> QuantMatrix:
        """A compact copy holding rows ``rows`` (in that order), with their scales and mins."""
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.rows):
            raise IndexError(f"row index out of range [0, {self.rows})")
        return replace(self, qs=self.qs.index_select(0, rows).contiguous(),
                       d=self.d.index_select(0, rows).contiguous(),
                       m=None if self.m is None else self.m.index_select(0, rows).contiguous())

    def codes(self) -> Tensor:
        """Integer codes as int32 ``[rows, nb, 32]`` (int4 nibbles unpacked into order)."""
        if self.fmt == "int8":
            return self.qs.view(self.rows, self.blocks, QBLOCK).to(torch.int32)
        packed = self.qs.view(self.rows, self.blocks, QBLOCK // 2).to(torch.int32)
        return torch.cat((packed & 0x0F, packed >> 4), dim=-1)

    def dequantize(self) -> Tensor:
        """The float32 ``[rows, cols]`` matrix the codes stand for (``d * q`` or ``d * q + m``,
        computed in fp32 exactly as GGUF dequantizes)."""
        w = self.codes().float() * self.d.float().unsqueeze(-1)
        if self.m is not None:
            w = w + self.m.float().unsqueeze(-1)
        return w.reshape(self.rows, -1)[:, :self.cols].contiguous()


def _blocks(w: Tensor) -> tuple[Tensor, Tensor]:
    """(w padded to whole blocks as [rows, nb, 32], mask of the real values)."""
    rows, cols = w.shape
    pad = num_blocks(cols) * QBLOCK - cols
    valid = torch.ones(rows, cols, dtype=torch.bool)
    w = torch.nn.functional.pad(w, (0, pad))
    valid = torch.nn.functional.pad(valid, (0, pad))
    return w.view(rows, -1, QBLOCK), valid.view(rows, -1, QBLOCK)


def quantize(w: Tensor, fmt: str) -> QuantMatrix:
    """Quantizes a float ``[rows, cols]`` matrix to ``fmt`` (``"int8"`` or ``"int4"``).

    int8: ``d = amax / 127`` per block (rounded to fp16), ``q = round(w / d)``. int4: ``m =
    min``, ``d = (max - min) / 15`` per block (both rounded to fp16), ``q = round((w - m) /
    d)`` clamped to [0, 15]; a block whose values already lie on a grid of at most 16
    levels with another step (the smallest gap between them) keeps that step when it
    rounds them more exactly. Codes are computed from the fp16-rounded parameters, so
    ``dequantize`` is within half a step of ``w``.
    """
    format_id(fmt)
    if w.dim() != 2:
        raise ValueError(f"w must be [rows, cols], got {list(w.shape)}")
    w = w.detach().to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(w).all():
        raise ValueError("cannot quantize a matrix with inf or nan entries")
    if w.numel() and float(w.abs().max()) > _FP16_MAX:
        raise ValueError(f"weights beyond +-{_FP16_MAX:g} do not fit fp16 block parameters")
    rows, cols = w.shape
    blk, valid = _blocks(w)
    if fmt == "int8":
        d = (blk.abs().amax(-1) / 127).half()
        df = d.float().unsqueeze(-1)
        q = torch.where(df > 0, blk / df, torch.zeros_like(blk)).round().clamp(-127, 127)
        return QuantMatrix("int8", cols, q.to(torch.int8).reshape(rows, -1).contiguous(), d.contiguous())
    big = torch.finfo(torch.float32).max
    lo = torch.where(valid, blk, torch.full_like(blk, big)).amin(-1)
    hi = torch.where(valid, blk, torch.full_like(blk, -big)).amax(-1)
    m = lo.half()
    span = hi - m.float()
    d = (span / 15).half()
    q, err = _codes4(blk, valid, d, m)
    # A block already on a coarser grid (a 4-bit GGUF source whose codes do not span 0..15,
    # e.g. Q4_K sub-blocks with their own 6-bit scales) is held by its own step instead:
    # the smallest gap between its values, if every value lies on that grid.
    srt = torch.where(valid, blk, lo.unsqueeze(-1)).sort(-1).values
    gaps = srt[..., 1:] - srt[..., :-1]
    gap = torch.where(gaps > 1e-3 * span.unsqueeze(-1), gaps, torch.full_like(gaps, big)).amin(-1)
    levels = torch.where(gap < big, span / gap, torch.ones_like(span)).round().clamp(1, 15)
    d_grid = (span / levels).half()
    q_grid, err_grid = _codes4(blk, valid, d_grid, m)
    better = err_grid < err
    d = torch.where(better, d_grid, d)
    q = torch.where(better.unsqueeze(-1), q_grid, q)
    packed = q[..., :QBLOCK // 2] | (q[..., QBLOCK // 2:] << 4)
    return QuantMatrix("int4", cols, packed.reshape(rows, -1).contiguous(), d.contiguous(), m.contiguous())


def _codes4(blk: Tensor, valid: Tensor, d: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """int4 codes of blocks for fp16 ``d``, ``m`` and each block's largest round-trip error."""
    df, mf = d.float().unsqueeze(-1), m.float().unsqueeze(-1)
    q = torch.where(df > 0, (blk - mf) / df, torch.zeros_like(blk)).round().clamp(0, 15)
    q = torch.where(valid, q, torch.zeros_like(q))
    err = torch.where(valid, (q * df + mf - blk).abs(), torch.zeros_like(blk)).amax(-1)
    return q.to(torch.uint8), err


def block_errors(w: Tensor, q: QuantMatrix) -> Tensor:
    """Largest absolute round-trip error of each block of ``w [rows, cols]`` under ``q``: [rows, nb]."""
    blk, valid = _blocks(w.detach().to(device="cpu", dtype=torch.float32))
    deq, _ = _blocks(q.dequantize())
    return torch.where(valid, (deq - blk).abs(), torch.zeros_like(blk)).amax(-1)


def pack_quantized(w: Tensor, fmt: str) -> QuantMatrix:
    """The matrix the runtime stores for ``w`` under the weight format ``fmt``.

    ``quantize(w, fmt)``, except under ``int8`` for a matrix that int4 holds at least as
    exactly as int8 (total squared error; a 4-bit GGUF source along its own blocks: Q4_0/Q4_1
    bit for bit, Q4_K up to the fp16 rounding of its sub-block steps): that one is kept in
    int4, the same values in 20 instead of 34 bytes per block, where the symmetric int8
    grid could only approximate them (``amax / 127`` steps do not fall on the source's
    16 levels and offset). So ``int8`` never stores a matrix less exactly than its source
    allows at 8 bits, and never re-quantizes a 4-bit source into a lossy 8-bit grid.
    """
    if fmt == "int8" and w.dim() == 2 and w.shape[0]:
        w32 = w.detach().to(device="cpu", dtype=torch.float32)
        head = w32[:8]

        def pick(x: Tensor) -> QuantMatrix:   # the one with the smaller total squared error
            q4, q8 = quantize(x, "int4"), quantize(x, "int8")
            sq = lambda q: float((q.dequantize() - x).square().sum())   # noqa: E731
            return q4 if sq(q4) <= sq(q8) else q8

        if pick(head).fmt == "int4":   # cheap rejection first
            return pick(w32)
    return quantize(w, fmt)


def interleave_rows(a: QuantMatrix, b: QuantMatrix) -> QuantMatrix:
    """Rows ``a[0], b[0], a[1], b[1], ...``: the gate/up layout of :class:`QuantMLP` built
    from two matrices quantized separately (e.g. GGUF gate and up tensors)."""
    if a.fmt != b.fmt or a.shape != b.shape:
        raise ValueError(f"cannot interleave {a.fmt} {a.shape} with {b.fmt} {b.shape}")

    def mix(s: Tensor | None, t: Tensor | None) -> Tensor | None:
        return None if s is None else torch.stack((s, t), dim=1).reshape(-1, s.shape[1]).contiguous()

    return QuantMatrix(a.fmt, a.cols, mix(a.qs, b.qs), mix(a.d, b.d), mix(a.m, b.m))


def from_gguf(raw: np.ndarray | Tensor, qtype: str, rows: int, cols: int) -> QuantMatrix:
    """A GGUF Q8_0 / Q4_1 tensor's raw blocks as a :class:`QuantMatrix`, values unchanged.

    Args:
        raw: the tensor's bytes (``gguf.GGUFReader`` ``tensor.data``, any shape, uint8).
        qtype: ``"Q8_0"`` (-> int8) or ``"Q4_1"`` (-> int4); a ``GGMLQuantizationType``
            is accepted too.
        rows, cols: the matrix shape in PyTorch order (GGUF's ``ne1``, ``ne0``): blocks
            run along ``cols``, so a ``[out, in]`` linear weight maps onto rows directly.
    """
    name = getattr(qtype, "name", qtype)
    if name not in _GGUF_TYPES:
        raise ValueError(f"unsupported GGUF block type {name}: expected {', '.join(_GGUF_TYPES)}")
    if cols % QBLOCK:
        raise ValueError(f"GGUF rows hold whole blocks of {QBLOCK}; got {cols} columns")
    nb = cols // QBLOCK
    per_block = 34 if name == "Q8_0" else 20
    data = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8).reshape(-1).copy()) \
        if isinstance(raw, np.ndarray) else raw.detach().contiguous().view(torch.uint8).reshape(-1)
    if data.numel() != rows * nb * per_block:
        raise ValueError(f"{name} [{rows}, {cols}] needs {rows * nb * per_block} bytes, got {data.numel()}")
    blk = data.view(rows, nb, per_block)
    d = blk[..., 0:2].contiguous().view(torch.float16).reshape(rows, nb)
    if name == "Q8_0":
        qs = blk[..., 2:].contiguous().view(torch.int8).reshape(rows, nb * QBLOCK)
        return QuantMatrix("int8", cols, qs, d.contiguous())
    m = blk[..., 2:4].contiguous().view(torch.float16).reshape(rows, nb)
    qs = blk[..., 4:].reshape(rows, nb * QBLOCK // 2).contiguous()
    return QuantMatrix("int4", cols, qs, d.contiguous(), m.contiguous())


@dataclass(eq=False)
class QuantMLP:
    """An MLP's weights quantized and laid out for :func:`moyu.kernels.quant_ops.q_mlp`.

    Attributes:
        w_in: ``[r * d_ff, d]``; gated (r = 2): row ``2i`` is neuron i's gate row and row
            ``2i + 1`` its up row (adjacent, as in :class:`PackedMLP`); plain (r = 1): up rows.
        w_down_t: ``[d_ff, d]``, W_down^T: neuron i's down column as row i (a skipped
            neuron's down weights are never read).
        b_in: ``[d_ff, r]`` float32 input biases (zeros where a projection has none), or None.
        b_down: ``[d]`` float32, or None.
        act: activation kind (:data:`ACTIVATIONS`); act_id its index.
        neurons: original neuron ids of the rows held (set by :meth:`slice`), or None.
    """

    w_in: QuantMatrix
    w_down_t: QuantMatrix
    b_in: Tensor | None
    b_down: Tensor | None
    act: str
    act_id: int
    neurons: Tensor | None = None

    def __post_init__(self) -> None:
        if self.w_in.rows not in (self.d_ff, 2 * self.d_ff) or self.w_in.cols != self.w_down_t.cols:
            raise ValueError(f"w_in {self.w_in.shape} does not fit w_down_t {self.w_down_t.shape}")

    @property
    def gated(self) -> bool:
        """True for act(gate) * up MLPs."""
        return self.w_in.rows == 2 * self.d_ff

    @property
    def r(self) -> int:
        """Input rows per neuron (2 gated, 1 plain)."""
        return 2 if self.gated else 1

    @property
    def d(self) -> int:
        """Hidden size."""
        return self.w_down_t.cols

    @property
    def d_ff(self) -> int:
        """Number of neurons held."""
        return self.w_down_t.rows

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors held."""
        extra = sum(t.nbytes for t in (self.b_in, self.b_down) if t is not None)
        return self.w_in.nbytes + self.w_down_t.nbytes + extra

    def down_norm(self) -> Tensor:
        """``||W_down[:, i]||`` of the dequantized down weights, float32 ``[d_ff]`` (the
        sketch score's weight)."""
        return self.w_down_t.dequantize().norm(dim=1)

    def slice(self, idx: Tensor) -> QuantMLP:
        """A compact copy holding only neurons ``idx`` (``neurons`` maps rows back)."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.d_ff):
            raise IndexError(f"neuron index out of range [0, {self.d_ff})")
        in_rows = (idx.unsqueeze(1) * self.r + torch.arange(self.r)).reshape(-1)
        neurons = idx if self.neurons is None else self.neurons.index_select(0, idx)
        return replace(self, w_in=self.w_in.slice(in_rows), w_down_t=self.w_down_t.slice(idx),
                       b_in=None if self.b_in is None else self.b_in.index_select(0, idx).contiguous(),
                       neurons=neurons)


def _bias(b: Tensor | None, n: int, name: str) -> Tensor | None:
    if b is None:
        return None
    if b.numel() != n:
        raise ValueError(f"{name} has {b.numel()} elements, expected {n}")
    return b.detach().to(device="cpu", dtype=torch.float32).reshape(n).contiguous()


def quantize_mlp(w_up: Tensor, w_down: Tensor, act: str, fmt: str, w_gate: Tensor | None = None,
                 b_up: Tensor | None = None, b_gate: Tensor | None = None,
                 b_down: Tensor | None = None, down_fmt: str | None = None) -> QuantMLP:
    """Quantizes an MLP given in ``nn.Linear`` layout (``w_up``/``w_gate`` ``[d_ff, d]``,
    ``w_down`` ``[d, d_ff]``) into :class:`QuantMLP`; ``down_fmt`` defaults to ``fmt``."""
    act_id = activation_id(act)
    d_ff, d = w_up.shape
    if w_down.shape != (d, d_ff):
        raise ValueError(f"w_down must be [{d}, {d_ff}], got {list(w_down.shape)}")
    if w_gate is not None and w_gate.shape != (d_ff, d):
        raise ValueError(f"w_gate must be [{d_ff}, {d}], got {list(w_gate.shape)}")
    if w_gate is None and b_gate is not None:
        raise ValueError("b_gate given without w_gate")
    if w_gate is not None:
        w_in = torch.stack((w_gate.detach().float(), w_up.detach().float()), dim=1).reshape(2 * d_ff, d)
    else:
        w_in = w_up
    r = 2 if w_gate is not None else 1
    b_in = None
    if b_up is not None or b_gate is not None:
        b_in = torch.zeros(d_ff, r, dtype=torch.float32)
        if b_up is not None:
            b_in[:, -1] = _bias(b_up, d_ff, "b_up")
        if b_gate is not None:
            b_in[:, 0] = _bias(b_gate, d_ff, "b_gate")
    return QuantMLP(w_in=pack_quantized(w_in, fmt), w_down_t=pack_quantized(w_down.detach().float().t(), down_fmt or fmt),
                    b_in=b_in, b_down=_bias(b_down, d, "b_down"), act=act, act_id=act_id)


__all__ = ["ACTIVATIONS", "QBLOCK", "QUANT_FORMATS", "QuantMLP", "QuantMatrix", "format_id",
           "from_gguf", "interleave_rows", "num_blocks", "pack_quantized", "quantize", "quantize_mlp"]


def round_activations(x: Tensor) -> Tensor:
    """``x`` as the integer kernels see it: each row cut into blocks of 32 along the last
    axis, each block quantized to int8 with its own scale (``amax / 127``) and returned
    dequantized, in float32. What a quantized matvec multiplies the weights by."""
    from ._quant_torch import quantize_act
    cols = x.shape[-1]
    nb = num_blocks(cols)
    q, dx = quantize_act(x, nb)
    y = q.view(-1, nb, QBLOCK).float() * dx.unsqueeze(-1)
    return y.reshape(-1, nb * QBLOCK)[:, :cols].reshape(x.shape)
