"""``sketch``: moyu's own method - select neurons from a low-precision sketch of gate and up.

The evidence behind it (``docs/methods.md`` has the numbers): which neurons matter for
a token depends on the whole history (history-related uncertainty), so predictors that
see a compressed view of the token miss neurons, and sets fixed at the prompt (GRIFFIN,
TDA: activation inertia) lose badly on small SiLU/GELU models. The gate value alone
(CATS) ignores the up projection, which carries half of the signal. What *does* pick
the right neurons is the activation itself, ``a_i = act(g_i) * u_i`` weighted by
``||W_down[:, i]||``, and that needs no prediction: the gate and up pre-activations are
linear in ``x``. ``sketch`` computes them for every neuron from an int8 copy of
``W_gate`` / ``W_up`` (per-row scales; a quarter of the fp32 bytes; bf16 activations), scores
``|act(g~_i) * u~_i| * ||W_down[:, i]||``, keeps the neurons above a per-layer threshold
(calibrated so the average sparsity hits the target, so the kept count adapts per token),
and computes only those exactly in full precision.

Plain (non-gated) MLPs use the same idea on ``act(fc1 . x)``.
"""
from __future__ import annotations

import torch

from ..arch import MLPLayer
from . import register
from . import calib as C
from .base import LayerInputs, NeuronRule
from .catalog import Method
from .token import down_norms


def quantize_rows(w: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantisation: (int8 codes, fp32 scales) with w ~= codes * scales."""
    levels = 2 ** (bits - 1) - 1
    scale = (w.detach().float().abs().amax(dim=1, keepdim=True) / levels).clamp_min(1e-12)
    codes = (w.detach().float() / scale).round().clamp(-levels, levels).to(torch.int8).contiguous()
    return codes, scale.squeeze(1)


class Sketch:
    """The int8 sketch of one layer's gate/up (or fc1) weights and the scoring function."""

    def __init__(self, ml: MLPLayer):
        self.ml = ml
        w = torch.cat([ml.w_gate, ml.w_up], 0) if ml.gated else ml.w_up
        self.codes, scales = quantize_rows(w, 8)
        self.scales = scales.to(torch.bfloat16)
        bias = [ml.b_gate, ml.b_up] if ml.gated else [ml.b_up]
        self.bias = None if any(b is None for b in bias) else torch.cat([b.detach().float() for b in bias])
        self.down_norm = down_norms(ml)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Estimated contribution |a~_i| * ||W_down[:, i]|| of every neuron for inputs ``x``.

        One int8 weight-only GEMV with bf16 activations (PyTorch's CPU kernel reads the
        int8 codes directly); the decode runtime calls this same function, so evaluation
        and generation select the same neurons.
        """
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        pre = torch._weight_int8pack_mm(flat, self.codes, self.scales).float()
        pre = pre.reshape(*x.shape[:-1], -1)
        if self.bias is not None:
            pre = pre + self.bias
        if self.ml.gated:
            g, u = pre.chunk(2, dim=-1)
            a = self.ml.act(g) * u
        else:
            a = self.ml.act(pre)
        return a.abs() * self.down_norm


class SketchRule(NeuronRule):
    """Keep neurons whose sketched contribution exceeds tau (or the top-k when k is set)."""

    needs = frozenset({"x"})

    def __init__(self, ml: MLPLayer, tau: float):
        super().__init__(ml)
        self.sketch = Sketch(ml)
        self.tau = float(tau)
        # read for every token: the int8 sketch of gate+up (or fc1), relative to fp32 weights
        self.full_reads = (2 / 3 if ml.gated else 1 / 2) / 4

    def mask(self, a: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        return self.sketch.scores(inp.x) > self.tau


class SketchMethod(Method):
    name = "sketch"
    summary = ("moyu's own: per token, score every neuron from an int8 sketch of gate/up, keep "
               "|act(g~)*u~|*||W_down col|| > tau_l, compute only those exactly")
    streams = {"x"}
    defaults = {"per_window": 32}

    def fit_layer(self, prof, ml, samples, target, params):
        s = target["sparsity"]
        score = Sketch(ml).scores(samples.cat("x", ml.index))
        tau = C.quantile(score, s) if s > 0 else -1.0
        prof.set_layer(ml.index, "tau", torch.tensor(tau))
        return float((score <= tau).float().mean()) if s > 0 else 0.0

    def neuron_rule(self, prof, ml):
        tau = float(prof.layer(ml.index, "tau"))
        return None if tau < 0 else SketchRule(ml, tau)


register(SketchMethod())
