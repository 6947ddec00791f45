"""``moe`` (RIDA / MoEfication-style): neurons are clustered into equal-size experts by
co-activation on calibration text (balanced k-means); a linear router (ridge, closed form)
predicts each expert's contribution mass from the MLP input ``x``; the top experts run."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import LayerInputs, NeuronRule, down_norms
from ..predictor import ridge
from .method import Method, register
from .options import CalibOptions, per_window_field


def balanced_kmeans(feats: torch.Tensor, n_clusters: int, iters: int = 15, seed: int = 0) -> torch.Tensor:
    """Cluster rows of ``feats`` into equal-size groups; returns labels [n]."""
    n = feats.shape[0]
    cap = -(-n // n_clusters)
    g = torch.Generator().manual_seed(seed)
    centers = feats[torch.randperm(n, generator=g)[:n_clusters]].clone()
    for _ in range(iters):
        order = (feats @ centers.t()).flatten().argsort(descending=True).tolist()
        assigned, fill, done = [-1] * n, [0] * n_clusters, 0
        for flat in order:                                 # greedy capacity-constrained assignment
            i, e = divmod(flat, n_clusters)
            if assigned[i] < 0 and fill[e] < cap:
                assigned[i], done = e, done + 1
                fill[e] += 1
                if done == n:
                    break
        labels = torch.tensor(assigned)
        for e in range(n_clusters):
            members = feats[labels == e]
            if len(members):
                centers[e] = torch.nn.functional.normalize(members.mean(0), dim=0)
    return labels


class RouterRule(NeuronRule):
    """Run the top experts chosen by a linear router on ``x``.

    Parameters: ``n_keep`` experts, router ``w`` [d, E] and ``b`` [E], ``members``
    (bool [E, d_ff]: which neurons form each expert); input: the MLP input ``x``.
    """

    needs = frozenset({"x"})

    def __init__(self, n_experts_kept: int, labels: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                 gated: bool):
        self.n_keep, self.w, self.b = int(n_experts_kept), w, b
        self.members = torch.nn.functional.one_hot(labels, w.shape[1]).t().bool()   # [E, d_ff]
        self.full_reads = w.numel() / (labels.numel() * w.shape[0] * (3 if gated else 2))

    def mask(self, act: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        score = inp.x.float() @ self.w + self.b                      # [B, T, E]
        top = score.topk(self.n_keep, dim=-1).indices
        chosen = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True)
        return (chosen.float() @ self.members.float()) > 0


@dataclass(frozen=True)
class MoeOptions(CalibOptions):
    per_window: int = per_window_field(128)
    experts: int = field(default=32, metadata={"min": 1, "help": "experts per layer (equal-size neuron clusters)"})


class Moe(Method):
    rule_type = RouterRule
    name = "moe"
    summary = "per token, neurons clustered into experts by co-activation; a linear router picks the top experts"
    streams = {"x", "a"}
    Options = MoeOptions

    def fit_layer(self, prof, ml, samples, target, opts):
        x, a = samples.cat("x", ml.index), samples.cat("a", ml.index)
        contrib = a.abs() * down_norms(ml)
        n_exp = min(opts.experts, ml.d_ff)
        feats = torch.nn.functional.normalize(contrib.t(), dim=1)   # neuron -> its pattern over tokens
        labels = balanced_kmeans(feats, n_exp)
        mass = contrib @ torch.nn.functional.one_hot(labels, n_exp).float()   # [n, E]
        w, b = ridge(x, mass)
        prof.set_layer(ml.index, "labels", labels)
        prof.set_layer(ml.index, "router_w", w)
        prof.set_layer(ml.index, "router_b", b)
        return float(target["sparsity"])

    def neuron_rule(self, prof, ml):
        s = prof.target["sparsity"]
        if s == 0:
            return None
        i = ml.index
        w = prof.layer(i, "router_w")
        keep = max(1, int(round((1 - s) * w.shape[1])))
        return RouterRule(keep, prof.layer(i, "labels"), w, prof.layer(i, "router_b"), ml.gated)


register(Moe())
