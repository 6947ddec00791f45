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

from dataclasses import dataclass

import torch

from ..arch import MLPLayer
from . import calib as C
from .base import LayerInputs, NeuronRule, act_kind, down_norms
from .method import Method, register
from .options import CalibOptions, per_window_field


def quantize_rows(w: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantisation: (int8 codes, fp32 scales) with w ~= codes * scales."""
    levels = 2 ** (bits - 1) - 1
    scale = (w.detach().float().abs().amax(dim=1, keepdim=True) / levels).clamp_min(1e-12)
    codes = (w.detach().float() / scale).round().clamp(-levels, levels).to(torch.int8).contiguous()
    return codes, scale.squeeze(1)


class Sketch:
    """The int8 sketch of one layer's gate/up (or fc1) weights and the scoring function.

    Layout as the kernels' packed ``w_in``: codes ``[d_ff, r, d]`` int8 (neuron i's gate
    and up rows adjacent), per-row float32 scales and biases ``[d_ff, r]``.
    """

    def __init__(self, ml: MLPLayer):
        from ..kernels.packing import activation_id
        rows = [ml.w_gate, ml.w_up] if ml.gated else [ml.w_up]
        w = torch.stack([r.detach().float() for r in rows], 1)            # [d_ff, r, d]
        d_ff, r, d = w.shape
        codes, scales = quantize_rows(w.reshape(d_ff * r, d), 8)
        self.codes = codes.reshape(d_ff, r, d)
        self.scales = scales.reshape(d_ff, r).contiguous()
        bias = [ml.b_gate, ml.b_up] if ml.gated else [ml.b_up]
        self.bias = None
        if any(b is not None for b in bias):
            self.bias = torch.stack([torch.zeros(d_ff) if b is None else b.detach().float()
                                     for b in bias], 1).contiguous()
        self.down_norm = down_norms(ml).float().contiguous()
        self.act_id = activation_id(act_kind(ml))

    @property
    def nbytes(self) -> int:
        """Bytes read per token to score every neuron."""
        return sum(t.nbytes for t in (self.codes, self.scales, self.bias, self.down_norm) if t is not None)

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """Estimated activations ``a~`` of every neuron for inputs ``x`` ``[..., d]``.

        The compiled kernel (or its PyTorch fallback) that the decode runtime also uses,
        so evaluation and generation select the same neurons.
        """
        from ..kernels import sketch_act
        a = sketch_act(x.reshape(-1, x.shape[-1]).float(), self.codes, self.scales, self.bias, self.act_id)
        return a.reshape(*x.shape[:-1], -1)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Estimated contribution ``|a~_i| * ||W_down[:, i]||`` of every neuron."""
        return self.activations(x).abs() * self.down_norm


class SketchRule(NeuronRule):
    """Keep neurons whose sketched contribution exceeds tau.

    ``reuse=False``: the kept neurons are computed exactly. ``reuse=True``: the sketch's
    own estimate ``a~`` is used for them, so decode reads only their down columns.
    Parameters: ``sketch`` (:class:`Sketch`: codes, scales, bias, down_norm, act_id),
    ``tau``, ``reuse``, ``gated``.
    """

    needs = frozenset({"x"})

    def __init__(self, sketch: Sketch, tau: float, reuse: bool = False, gated: bool = True):
        self.sketch = sketch
        self.tau = float(tau)
        self.reuse = reuse
        self.gated = gated
        parts = 3 if gated else 2
        # read for every token: the int8 sketch of gate+up (or fc1), relative to fp32 weights
        self.full_reads = (parts - 1) / parts / 4
        # read for each kept neuron: all of its fp32 weights, or only its down column
        self.kept_reads = 1 / parts if reuse else 1.0
        self._a: torch.Tensor | None = None

    def mask(self, a: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        est = self.sketch.activations(inp.x)
        self._a = est if self.reuse else None
        return est.abs() * self.sketch.down_norm > self.tau

    def apply(self, a: torch.Tensor, keep: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        if not self.reuse:
            return super().apply(a, keep, inp)
        est, self._a = self._a, None
        return (est * keep).to(a.dtype)


@dataclass(frozen=True)
class SketchOptions(CalibOptions):
    per_window: int = per_window_field(32)


class SketchMethod(Method):
    rule_type = SketchRule
    name = "sketch"
    summary = ("moyu's own: per token, score every neuron from an int8 sketch of gate/up, keep "
               "|act(g~)*u~|*||W_down col|| > tau_l, compute only those exactly")
    streams = {"x"}
    Options = SketchOptions
    reuse = False

    def fit_layer(self, prof, ml, samples, target, opts):
        s = target["sparsity"]
        score = Sketch(ml).scores(samples.cat("x", ml.index))
        tau = C.quantile(score, s) if s > 0 else -1.0
        prof.set_layer(ml.index, "tau", torch.tensor(tau))
        return float((score <= tau).float().mean()) if s > 0 else 0.0

    def neuron_rule(self, prof, ml):
        tau = float(prof.layer(ml.index, "tau"))
        return None if tau < 0 else SketchRule(Sketch(ml), tau, reuse=self.reuse, gated=ml.gated)


class SketchReuseMethod(SketchMethod):
    name = "sketch-reuse"
    summary = ("sketch, but the kept neurons use the sketch's own int8 estimate: decode reads "
               "the int8 gate/up sketch and only the kept down columns (fastest)")
    reuse = True


register(SketchMethod())
register(SketchReuseMethod())
