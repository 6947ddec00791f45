"""Token-level neuron methods: oracle top-k, CATS gate thresholds, CETT budgets, ReLU swap."""
from __future__ import annotations

import torch

from ..arch import MLPLayer
from .base import LayerInputs, NeuronRule
from .calib import quantile


def down_norms(ml: MLPLayer) -> torch.Tensor:
    """||W_down[:, i]||_2 per neuron: what one unit of activation i adds to the output."""
    return ml.down_norms()


class TopKRule(NeuronRule):
    """Oracle: per token, the k neurons with the largest contribution (needs the full ``a``)."""

    def __init__(self, ml: MLPLayer, k: int, by: str = "contrib"):
        super().__init__(ml)
        self.k = k
        self.weight = down_norms(ml) if by == "contrib" else None
        self.full_reads = 1.0  # computes everything, then drops: a quality ceiling, not a speed-up

    def mask(self, a: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        score = a.abs() if self.weight is None else a.abs() * self.weight.to(a.dtype)
        keep = torch.zeros_like(a, dtype=torch.bool)
        if self.k > 0:
            keep.scatter_(-1, score.topk(self.k, dim=-1).indices, True)
        return keep


class GateThresholdRule(NeuronRule):
    """CATS: keep neuron i when |act(gate_i . x)| > tau (plain MLPs: |a_i| > tau)."""

    def __init__(self, ml: MLPLayer, tau: float):
        super().__init__(ml)
        self.tau = float(tau)
        self.needs = frozenset({"g"}) if ml.gated else frozenset()
        self.full_reads = 1 / 3 if ml.gated else 1 / 2   # the gate (or fc1) is read for every token

    def score(self, a: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        """The thresholded quantity."""
        return self.ml.act(inp.g).abs() if self.ml.gated else a.abs()

    def mask(self, a: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        return self.score(a, inp) > self.tau


class ReluRule(NeuronRule):
    """ReLU swap: a_i = relu(g_i) * u_i (plain: relu(fc1 x)), optionally thresholded at tau >= 0."""

    def __init__(self, ml: MLPLayer, tau: float = 0.0):
        super().__init__(ml)
        self.tau = max(float(tau), 0.0)
        self.needs = frozenset({"g", "u"}) if ml.gated else frozenset({"u"})
        self.full_reads = 1 / 3 if ml.gated else 1 / 2

    def mask(self, a: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        pre = inp.g if self.ml.gated else inp.u
        return pre > self.tau

    def apply(self, a: torch.Tensor, keep: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        pre = inp.g if self.ml.gated else inp.u
        relu = torch.relu(pre) * keep.to(pre.dtype)
        return relu * inp.u if self.ml.gated else relu


def cett_of_mask(a: torch.Tensor, keep: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """Per token CETT = ||sum of dropped contributions|| / ||full MLP output|| (no bias)."""
    full = a @ w_down.t()
    dropped = (a * (~keep).to(a.dtype)) @ w_down.t()
    return dropped.norm(dim=-1) / full.norm(dim=-1).clamp_min(1e-12)


def tau_for_cett(ml: MLPLayer, a: torch.Tensor, score: torch.Tensor, target: float,
                 iters: int = 14) -> tuple[float, float]:
    """Largest threshold on ``score`` whose mean CETT on the samples stays <= ``target``.

    Returns ``(tau, sparsity)``; bisection over the quantile of ``score``.
    """
    w = ml.w_down.detach().float()
    lo, hi = 0.0, 0.999
    best_tau, best_q = 0.0, 0.0
    for _ in range(iters):
        q = (lo + hi) / 2
        tau = quantile(score, q)
        cett = float(cett_of_mask(a, score > tau, w).mean())
        if cett <= target:
            lo, best_tau, best_q = q, tau, q
        else:
            hi = q
    return best_tau, best_q
