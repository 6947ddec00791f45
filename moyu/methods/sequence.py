"""Sequence-level methods: the prompt's activations choose one neuron set for generation.

All use a prompt statistic per neuron (the "first activations" of the sequence):

* ``griffin``: Z = |a| over prompt tokens, each row scaled to unit L2; s_i = ||Z[:, i]||_2;
  keep the top-k of s (k fixed per layer).
* ``tda`` (the seed line of work): the same statistic normalised by its maximum,
  R_i = s_i / max s, and keep R_i > theta_l with theta_l calibrated per layer so that
  the layer's *average* sparsity on calibration prompts hits the target: the kept set
  size adapts to the prompt.
"""
from __future__ import annotations

import torch

from ..arch import MLPLayer
from .base import LayerInputs, NeuronRule


def griffin_stat(a_prompt: torch.Tensor) -> torch.Tensor:
    """GRIFFIN's flocking statistic over prompt activations [B, P, d_ff] -> [B, d_ff]."""
    z = a_prompt.float().abs()
    z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return z.norm(dim=-2)


class PromptTopKRule(NeuronRule):
    """Keep a fixed number of neurons: the top-k of a prompt statistic."""

    sequence = True

    def __init__(self, ml: MLPLayer, k: int, weight: torch.Tensor | None = None):
        super().__init__(ml)
        self.k = int(k)
        self.weight = weight   # optional per-neuron factor on the statistic

    def stat(self, a_prompt: torch.Tensor) -> torch.Tensor:
        """The per-neuron prompt statistic [B, d_ff]."""
        s = griffin_stat(a_prompt)
        return s if self.weight is None else s * self.weight

    def choose(self, a_prompt: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        s = self.stat(a_prompt)
        keep = torch.zeros_like(s, dtype=torch.bool)
        if self.k > 0:
            keep.scatter_(-1, s.topk(min(self.k, s.shape[-1]), dim=-1).indices, True)
        return keep


class PromptThresholdRule(PromptTopKRule):
    """TDA: keep neurons whose max-normalised prompt statistic exceeds theta."""

    def __init__(self, ml: MLPLayer, theta: float, weight: torch.Tensor | None = None):
        super().__init__(ml, k=0, weight=weight)
        self.theta = float(theta)

    def choose(self, a_prompt: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        s = self.stat(a_prompt)
        r = s / s.amax(dim=-1, keepdim=True).clamp_min(1e-12)
        return r > self.theta
