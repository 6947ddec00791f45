"""``oracle``: per token, the top-k neurons by their true contribution (a quality ceiling).

It computes every neuron to choose, so it has no speed path: the runtime refuses it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from .base import LayerInputs, NeuronRule, down_norms
from .method import Method, keep_count, register
from .options import CalibOptions


class TopKRule(NeuronRule):
    """Per token, the ``k`` neurons with the largest ``|a_i| * weight_i`` (needs the full ``a``).

    ``weight``: ``||W_down[:, i]||`` (``by="contrib"``) or None (``by="act"``: ``|a_i|``).
    """

    full_reads = 1.0  # computes everything, then drops: a quality ceiling, not a speed-up

    def __init__(self, k: int, weight: torch.Tensor | None = None):
        self.k = int(k)
        self.weight = weight

    def mask(self, a: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        score = a.abs() if self.weight is None else a.abs() * self.weight.to(a.dtype)
        keep = torch.zeros_like(a, dtype=torch.bool)
        if self.k > 0:
            keep.scatter_(-1, score.topk(self.k, dim=-1).indices, True)
        return keep


@dataclass(frozen=True)
class OracleOptions(CalibOptions):
    by: Literal["contrib", "act"] = field(default="contrib", metadata={
        "help": "rank by |a_i| * ||W_down[:, i]|| (contrib) or by |a_i| (act)"})


class Oracle(Method):
    rule_type = TopKRule
    name = "oracle"
    summary = "per token, top-k of |a_i| * ||W_down[:, i]|| from the full activation: quality ceiling, no speed"
    Options = OracleOptions

    def neuron_rule(self, prof, ml):
        s = prof.target.get("sparsity", 0.0)
        if s == 0:
            return None
        return TopKRule(keep_count(ml, s), down_norms(ml) if prof.params["by"] == "contrib" else None)


register(Oracle())
