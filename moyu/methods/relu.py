"""``relu``: swap the activation for ReLU at sparse positions (no training); a threshold
tau >= 0 on the pre-activation raises sparsity past ReLU's natural level."""
from __future__ import annotations

import torch

from . import calib as C
from .base import LayerInputs, NeuronRule
from .method import Method, register


class ReluRule(NeuronRule):
    """``a_i = relu(g_i) * u_i`` (plain MLPs: ``relu(fc1 . x)``), kept where the pre-activation > tau.

    Parameters: ``tau`` (>= 0) and ``gated``.
    """

    def __init__(self, tau: float, gated: bool):
        self.tau = max(float(tau), 0.0)
        self.gated = bool(gated)
        self.needs = frozenset({"g", "u"}) if gated else frozenset({"u"})
        self.full_reads = 1 / 3 if gated else 1 / 2

    def mask(self, a: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        pre = inp.g if self.gated else inp.u
        return pre > self.tau

    def apply(self, a: torch.Tensor, keep: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        pre = inp.g if self.gated else inp.u
        relu = torch.relu(pre) * keep.to(pre.dtype)
        return relu * inp.u if self.gated else relu


class Relu(Method):
    rule_type = ReluRule
    name = "relu"
    summary = ("swap the activation for ReLU at sparse positions (no training); thresholds >= 0 "
               "raise sparsity past ReLU's natural level")
    streams = {"g", "u"}

    def fit_layer(self, prof, ml, samples, target, opts):
        s = target["sparsity"]
        pre = samples.cat("g" if ml.gated else "u", ml.index)
        tau = max(C.quantile(pre, s), 0.0) if s > 0 else -1.0
        prof.set_layer(ml.index, "tau", torch.tensor(tau))
        return float((pre <= max(tau, 0.0)).float().mean()) if s > 0 else 0.0

    def neuron_rule(self, prof, ml):
        tau = float(prof.layer(ml.index, "tau"))
        return None if tau < 0 else ReluRule(tau, ml.gated)


register(Relu())
