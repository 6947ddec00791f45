"""``griffin``: per sequence, the top-k neurons of the prompt's flocking statistic, fixed
for the whole generation (GRIFFIN).

The statistic: Z = |a| over prompt tokens, each row scaled to unit L2; s_i = ||Z[:, i]||_2.
"""
from __future__ import annotations

import torch

from .base import LayerInputs, NeuronRule
from .method import Method, keep_count, register


def griffin_stat(a_prompt: torch.Tensor) -> torch.Tensor:
    """GRIFFIN's flocking statistic over prompt activations [B, P, d_ff] -> [B, d_ff]."""
    z = a_prompt.float().abs()
    z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return z.norm(dim=-2)


class PromptTopKRule(NeuronRule):
    """Per sequence: keep the ``k`` neurons with the largest GRIFFIN statistic of the prompt.

    Decode: the set is chosen once from the prompt's activations ``a`` (``choose``), then
    every later token uses it.
    """

    sequence = True

    def __init__(self, k: int):
        self.k = int(k)

    def stat(self, a_prompt: torch.Tensor) -> torch.Tensor:
        """The per-neuron prompt statistic [B, d_ff]."""
        return griffin_stat(a_prompt)

    def choose(self, a_prompt: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        s = self.stat(a_prompt)
        keep = torch.zeros_like(s, dtype=torch.bool)
        if self.k > 0:
            keep.scatter_(-1, s.topk(min(self.k, s.shape[-1]), dim=-1).indices, True)
        return keep


class Griffin(Method):
    rule_type = PromptTopKRule
    name, granularity = "griffin", "sequence"
    summary = "per sequence, top-k of the prompt's row-normalised activation norms, fixed for generation"

    def neuron_rule(self, prof, ml):
        s = prof.target.get("sparsity", 0.0)
        return None if s == 0 else PromptTopKRule(keep_count(ml, s))


register(Griffin())
