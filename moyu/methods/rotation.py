"""WINA's orthogonal transform (microsoft/wina ``utils/tensor_transform.py``), as a change
of input coordinates at the projections it applies to.

The reference folds each RMSNorm's weight ``g`` into the linears after it, then rotates
the residual stream of every layer by ``Q = V`` from the SVD ``W_fused = U S V^T`` of
``W_k * g`` (attention input; fused qkv on Phi) and of ``W_gate * g`` (MLP input; fused
gate_up), with shortcut rotations between them. In the rotated basis the key projection's
weight ``W_fused Q = U S`` has orthogonal columns, which WINA's error bound assumes.

moyu computes exactly what the folded model computes at those linears, without rewriting
the model: the linear's input ``y = g * z + b`` (``z`` the normalised residual) is mapped to
``z' = Q^T z``, channels of ``z'`` are scored and masked, and ``g * (Q z'_kept) + b`` goes
into the unchanged linear, i.e. ``(W diag(g) Q) z'_kept + W b``: the folded linear on
the kept rotated channels. With every channel kept this is the identity (up to float
rounding), so at sparsity 0 the model is dense. Deviation from the reference: the rotation
is applied where the linear reads its input instead of being folded into the embedding,
the shortcut and the output projections, so the lean runtime has no decode path for it.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from ..arch import MLPLayer
from .base import projection_weight

# the norm module right before each group's projections, by the names the families use
ATTN_NORMS = ("input_layernorm", "ln_1", "self_attn_layer_norm")
MLP_NORMS = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2", "final_layer_norm")
# which projection's weight defines each group's rotation (as in the reference), by role
GROUPS = {"attn": (("q", "k", "v", "qkv"), ("k", "qkv")),
          "mlp": (("gate", "up", "gate_up"), ("gate", "gate_up", "up"))}


class Rotation:
    """``y -> z' = Q^T ((y - b) / g)`` and back, in float32 (row vectors: ``z' = z Q``)."""

    def __init__(self, q: torch.Tensor, g: torch.Tensor, b: torch.Tensor):
        self.q, self.g, self.b = q.float(), g.float(), b.float()
        self.g_safe = torch.where(self.g == 0, torch.ones_like(self.g), self.g)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """Rotated coordinates of a linear's input ``y`` (last dimension: channels)."""
        return ((y.float() - self.b) / self.g_safe) @ self.q

    def back(self, z: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The linear's input from (masked) rotated coordinates."""
        return ((z @ self.q.T) * self.g + self.b).to(dtype)


def norm_affine(norm: nn.Module | None, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g, b)`` of a norm's output ``g * z + b`` (Gemma's RMSNorm scales by ``1 + weight``)."""
    if norm is None:
        return torch.ones(d), torch.zeros(d)
    w = getattr(norm, "weight", None)
    g = torch.ones(d) if w is None else w.detach().float().clone()
    if w is not None and "gemma" in type(norm).__name__.lower():
        g = 1.0 + g
    bias = getattr(norm, "bias", None)
    b = torch.zeros(d) if not isinstance(bias, torch.Tensor) else bias.detach().float().clone()
    return g, b


def _norm(ml: MLPLayer, names: tuple[str, ...]) -> nn.Module | None:
    return next((getattr(ml.layer, n) for n in names if isinstance(getattr(ml.layer, n, None), nn.Module)), None)


_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def rotations(ml: MLPLayer, roles: list[str]) -> tuple[dict[str, Rotation], dict[str, torch.Tensor]]:
    """Per projection role, its group's rotation, and the column norms of the folded and
    rotated weight ``W diag(g) Q`` (WINA's scale in the rotated basis) for every role.

    Computed offline from the weights (an SVD per group) and cached per layer until a
    weight changes."""
    stamp = (tuple(roles), tuple((p.data_ptr(), p._version) for p in ml.layer.parameters()))
    hit = _CACHE.get(ml.layer)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    out = _rotations(ml, roles)
    _CACHE[ml.layer] = (stamp, out)
    return out


def _rotations(ml: MLPLayer, roles: list[str]) -> tuple[dict[str, Rotation], dict[str, torch.Tensor]]:
    rot: dict[str, Rotation] = {}
    norms: dict[str, torch.Tensor] = {}
    for group, (members, keys) in GROUPS.items():
        present = [r for r in members if r in roles]
        key = next((k for k in keys if k in present), None)
        if key is None:
            continue
        w_key = projection_weight(ml, key)
        g, b = norm_affine(_norm(ml, ATTN_NORMS if group == "attn" else MLP_NORMS), w_key.shape[1])
        vh = torch.linalg.svd(w_key.double() * g.double()[None], full_matrices=True).Vh
        r_ = Rotation(vh.T, g, b)
        for r in present:
            rot[r] = r_
            norms[r] = ((projection_weight(ml, r).double() * g.double()[None]) @ vh.T).norm(dim=0).float()
    return rot, norms
