"""Kernel-friendly weight layouts: :class:`PackedMLP` and :class:`PackedLinear`.

Everything one neuron needs is contiguous so a kernel that skips a neuron skips its bytes:

* ``PackedMLP.w_in`` is ``[d_ff, r, d]``: for gated MLPs (r = 2) neuron i's gate row and
  up row are adjacent; for plain MLPs (r = 1) it is the up projection.
* ``PackedMLP.w_down_t`` is ``W_down^T`` ``[d_ff, d]``: neuron i's down column is a row.
* ``PackedLinear.wt`` is ``W^T`` ``[in, out]``: input channel j's column is a row.

Each packed object carries its :class:`~moyu.kernels.formats.WeightFormat`; biases are
always kept in float32.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MoyuError
from .formats import WeightFormat, weight_format

ACTIVATIONS: tuple[str, ...] = ("silu", "gelu", "gelu_tanh", "relu")
"""Activation kinds the kernels implement; the id passed to C++ is the position here."""

ACTIVATION_FNS: tuple = (
    F.silu,
    F.gelu,
    lambda t: F.gelu(t, approximate="tanh"),
    F.relu,
)
"""The torch function of each activation kind, in :data:`ACTIVATIONS` order."""


def activation_kind(act: nn.Module) -> str:
    """The kernels' name (one of :data:`ACTIVATIONS`) of an HF activation module."""
    name = type(act).__name__
    if name in ("SiLUActivation", "SiLU"):
        return "silu"
    if name == "GELUActivation":
        return "gelu"
    if name in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation"):
        return "gelu_tanh"
    if name in ("ReLU", "ReLUActivation"):
        return "relu"
    if name == "GELU":
        return "gelu_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu"
    raise MoyuError(f"unsupported MLP activation {name}: the runtime knows SiLU, GELU (exact "
                    "or tanh) and ReLU")


def activation_id(act: str) -> int:
    """Position of ``act`` in :data:`ACTIVATIONS`; ``ValueError`` if unsupported."""
    try:
        return ACTIVATIONS.index(act)
    except ValueError:
        raise ValueError(f"unsupported activation '{act}': expected one of "
                         f"{', '.join(ACTIVATIONS)}") from None


def _weight(w: Tensor, dtype: torch.dtype) -> Tensor:
    return w.detach().to(device="cpu", dtype=dtype)


def _bias(b: Tensor | None, n: int, name: str) -> Tensor | None:
    if b is None:
        return None
    if b.numel() != n:
        raise ValueError(f"{name} has {b.numel()} elements, expected {n}")
    return b.detach().to(device="cpu", dtype=torch.float32).reshape(n).contiguous()


def _float_format(fmt) -> WeightFormat:
    f = weight_format(fmt)
    if f.quantized:
        raise ValueError(f"format {f.name} is packed by moyu.kernels.quant, not as a float tensor")
    return f


@dataclass(eq=False)
class PackedMLP:
    """An MLP's weights laid out for :func:`moyu.kernels.sparse_mlp`.

    Attributes:
        w_in: ``[d_ff, r, d]`` (r = 2: gate row then up row per neuron; r = 1: up row).
        w_down_t: ``[d_ff, d]``, the transposed down projection.
        b_in: ``[d_ff, r]`` float32 input biases (zeros where a projection has none), or None.
        b_down: ``[d]`` float32 down bias, or None.
        act: activation kind, one of :data:`ACTIVATIONS`.
        act_id: its index in :data:`ACTIVATIONS` (what the kernels take).
        neurons: original neuron ids of the rows held (set by :meth:`slice`), or None when
            the rows are all neurons in order.
        fmt: the weights' storage format.
    """

    w_in: Tensor
    w_down_t: Tensor
    b_in: Tensor | None
    b_down: Tensor | None
    act: str
    act_id: int
    neurons: Tensor | None = None
    fmt: WeightFormat = weight_format("fp32")

    @property
    def gated(self) -> bool:
        """True for act(gate) * up MLPs."""
        return self.w_in.shape[1] == 2

    @property
    def d(self) -> int:
        """Hidden size (input and output width)."""
        return self.w_in.shape[2]

    @property
    def d_ff(self) -> int:
        """Number of neurons held."""
        return self.w_in.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors held (weights and biases)."""
        tensors = (self.w_in, self.w_down_t, self.b_in, self.b_down)
        return sum(t.nbytes for t in tensors if t is not None)

    def slice(self, idx: Tensor) -> PackedMLP:
        """A compact copy holding only neurons ``idx`` (in that order).

        ``sparse_mlp(x, p.slice(idx), None)`` equals ``sparse_mlp(x, p, idx)`` while
        reading contiguous memory; ``neurons`` maps the rows back to original ids.
        """
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.d_ff):
            raise IndexError(f"neuron index out of range [0, {self.d_ff})")
        neurons = idx if self.neurons is None else self.neurons.index_select(0, idx)
        return replace(
            self,
            w_in=self.w_in.index_select(0, idx).contiguous(),
            w_down_t=self.w_down_t.index_select(0, idx).contiguous(),
            b_in=None if self.b_in is None else self.b_in.index_select(0, idx).contiguous(),
            neurons=neurons,
        )


def pack_mlp(w_up: Tensor, w_down: Tensor, act: str, w_gate: Tensor | None = None,
             b_up: Tensor | None = None, b_gate: Tensor | None = None,
             b_down: Tensor | None = None, fmt: "str | WeightFormat" = "fp32") -> PackedMLP:
    """Packs an MLP given in ``nn.Linear`` layout.

    Args:
        w_up: ``[d_ff, d]`` up projection (plain MLPs: fc1).
        w_down: ``[d, d_ff]`` down projection.
        act: activation kind, one of :data:`ACTIVATIONS`.
        w_gate: ``[d_ff, d]`` gate projection for gated MLPs (``act(gate) * up``), else None.
        b_up, b_gate, b_down: optional biases.
        fmt: weight storage format (a name, dtype or WeightFormat; accumulation is fp32).

    Plain fp32 MLPs may share ``w_up``'s storage instead of copying it.
    """
    fmt = _float_format(fmt)
    dtype = fmt.dtype
    act_id = activation_id(act)
    d_ff, d = w_up.shape
    if w_down.shape != (d, d_ff):
        raise ValueError(f"w_down must be [{d}, {d_ff}], got {list(w_down.shape)}")
    if w_gate is not None and w_gate.shape != (d_ff, d):
        raise ValueError(f"w_gate must be [{d_ff}, {d}], got {list(w_gate.shape)}")
    if w_gate is None and b_gate is not None:
        raise ValueError("b_gate given without w_gate")
    up = _weight(w_up, dtype)
    if w_gate is not None:
        w_in = torch.stack((_weight(w_gate, dtype), up), dim=1).contiguous()
    else:
        w_in = up.unsqueeze(1).contiguous()
    w_down_t = _weight(w_down, dtype).t().contiguous()
    b_in = None
    if b_up is not None or b_gate is not None:
        b_in = torch.zeros(d_ff, w_in.shape[1], dtype=torch.float32)
        if b_up is not None:
            b_in[:, -1] = _bias(b_up, d_ff, "b_up")
        if b_gate is not None:
            b_in[:, 0] = _bias(b_gate, d_ff, "b_gate")
    return PackedMLP(w_in=w_in, w_down_t=w_down_t, b_in=b_in,
                     b_down=_bias(b_down, d, "b_down"), act=act, act_id=act_id, fmt=fmt)


@dataclass(eq=False)
class PackedLinear:
    """A linear layer laid out for :func:`moyu.kernels.input_sparse_linear`.

    Attributes:
        wt: ``[in, out]`` transposed weight (input channel j's column is row j).
        b: ``[out]`` float32 bias, or None.
        fmt: the weight's storage format.
    """

    wt: Tensor
    b: Tensor | None = None
    fmt: WeightFormat = weight_format("fp32")

    @property
    def in_features(self) -> int:
        """Input width."""
        return self.wt.shape[0]

    @property
    def out_features(self) -> int:
        """Output width."""
        return self.wt.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the weight and bias."""
        return self.wt.nbytes + (0 if self.b is None else self.b.nbytes)


def pack_linear(w: Tensor, b: Tensor | None = None,
                fmt: "str | WeightFormat" = "fp32") -> PackedLinear:
    """Packs an ``nn.Linear`` weight ``[out, in]`` (and optional bias) as ``W^T``."""
    fmt = _float_format(fmt)
    if w.dim() != 2:
        raise ValueError(f"w must be [out, in], got {list(w.shape)}")
    return PackedLinear(wt=_weight(w, fmt.dtype).t().contiguous(), b=_bias(b, w.shape[0], "b"), fmt=fmt)
