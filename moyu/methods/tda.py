"""``tda``: per sequence, keep the neurons whose prompt statistic exceeds a per-layer
threshold fixed offline; the kept count adapts to the prompt.

Reconstruction (the full TDA text was not available; see docs/methods.md): the statistic
is the L2 norm of each neuron's raw activations over the prompt, length-normalised,
``s_i = ||a[:, i]||_2 / sqrt(P)``, and ``theta_l`` is calibrated per layer so that the
mean sparsity over calibration prompts hits the target. ``norm="max"`` keeps moyu's
earlier form (GRIFFIN's statistic divided by its per-prompt maximum) as a labelled
ablation; ``norm="griffin"`` thresholds GRIFFIN's statistic itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from . import calib as C
from .base import LayerInputs
from .griffin import PromptTopKRule, griffin_stat
from .method import Method, register
from .options import CalibOptions

NORMS = ("l2", "max", "griffin")


def tda_stat(a_prompt: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """The per-neuron prompt statistic [B, d_ff] of prompt activations [B, P, d_ff]."""
    if norm == "l2":
        a = a_prompt.float()
        return a.norm(dim=-2) / a.shape[-2] ** 0.5
    s = griffin_stat(a_prompt)
    if norm == "max":
        return s / s.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    if norm == "griffin":
        return s
    raise ValueError(f"unknown TDA norm '{norm}': expected one of {', '.join(NORMS)}")


class PromptThresholdRule(PromptTopKRule):
    """Per sequence: keep neurons whose prompt statistic (``norm``) exceeds ``theta``.

    Decode: as :class:`PromptTopKRule`, the set comes from ``choose`` on the prompt's ``a``.
    """

    def __init__(self, theta: float, norm: str = "l2"):
        super().__init__(k=0)
        self.theta = float(theta)
        self.norm = norm

    def stat(self, a_prompt: torch.Tensor) -> torch.Tensor:
        return tda_stat(a_prompt, self.norm)

    def choose(self, a_prompt: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        return self.stat(a_prompt) > self.theta


@dataclass(frozen=True)
class TdaOptions(CalibOptions):
    norm: Literal["l2", "max", "griffin"] = field(default="l2", metadata={
        "help": "prompt statistic: l2 (length-normalised L2 norm of raw activations), max "
                "(GRIFFIN's statistic / its max, the earlier ablation) or griffin"})


class Tda(Method):
    rule_type = PromptThresholdRule
    name, granularity, prompts = "tda", "sequence", True
    summary = ("per sequence, keep neurons whose length-normalised L2 norm of prompt activations "
               "exceeds theta_l; theta_l calibrated so the layer's mean sparsity hits the target")
    Options = TdaOptions
    version = 2   # v1 thresholded the max-normalised statistic

    def fit_layer(self, prof, ml, samples, target, opts):
        s = target["sparsity"]
        r = torch.stack([tda_stat(a_p[None], opts.norm)[0] for a_p in samples.prompts[ml.index]])
        theta = C.quantile(r, s) if s > 0 else -1.0
        prof.set_layer(ml.index, "theta", torch.tensor(theta))
        return float((r <= theta).float().mean()) if s > 0 else 0.0

    def neuron_rule(self, prof, ml):
        theta = float(prof.layer(ml.index, "theta"))
        return None if theta < 0 else PromptThresholdRule(theta, prof.params["norm"])


register(Tda())
