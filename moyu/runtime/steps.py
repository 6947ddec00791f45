"""Pluggable MLP and linear steps of the lean runtime.

The runtime never computes an MLP or an attention projection itself: it asks an
``mlp_factory(layer) -> MLPStep`` and a ``linear_factory(layer_index, role, weight, bias)
-> callable`` for them once, at conversion time. Sparse methods plug in by passing their
own factories; the defaults here are dense.
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..arch import MLPLayer
from ..errors import MoyuError

try:  # the kernels package is optional: without it the steps fall back to F.linear
    from .. import kernels as _kernels
except ImportError:  # pragma: no cover - exercised only where kernels are absent
    _kernels = None

WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


@runtime_checkable
class MLPStep(Protocol):
    """One layer's MLP as the runtime calls it.

    ``prefill`` gets the normed MLP input of every prompt position ``[T, d]`` and must
    return the dense MLP output ``[T, d]`` (sequence-level methods record prompt
    statistics here and may slice their weights once). ``decode`` gets one position
    ``[d]`` (float32, contiguous) and returns ``[d]``; it sets ``kept`` to the number
    of neurons it computed.
    """

    kept: int

    def prefill(self, x: Tensor) -> Tensor: ...

    def decode(self, x: Tensor) -> Tensor: ...


MLPFactory = Callable[[MLPLayer], MLPStep]
LinearStep = Callable[[Tensor], Tensor]
LinearFactory = Callable[[int, str, Tensor, "Tensor | None"], LinearStep]


def check_dtype(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` if the runtime can hold weights in it; one-line MoyuError otherwise."""
    if dtype not in WEIGHT_DTYPES:
        raise MoyuError(f"unsupported runtime dtype {dtype}: use torch.float32 or torch.bfloat16")
    return dtype


def activation_kind(act: nn.Module | Callable) -> str:
    """The kernels' name (``silu``, ``gelu``, ``gelu_tanh``, ``relu``) of an HF activation module."""
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


def activation_fn(kind: str) -> Callable[[Tensor], Tensor]:
    """The torch function for an activation kind."""
    return {"silu": F.silu, "gelu": F.gelu, "relu": F.relu,
            "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[kind]


def pack_layer(layer: MLPLayer, dtype: torch.dtype = torch.float32):
    """The layer's MLP packed for the kernels (``moyu.kernels.pack_mlp``)."""
    if _kernels is None:
        raise MoyuError("moyu.kernels is not importable: the packed MLP layout needs it")
    return _kernels.pack_mlp(layer.w_up, layer.w_down, activation_kind(layer.act),
                             w_gate=layer.w_gate, b_up=layer.b_up, b_gate=layer.b_gate,
                             b_down=layer.b_down, dtype=dtype)


def packed_mlp_matmul(x: Tensor, packed) -> Tensor:
    """Dense MLP of many rows ``[T, d]`` as two GEMMs over a ``PackedMLP``'s own storage.

    ``w_in`` viewed as ``[r * d_ff, d]`` is an ordinary linear whose outputs interleave
    gate and up per neuron, so prefill needs no second copy of the weights.
    """
    w_in = packed.w_in.reshape(-1, packed.d)
    w_dt = packed.w_down_t
    if w_in.dtype != torch.float32:  # bf16 GEMM has no fast path on CPUs without bf16
        w_in, w_dt = w_in.float(), w_dt.float()
    h = F.linear(x, w_in).view(x.shape[0], packed.d_ff, -1)
    if packed.b_in is not None:
        h = h + packed.b_in
    act = activation_fn(packed.act)
    a = act(h[..., 0]) * h[..., 1] if packed.gated else act(h[..., 0])
    y = a @ w_dt
    return y if packed.b_down is None else y + packed.b_down


class DenseMLPStep:
    """The default MLP step: the kernels' dense path at decode, two GEMMs at prefill."""

    def __init__(self, layer: MLPLayer, dtype: torch.dtype = torch.float32):
        self.packed = pack_layer(layer, dtype)
        self.kept = self.packed.d_ff
        self._out = torch.empty(self.packed.d)

    def prefill(self, x: Tensor) -> Tensor:
        """Dense MLP over the prompt, ``[T, d] -> [T, d]``."""
        return packed_mlp_matmul(x, self.packed)

    def decode(self, x: Tensor) -> Tensor:
        """Dense MLP of one position, ``[d] -> [d]`` (output buffer reused)."""
        return _kernels.sparse_mlp(x, self.packed, None, self._out)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weights."""
        return self.packed.nbytes


class TorchMLPStep:
    """Dense MLP with ``F.linear`` on the ``[out, in]`` weights (no kernels needed)."""

    def __init__(self, layer: MLPLayer, dtype: torch.dtype = torch.float32):
        conv = lambda t: None if t is None else t.detach().to(dtype).contiguous()
        self.w_up, self.w_down, self.w_gate = conv(layer.w_up), conv(layer.w_down), conv(layer.w_gate)
        bias = lambda t: None if t is None else t.detach().float()
        self.b_up, self.b_gate, self.b_down = bias(layer.b_up), bias(layer.b_gate), bias(layer.b_down)
        self.act = activation_fn(activation_kind(layer.act))
        self.kept = self.w_up.shape[0]

    def _run(self, x: Tensor) -> Tensor:
        xd = x.to(self.w_up.dtype)
        u = F.linear(xd, self.w_up).float()
        if self.b_up is not None:
            u = u + self.b_up
        if self.w_gate is None:
            a = self.act(u)
        else:
            g = F.linear(xd, self.w_gate).float()
            a = self.act(g if self.b_gate is None else g + self.b_gate) * u
        y = F.linear(a.to(self.w_down.dtype), self.w_down).float()
        return y if self.b_down is None else y + self.b_down

    def prefill(self, x: Tensor) -> Tensor:
        """Dense MLP over the prompt."""
        return self._run(x)

    def decode(self, x: Tensor) -> Tensor:
        """Dense MLP of one position."""
        return self._run(x)

    @property
    def nbytes(self) -> int:
        """Bytes of the weights held."""
        ts = (self.w_up, self.w_down, self.w_gate, self.b_up, self.b_gate, self.b_down)
        return sum(t.nbytes for t in ts if t is not None)


def dense_mlp_factory(dtype: torch.dtype = torch.float32) -> MLPFactory:
    """Factory of :class:`DenseMLPStep` (or :class:`TorchMLPStep` without the kernels)."""
    cls = DenseMLPStep if _kernels is not None else TorchMLPStep
    return lambda layer: cls(layer, dtype)


class DenseLinear:
    """``y = W x + b`` for the attention projections and the lm_head; float32 in and out.

    With the kernels, the weight is packed as ``W^T`` and a single position goes through
    ``input_sparse_linear`` with every channel: measured 2-4x faster than MKL's
    ``F.linear`` gemv here, in fp32 and bf16. Prompts (2-D ``x``) use one fp32 GEMM.
    Without the kernels, ``F.linear`` on the ``[out, in]`` weight.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, dtype: torch.dtype = torch.float32):
        w = weight.detach()
        self.bias = None if bias is None else bias.detach().float()
        self.packed = None
        self.weight = None
        if _kernels is not None:
            self.packed = _kernels.pack_linear(w, self.bias, dtype)
        else:
            self.weight = w if w.dtype == dtype and w.is_contiguous() else w.to(dtype).contiguous()
        self.out_features = w.shape[0]

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed is not None:
            if x.dim() == 1:
                return _kernels.input_sparse_linear(x, self.packed)
            y = x @ self.packed.wt.float()
            return y if self.bias is None else y + self.bias
        if self.weight.dtype != torch.float32:
            y = F.linear(x.to(self.weight.dtype), self.weight).float()
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.weight, self.bias)

    def rows(self, ids: Tensor) -> Tensor:
        """Rows ``W[ids]`` as float32 (the embedding lookup of a tied lm_head)."""
        if self.packed is not None:
            return self.packed.wt[:, ids].t().float()
        return F.embedding(ids, self.weight).float()

    @property
    def nbytes(self) -> int:
        """Bytes of the weight and bias."""
        w = self.packed.nbytes if self.packed is not None else self.weight.nbytes
        return w + (0 if self.bias is None or self.packed is not None else self.bias.nbytes)


def dense_linear_factory(dtype: torch.dtype = torch.float32) -> LinearFactory:
    """Factory of :class:`DenseLinear` (signature of ``linear_factory``)."""
    return lambda index, role, weight, bias: DenseLinear(weight, bias, dtype)
