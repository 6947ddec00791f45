"""Methods with a trained part: ``dejavu`` (a low-rank predictor) and ``moe`` (experts + router).

Both see only the current MLP input ``x`` - the setting the seed paper's
history-related uncertainty is about - and are trained on CPU in seconds, in closed
form (ridge regressions), from calibration activations.

* ``dejavu`` (RODA-style): per layer, a rank-r linear map from ``x`` to each neuron's
  contribution ``|a_i| * ||W_down[:, i]||`` (reduced-rank ridge regression); keep the
  top-k predicted neurons.
* ``moe`` (RIDA / MoEfication-style): neurons are clustered into equal-size experts by
  co-activation on calibration text (balanced k-means); a linear router predicts each
  expert's contribution mass from ``x``; the top experts run.
"""
from __future__ import annotations

import torch

from ..arch import MLPLayer
from . import register
from .base import LayerInputs, NeuronRule
from .catalog import Method, _keep_count
from .token import down_norms


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression with intercept: returns (W [d, k], b [k]) minimising ||xW + b - y||^2 + lam||W||^2."""
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = (x - xm).double(), (y - ym).double()
    gram = xc.t() @ xc
    gram += lam * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    w = torch.linalg.solve(gram, xc.t() @ yc)
    return w.float(), (ym - xm @ w.float())


def reduced_rank(x: torch.Tensor, y: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` ridge predictor ``(x @ A) @ B + b`` via SVD of the full fit's predictions."""
    w, b = ridge(x, y)
    fitted = (x - x.mean(0)) @ w
    _, _, vh = torch.linalg.svd(fitted, full_matrices=False)
    v = vh[:rank].t()                    # [k, r]: top output directions
    return w @ v, v.t().contiguous(), b  # A [d, r], B [r, k]


class PredictorRule(NeuronRule):
    """Top-k of a low-rank prediction of every neuron's contribution from ``x``."""

    needs = frozenset({"x"})

    def __init__(self, ml: MLPLayer, k: int, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor):
        super().__init__(ml)
        self.k, self.a, self.b, self.bias = k, a, b, bias
        d, r = a.shape
        # predictor bytes relative to the MLP's, read every token
        self.full_reads = r * (d + ml.d_ff) / (ml.d_ff * d * (3 if ml.gated else 2))

    def mask(self, act: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        score = (inp.x.float() @ self.a) @ self.b + self.bias
        keep = torch.zeros_like(act, dtype=torch.bool)
        if self.k > 0:
            keep.scatter_(-1, score.topk(self.k, dim=-1).indices, True)
        return keep


class DejaVu(Method):
    rule_type = PredictorRule
    name = "dejavu"
    summary = "per token, top-k of a rank-r predictor x -> neuron contributions, trained on calibration text"
    streams = {"x", "a"}
    defaults = {"rank": 128, "per_window": 128}

    def fit_layer(self, prof, ml, samples, target, params):
        x, a = samples.cat("x", ml.index), samples.cat("a", ml.index)
        y = a.abs() * down_norms(ml)
        pa, pb, bias = reduced_rank(x, y, min(params["rank"], x.shape[1]))
        for name, t in (("A", pa), ("B", pb), ("bias", bias)):
            prof.set_layer(ml.index, name, t)
        return float(target["sparsity"])

    def neuron_rule(self, prof, ml):
        s = prof.target["sparsity"]
        if s == 0:
            return None
        i = ml.index
        return PredictorRule(ml, _keep_count(ml, s), prof.layer(i, "A"), prof.layer(i, "B"),
                             prof.layer(i, "bias"))


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
    """Run the top experts chosen by a linear router on ``x``."""

    needs = frozenset({"x"})

    def __init__(self, ml: MLPLayer, n_experts_kept: int, labels: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
        super().__init__(ml)
        self.n_keep, self.w, self.b = n_experts_kept, w, b
        self.members = torch.nn.functional.one_hot(labels, w.shape[1]).t().bool()   # [E, d_ff]
        self.full_reads = w.numel() / (ml.d_ff * w.shape[0] * (3 if ml.gated else 2))

    def mask(self, act: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        score = inp.x.float() @ self.w + self.b                      # [B, T, E]
        top = score.topk(self.n_keep, dim=-1).indices
        chosen = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True)
        return (chosen.float() @ self.members.float()) > 0


class Moe(Method):
    rule_type = RouterRule
    name = "moe"
    summary = "per token, neurons clustered into experts by co-activation; a linear router picks the top experts"
    streams = {"x", "a"}
    defaults = {"experts": 32, "per_window": 128}

    def fit_layer(self, prof, ml, samples, target, params):
        x, a = samples.cat("x", ml.index), samples.cat("a", ml.index)
        contrib = a.abs() * down_norms(ml)
        n_exp = min(params["experts"], ml.d_ff)
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
        return RouterRule(ml, keep, prof.layer(i, "labels"), w, prof.layer(i, "router_b"))


register(DejaVu())
register(Moe())
