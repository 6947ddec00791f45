"""Weight formats: how a packed matrix stores its weights, and what that costs to read.

A :class:`WeightFormat` travels with every packed tensor (:class:`~moyu.kernels.PackedMLP`,
:class:`~moyu.kernels.PackedLinear`), so the kernels dispatch once on it and byte counts
(memory held, bytes read per token) are derived from it instead of being spelled out per
layout. Activations are always float32; only the stored weights change.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MoyuError


@dataclass(frozen=True)
class WeightFormat:
    """One storage format for weight matrices.

    Attributes:
        name: the user-facing name (``--weights NAME``).
        dtype: torch storage dtype of float formats; None for block-quantized formats.
        bits: stored bits per weight, scales and offsets included.
        block: weights per quantization block along a row (0: not block-quantized).
    """

    name: str
    dtype: torch.dtype | None
    bits: float
    block: int = 0

    @property
    def quantized(self) -> bool:
        """True for block-quantized integer formats."""
        return self.dtype is None

    def for_role(self, role: str) -> "WeightFormat":
        """The format a matrix of this ``role`` is actually stored in under this format.

        ``int4`` keeps the MLP ``down`` projection and the ``head`` (the lm_head, and the
        embedding when tied) in ``int8``: 4-bit codes there cost most of int4's quality
        loss (the GGUF files keep the output matrix at 8 bits too, and our down rows are
        blocked along the other axis than GGUF's). Every other role keeps the format.
        """
        if self.name == "int4" and role in ("down", "head"):
            return INT8
        return self

    def __str__(self) -> str:
        return self.name


FP32 = WeightFormat("fp32", torch.float32, 32.0)
BF16 = WeightFormat("bf16", torch.bfloat16, 16.0)
INT8 = WeightFormat("int8", None, 34 * 8 / 32, 32)   # GGUF Q8_0 blocks: 32 codes + an fp16 scale
INT4 = WeightFormat("int4", None, 20 * 8 / 32, 32)   # GGUF Q4_1 blocks: 32 nibbles + fp16 scale and min

FORMATS: dict[str, WeightFormat] = {f.name: f for f in (FP32, BF16, INT8, INT4)}
"""Every format the runtime can hold weights in, by name."""

_ALIASES = {"float32": "fp32", "bfloat16": "bf16"}


def weight_format(spec: "str | torch.dtype | WeightFormat") -> WeightFormat:
    """The :class:`WeightFormat` named by ``spec`` (a name, a torch dtype or a format).

    Unknown names raise a one-line :class:`MoyuError` listing the formats.
    """
    if isinstance(spec, WeightFormat):
        return spec
    if isinstance(spec, torch.dtype):
        for f in FORMATS.values():
            if f.dtype == spec:
                return f
        raise MoyuError(f"unsupported weight dtype {spec}: use one of {', '.join(FORMATS)}")
    name = _ALIASES.get(str(spec).lower(), str(spec).lower())
    if name not in FORMATS:
        raise MoyuError(f"unknown weight format '{spec}': use one of {', '.join(FORMATS)}")
    return FORMATS[name]
