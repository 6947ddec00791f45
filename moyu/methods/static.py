"""``static``: one calibrated neuron set per layer, the same for every token and sequence.

The top-k neurons by mean contribution ``mean |a_i| * ||W_down[:, i]||`` on calibration
text: the floor every dynamic method must beat, and the direct test of activation
inertia (a set fixed in advance instead of from the prompt).
"""
from __future__ import annotations

import torch

from .base import LayerInputs, NeuronRule, down_norms
from .method import Method, keep_count, register


class StaticRule(NeuronRule):
    """Keep the fixed set ``keep`` (bool [d_ff]) at every position.

    Decode: a fixed index set; the runtime can slice the weights once.
    """

    def __init__(self, keep: torch.Tensor):
        self.keep = keep.bool()

    def mask(self, a: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        return self.keep.expand(a.shape)


class Static(Method):
    rule_type = StaticRule
    name = "static"
    summary = "one calibrated neuron set per layer (top-k by mean contribution on calibration text), for every token"
    streams = {"a"}

    def fit_layer(self, prof, ml, samples, target, opts):
        s = target["sparsity"]
        contrib = samples.cat("a", ml.index).abs().mean(0) * down_norms(ml)
        keep = torch.zeros(ml.d_ff, dtype=torch.bool)
        k = keep_count(ml, s)
        if k > 0:
            keep[contrib.topk(k).indices] = True
        prof.set_layer(ml.index, "keep", keep)
        return 1.0 - k / ml.d_ff

    def neuron_rule(self, prof, ml):
        keep = prof.layer(ml.index, "keep").bool()
        return None if bool(keep.all()) else StaticRule(keep)


register(Static())
