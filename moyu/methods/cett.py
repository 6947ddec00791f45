"""``cett``: CATS' threshold chosen by error (CETT, the share of the MLP output that the
dropped neurons carry) instead of by a quantile.

With ``--cett B`` every layer drops neurons while CETT <= B; with ``--sparsity S`` one
shared CETT level is found so the average sparsity is S (error-equalised allocation).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch import MLPLayer
from . import calib as C
from .calib import quantile
from .cats import GateThresholdRule, gate_rule
from .method import Method, register
from .options import CalibOptions, per_window_field


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


@dataclass(frozen=True)
class CettOptions(CalibOptions):
    per_window: int = per_window_field(32)


class Cett(Method):
    rule_type = GateThresholdRule
    name = "cett"
    summary = ("per token, CATS-style threshold (|act(gate)|, or |a| for plain MLPs); with --cett B "
               "every layer drops CETT <= B, with --sparsity S one shared CETT level is found so the "
               "average sparsity is S (error-equalised allocation across layers)")
    streams = {"a", "g"}
    Options = CettOptions

    def _score(self, ml: MLPLayer, samples: C.CalibSamples) -> tuple[torch.Tensor, torch.Tensor]:
        a = samples.cat("a", ml.index)
        return a, (ml.act(samples.cat("g", ml.index)).abs() if ml.gated else a.abs())

    def fit(self, prof, layers, samples, target, opts):
        if "cett" in target:
            return super().fit(prof, layers, samples, target, opts)
        s = target["sparsity"]
        if s == 0:
            for ml in layers:
                prof.set_layer(ml.index, "tau", torch.tensor(-1.0))
            return [0.0] * len(layers)
        grid = [i / 40 for i in range(1, 40)]
        curves = []   # per layer: mean CETT at each sparsity of the grid
        for ml in layers:
            a, score = self._score(ml, samples)
            w = ml.w_down.detach().float()
            taus = [C.quantile(score, q) for q in grid]
            curves.append((taus, [float(cett_of_mask(a, score > t, w).mean()) for t in taus]))

        def allocate(level: float) -> list[int]:
            return [max([j for j, c in enumerate(cs) if c <= level], default=-1) for _, cs in curves]

        lo, hi = 0.0, 1.0
        for _ in range(40):  # bisection on the shared CETT level
            mid = (lo + hi) / 2
            got = sum(grid[j] if j >= 0 else 0.0 for j in allocate(mid)) / len(layers)
            lo, hi = (mid, hi) if got < s else (lo, mid)
        out = []
        for ml, j, (taus, _) in zip(layers, allocate(hi), curves):
            prof.set_layer(ml.index, "tau", torch.tensor(taus[j] if j >= 0 else -1.0))
            out.append(grid[j] if j >= 0 else 0.0)
        return out

    def fit_layer(self, prof, ml, samples, target, opts):
        a, score = self._score(ml, samples)
        budget = target["cett"]
        tau, q = tau_for_cett(ml, a, score, budget) if budget > 0 else (-1.0, 0.0)
        prof.set_layer(ml.index, "tau", torch.tensor(tau))
        return q

    def neuron_rule(self, prof, ml):
        return gate_rule(prof, ml)


register(Cett())
