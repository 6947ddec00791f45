"""Deja Vu: per token, a small predictor chooses the MLP neurons before the MLP runs.

* ``dejavu`` follows the authors' code (FMInference/DejaVu, ``sparse_predictor/``): a
  two-layer predictor ``d -> r -> d_ff`` (two bias-free linears, no nonlinearity between:
  the paper calls it a two-layer network, the code has none) trained as a per-neuron
  classifier with the code's weighted binary cross-entropy (AdamW, 20 epochs, lr 1e-3),
  fed one layer ahead (lookahead: layer l's set is predicted from layer l-1's MLP input,
  so it can run before layer l; layer 0 uses its own input). The code labels a neuron
  active when its ReLU output is > 0; these SiLU/GELU models have no exact zeros, so a
  neuron is labelled active when its contribution ``|a_i| * ||W_down[:, i]||`` is above
  the layer's calibration quantile at the target sparsity. Top-k of the logits runs.
* ``dejavu-linear`` (moyu's earlier, RODA-style variant): a rank-r linear map from the
  current MLP input to every neuron's contribution (reduced-rank ridge, closed form:
  :func:`moyu.predictor.fit_lowrank`, the same fit the history analysis uses).

Both are trained on CPU in seconds from calibration activations.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..predictor import fit_lowrank, topk_mask
from .base import LayerInputs, NeuronRule, down_norms
from .calib import quantile
from .method import Method, keep_count, register
from .options import CalibOptions, per_window_field


def _mlp_bytes(d: int, d_ff: int, gated: bool) -> int:
    return d_ff * d * (3 if gated else 2)


class PredictorRule(NeuronRule):
    """Top-k of a low-rank linear prediction ``(x @ a) @ b + bias`` of every neuron's contribution.

    Parameters: ``k``, ``a`` [d, r], ``b`` [r, d_ff], ``bias`` [d_ff]; input: the MLP input ``x``.
    """

    needs = frozenset({"x"})

    def __init__(self, k: int, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor, gated: bool):
        self.k, self.a, self.b, self.bias = int(k), a, b, bias
        d, r = a.shape
        d_ff = b.shape[1]
        # predictor bytes relative to the MLP's, read every token
        self.full_reads = r * (d + d_ff) / _mlp_bytes(d, d_ff, gated)

    def mask(self, act: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        return topk_mask((inp.x.float() @ self.a) @ self.b + self.bias, self.k)


class LookaheadPredictorRule(NeuronRule):
    """Deja Vu: top-k of ``(x_prev @ w1) @ w2``, from the previous layer's MLP input.

    Parameters: ``k``, ``w1`` [d, r], ``w2`` [r, d_ff]; input: ``x_prev`` (layer l-1's
    MLP input; layer 0: its own).
    """

    needs = frozenset({"x_prev"})

    def __init__(self, k: int, w1: torch.Tensor, w2: torch.Tensor, gated: bool):
        self.k, self.w1, self.w2 = int(k), w1, w2
        d, r = w1.shape
        d_ff = w2.shape[1]
        self.full_reads = r * (d + d_ff) / _mlp_bytes(d, d_ff, gated)

    def logits(self, x_prev: torch.Tensor) -> torch.Tensor:
        """Per-neuron logits (the classifier's "active" score)."""
        return (x_prev.float() @ self.w1) @ self.w2

    def mask(self, act: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        return topk_mask(self.logits(inp.x_prev), self.k)


def fit_classifier(x: torch.Tensor, labels: torch.Tensor, rank: int, epochs: int = 20,
                   lr: float = 1e-3, batch: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Train Deja Vu's predictor ``x -> r -> d_ff`` on ``labels`` (0/1) with its weighted BCE.

    The loss weights positives by ``1 - w`` and negatives by ``w``, ``w`` = share of
    positives + 0.005 (as in the authors' trainer); AdamW, weight decay 0.01.
    Returns ``(w1 [d, r], w2 [r, d_ff])``.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    d, d_ff = x.shape[1], labels.shape[1]
    net = torch.nn.Sequential(torch.nn.Linear(d, rank, bias=False), torch.nn.Linear(rank, d_ff, bias=False))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    x, y = x.float(), labels.float()
    with torch.enable_grad(), torch.inference_mode(False):
        x, y = x.clone(), y.clone()
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=g).split(batch):
                yb = y[idx]
                w = yb.mean() + 0.005
                loss = torch.nn.functional.binary_cross_entropy_with_logits(
                    net(x[idx]), yb, weight=yb * (1 - w) + w)
                opt.zero_grad()
                loss.backward()
                opt.step()
    return net[0].weight.detach().t().contiguous(), net[1].weight.detach().t().contiguous()


@dataclass(frozen=True)
class DejavuOptions(CalibOptions):
    per_window: int = per_window_field(128)
    rank: int = field(default=128, metadata={"min": 1, "help": "predictor hidden width r"})
    epochs: int = field(default=20, metadata={"min": 1, "help": "training epochs over the calibration samples"})
    lr: float = field(default=1e-3, metadata={"min": 0.0, "help": "AdamW learning rate"})


class DejaVu(Method):
    rule_type = LookaheadPredictorRule
    name = "dejavu"
    summary = ("per token, top-k of Deja Vu's two-layer predictor (d -> r -> d_ff classifier, weighted "
               "BCE) fed from the previous layer's MLP input (lookahead)")
    streams = {"x", "a"}
    Options = DejavuOptions
    version = 2   # v1 was the linear ridge predictor, now `dejavu-linear`

    def fit_layer(self, prof, ml, samples, target, opts):
        s = target["sparsity"]
        if s == 0:
            return 0.0
        x = samples.cat("x", max(ml.index - 1, 0))
        contrib = samples.cat("a", ml.index).abs() * down_norms(ml)
        labels = contrib > quantile(contrib, s)
        w1, w2 = fit_classifier(x, labels, min(opts.rank, ml.d_ff), opts.epochs, opts.lr)
        prof.set_layer(ml.index, "w1", w1)
        prof.set_layer(ml.index, "w2", w2)
        return float(s)

    def neuron_rule(self, prof, ml):
        s = prof.target.get("sparsity", 0.0)
        if s == 0:
            return None
        return LookaheadPredictorRule(keep_count(ml, s), prof.layer(ml.index, "w1"),
                                      prof.layer(ml.index, "w2"), ml.gated)


@dataclass(frozen=True)
class DejavuLinearOptions(CalibOptions):
    per_window: int = per_window_field(128)
    rank: int = field(default=128, metadata={"min": 1, "help": "rank r of the linear predictor"})


class DejaVuLinear(Method):
    rule_type = PredictorRule
    name = "dejavu-linear"
    summary = "per token, top-k of a rank-r linear predictor x -> neuron contributions (reduced-rank ridge)"
    streams = {"x", "a"}
    Options = DejavuLinearOptions

    def fit_layer(self, prof, ml, samples, target, opts):
        x, a = samples.cat("x", ml.index), samples.cat("a", ml.index)
        y = a.abs() * down_norms(ml)
        pa, pb, bias = fit_lowrank(x, y, opts.rank).folded()
        for name, t in (("A", pa), ("B", pb), ("bias", bias)):
            prof.set_layer(ml.index, name, t)
        return float(target["sparsity"])

    def neuron_rule(self, prof, ml):
        s = prof.target.get("sparsity", 0.0)
        if s == 0:
            return None
        i = ml.index
        return PredictorRule(keep_count(ml, s), prof.layer(i, "A"), prof.layer(i, "B"),
                             prof.layer(i, "bias"), ml.gated)


register(DejaVu())
register(DejaVuLinear())
