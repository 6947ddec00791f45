"""``cats``: per token, keep neurons whose gate activation ``|act(gate_i . x)|`` exceeds a
per-layer threshold (CATS); the threshold is the calibration quantile at the target."""
from __future__ import annotations

import torch

from . import calib as C
from .base import LayerInputs, NeuronRule, act_kind
from .method import Method, register


class GateThresholdRule(NeuronRule):
    """Keep neuron i when ``|act(g_i)| > tau`` (gated MLPs) or ``|a_i| > tau`` (plain MLPs).

    Parameters: ``tau``, ``gated``, ``act`` (the activation's kernel name).
    """

    def __init__(self, tau: float, gated: bool, act: str):
        from ..kernels.packing import ACTIVATION_FNS, activation_id
        self.tau = float(tau)
        self.gated = bool(gated)
        self.act = act
        self._act = ACTIVATION_FNS[activation_id(act)]
        self.needs = frozenset({"g"}) if gated else frozenset()
        self.full_reads = 1 / 3 if gated else 1 / 2   # the gate (or fc1) is read for every token

    def score(self, a: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        """The thresholded quantity."""
        return self._act(inp.g).abs() if self.gated else a.abs()

    def mask(self, a: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        return self.score(a, inp) > self.tau


def gate_rule(prof, ml) -> GateThresholdRule | None:
    """The layer's :class:`GateThresholdRule` from the profile's ``tau`` (None: dense layer)."""
    tau = float(prof.layer(ml.index, "tau"))
    return None if tau < 0 else GateThresholdRule(tau, ml.gated, act_kind(ml))


class Cats(Method):
    rule_type = GateThresholdRule
    name, needs_gate = "cats", True
    summary = "per token, keep |act(gate . x)| > tau_l; tau_l from calibration quantiles"
    streams = {"g"}

    def fit_layer(self, prof, ml, samples, target, opts):
        s = target["sparsity"]
        score = ml.act(samples.cat("g", ml.index)).abs()
        tau = C.quantile(score, s) if s > 0 else -1.0
        prof.set_layer(ml.index, "tau", torch.tensor(tau))
        return float((score <= tau).float().mean())

    def neuron_rule(self, prof, ml):
        return gate_rule(prof, ml)


register(Cats())
