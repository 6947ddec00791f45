"""Input-sparsity methods (TEAL, WINA): zero small input channels of every linear.

Groups of linears that share an input share a threshold: ``attn`` (q/k/v), ``o``,
``mlp`` (gate/up) and ``down``. Uniform allocation gives every group the target
sparsity; greedy allocation (TEAL's) moves sparsity between a layer's groups, a step at
a time, to where it costs the least relative output error per weight skipped, keeping
the layer's weight-averaged sparsity on target.
"""
from __future__ import annotations

import torch

from ..arch import MLPLayer
from .base import InputRule
from .calib import quantile

GROUP_STREAM = {"attn": "xa", "o": "xo", "mlp": "x", "down": "a"}


def group_weights(ml: MLPLayer) -> dict[str, torch.Tensor]:
    """Each group's linears stacked as one [out, in] matrix (nn.Linear layout)."""
    rule = InputRule(ml, {})
    out = {}
    for g, mods in rule.groups().items():
        ws = [m.weight.detach().float().t() if ml.spec.conv1d else m.weight.detach().float() for m in mods]
        out[g] = torch.cat(ws, 0)
    return out


def column_norms(ml: MLPLayer) -> dict[str, torch.Tensor]:
    """WINA's per-input-channel factor ||W[:, j]||_2 for each group."""
    return {g: w.norm(dim=0) for g, w in group_weights(ml).items()}


def _scores(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return x.abs() if scale is None else x.abs() * scale


def uniform_thresholds(samples: dict[str, torch.Tensor], sparsity: float,
                       scales: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Per group: the ``sparsity``-quantile of the (scaled) input magnitudes."""
    scales = scales or {}
    return {g: (quantile(_scores(x, scales.get(g)), sparsity) if sparsity > 0 else -1.0)
            for g, x in samples.items()}


def _rel_error(x: torch.Tensor, w: torch.Tensor, score: torch.Tensor, tau: float) -> float:
    full = x @ w.t()
    kept = (x * (score > tau).to(x.dtype)) @ w.t()
    return float(((full - kept).norm(dim=-1) / full.norm(dim=-1).clamp_min(1e-12)).mean())


def greedy_thresholds(ml: MLPLayer, samples: dict[str, torch.Tensor], sparsity: float,
                      scales: dict[str, torch.Tensor] | None = None, step: float = 0.05
                      ) -> tuple[dict[str, float], dict[str, float]]:
    """TEAL-style greedy allocation inside one layer; returns (thresholds, per-group sparsity)."""
    scales = scales or {}
    weights = group_weights(ml)
    size = {g: w.numel() for g, w in weights.items()}
    total = sum(size.values())
    level = {g: 0.0 for g in samples}
    scores = {g: _scores(samples[g], scales.get(g)) for g in samples}
    err = {g: 0.0 for g in samples}
    memo: dict[tuple[str, float], float] = {}

    def error_at(g: str, s: float) -> float:
        if (g, s) not in memo:
            memo[g, s] = _rel_error(samples[g], weights[g], scores[g], quantile(scores[g], s))
        return memo[g, s]

    while sum(level[g] * size[g] for g in level) / total < sparsity - 1e-9:
        best, best_cost = None, float("inf")
        for g in level:
            if level[g] + step > 0.99:
                continue
            cost = (error_at(g, round(level[g] + step, 6)) - err[g]) / size[g]
            if cost < best_cost:
                best, best_cost = g, cost
        if best is None:
            break
        level[best] = round(level[best] + step, 6)
        err[best] = error_at(best, level[best])
    taus = {g: (quantile(scores[g], s) if s > 0 else -1.0) for g, s in level.items()}
    return taus, level
