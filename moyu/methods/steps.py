"""Decode-time MLP steps: the same rules as evaluation, on kernels that skip unread weights.

``mlp_factory(model, profile)`` returns a function ``MLPLayer -> MLPStep`` for the lean
runtime (:mod:`moyu.runtime`). Each step runs the prompt densely in ``prefill`` and one
token per ``decode`` call, choosing neurons with the very rule objects the evaluation
hooks use, so the quality ``moyu eval`` reports is the quality of what ``moyu bench``
times (``tests/test_steps.py`` checks kept sets and logits agree).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
from torch import nn

from ..arch import MLPLayer
from ..errors import MoyuError
from ..kernels import (PackedMLP, input_sparse_linear, pack_linear, sketch_mlp, sparse_mlp,
                       sparse_mlp_threshold)
from ..kernels.packing import activation_id
from ..runtime.steps import DenseLinear, DenseMLPStep, activation_fn, activation_kind
from ..profile import Profile
from . import get_method
from .base import InputRule, LayerInputs, NeuronRule
from .cats import GateThresholdRule
from .dejavu import PredictorRule
from .griffin import PromptTopKRule
from .moe import RouterRule
from .relu import ReluRule
from .sketch import SketchRule


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.nbytes for t in tensors if t is not None)


class MeteredStep(DenseMLPStep):
    """A dense step that also reports the weight bytes it reads per decoded token."""

    kept_sum = 0
    calls = 0

    def count(self, kept: int) -> None:
        """Record one decode call that computed ``kept`` neurons."""
        self.kept = kept
        self.kept_sum += kept
        self.calls += 1

    @property
    def kept_share(self) -> float:
        """Mean share of neurons computed per decode call so far."""
        return self.kept_sum / (self.calls * self.packed.d_ff) if self.calls else 1.0

    def bytes_per_token(self) -> float:
        """Mean weight bytes read per decoded token (selection structures included)."""
        return self.packed.nbytes


class IndexStep(MeteredStep):
    """Token-level rule: the rule's mask on this token gives the kept indices."""

    def __init__(self, ml: MLPLayer, rule: NeuronRule, dtype: torch.dtype = torch.float32):
        super().__init__(ml, dtype)
        self.ml, self.rule = ml, rule
        self.selector_bytes = _nbytes(*(getattr(rule, n, None) for n in ("a", "b", "w", "bias")))

    @property
    def nbytes(self) -> int:
        """Bytes held: the packed MLP and the predictor."""
        return self.packed.nbytes + self.selector_bytes

    def bytes_per_token(self) -> float:
        return self.kept_share * self.packed.nbytes + self.selector_bytes

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """Kept neuron indices for one token."""
        x3 = x.reshape(1, 1, -1)
        inp = LayerInputs(x=x3)
        dummy = x3.new_empty(1, 1, self.ml.d_ff)
        return self.rule.mask(dummy, inp).reshape(-1).nonzero().squeeze(1).to(torch.int32)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.select(x)
        self.count(int(idx.numel()))
        return sparse_mlp(x, self.packed, idx)


class ThresholdStep(MeteredStep):
    """CATS / ReLU: the fused kernel reads the gate, then up/down only for kept neurons."""

    def __init__(self, ml: MLPLayer, tau: float, relu: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__(ml, dtype)
        # ReLU runs only at decode; the prompt keeps the model's own activation (same weights)
        self.sparse = replace(self.packed, act="relu", act_id=activation_id("relu")) if relu else self.packed
        self.tau = tau
        self.mode = "gate" if ml.gated else "act"

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        y, kept = sparse_mlp_threshold(x, self.sparse, self.tau, mode=self.mode)
        self.count(int(kept))
        return y

    def bytes_per_token(self) -> float:
        w_in = self.packed.w_in
        first = w_in[:, 0].nbytes if self.packed.gated else w_in.nbytes   # read for every neuron
        rest = self.packed.nbytes - first
        return first + self.kept_share * rest


class SketchStep(MeteredStep):
    """moyu's ``sketch``: one fused kernel scores every neuron from the int8 sketch and
    computes only the kept ones (exactly, or from the sketch's estimate with ``reuse``)."""

    def __init__(self, ml: MLPLayer, rule: SketchRule, dtype: torch.dtype = torch.float32):
        super().__init__(ml, dtype)
        self.rule, sk = rule, rule.sketch
        self._args = (sk.codes, sk.scales, sk.bias, sk.down_norm, rule.tau)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        y, kept = sketch_mlp(x, *self._args, self.packed, self.rule.reuse, self._out)
        self.count(int(kept))
        return y

    @property
    def nbytes(self) -> int:
        """Bytes held: the packed MLP and the int8 sketch."""
        return self.packed.nbytes + self.rule.sketch.nbytes

    def bytes_per_token(self) -> float:
        p = self.packed
        per_kept = p.nbytes if not self.rule.reuse else p.w_down_t.nbytes
        return self.rule.sketch.nbytes + self.kept_share * per_kept


class PromptStep(MeteredStep):
    """GRIFFIN / TDA: choose the set from the prompt, slice the weights once, decode densely on the slice."""

    def __init__(self, ml: MLPLayer, rule: PromptTopKRule, dtype: torch.dtype = torch.float32):
        super().__init__(ml, dtype)
        self.ml, self.rule = ml, rule
        self.sliced: PackedMLP | None = None
        self.slice_seconds = 0.0

    def prefill(self, x: torch.Tensor) -> torch.Tensor:
        import time
        y = super().prefill(x)
        t0 = time.perf_counter()
        keep = self.rule.choose(self.ml.intermediate(x)[None], LayerInputs())[0]
        idx = keep.nonzero().squeeze(1).to(torch.int32)
        self.sliced = self.packed.slice(idx)
        self.kept = int(idx.numel())
        self.slice_seconds = time.perf_counter() - t0
        return y

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        if self.sliced is None:
            raise MoyuError("a sequence-level method needs the prompt first: call prefill")
        self.count(self.sliced.d_ff)
        return sparse_mlp(x, self.sliced, None)

    def bytes_per_token(self) -> float:
        return self.sliced.nbytes if self.sliced is not None else self.packed.nbytes


class InputLinearStep(DenseLinear):
    """TEAL / WINA on one linear: a decoded token reads only the columns of kept input
    channels (``|x_j| * scale_j > tau``, the rule's own test); prompts run dense."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, tau: float,
                 scale: torch.Tensor | None, dtype: torch.dtype = torch.float32):
        super().__init__(weight, bias, dtype)
        self.tau = float(tau)
        self.scale = None if scale is None else scale.detach().float().contiguous()
        self.kept_sum = self.calls = 0

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        """Kept input channels of one token."""
        score = x.abs() if self.scale is None else x.abs() * self.scale
        return (score > self.tau).nonzero().squeeze(1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 or self.tau < 0:
            return super().__call__(x)
        idx = self.keep(x)
        self.kept_sum += idx.numel()
        self.calls += 1
        return input_sparse_linear(x, self.packed, idx)

    @property
    def kept_share(self) -> float:
        """Mean share of input channels (= weight columns) read per decoded token."""
        return self.kept_sum / (self.calls * self.packed.in_features) if self.calls else 1.0

    def bytes_per_token(self) -> float:
        """Mean weight bytes read per decoded token."""
        return self.kept_share * self.packed.nbytes


class InputMLPStep:
    """TEAL / WINA on the MLP: gate/up read only the kept input channels of ``x``, down
    only those of ``a``. ``kept_share`` is the share of MLP weights read."""

    def __init__(self, ml: MLPLayer, rule: InputRule, dtype: torch.dtype = torch.float32):
        th, sc = rule.thresholds, rule.scales
        if "gate_up" in th or not ml.gated:   # one input projection (fused gate_up, or fc1)
            role = "gate_up" if "gate_up" in th else "up"
            rows = [ml.w_gate, ml.w_up] if ml.gated else [ml.w_up]
            biases = [ml.b_gate, ml.b_up] if ml.gated else [ml.b_up]
            bias = None
            if any(b is not None for b in biases):
                bias = torch.cat([torch.zeros(ml.d_ff) if b is None else b.detach().float() for b in biases])
            self.ins = [InputLinearStep(torch.cat([r.detach() for r in rows]), bias, th[role], sc.get(role), dtype)]
        else:   # gate and up, each with its own threshold
            self.ins = [InputLinearStep(ml.w_gate, ml.b_gate, th["gate"], sc.get("gate"), dtype),
                        InputLinearStep(ml.w_up, ml.b_up, th["up"], sc.get("up"), dtype)]
        self.down = InputLinearStep(ml.w_down, ml.b_down, th["down"], sc.get("down"), dtype)
        self.act = activation_fn(activation_kind(ml.act))
        self.gated, self.d_ff = ml.gated, ml.d_ff
        self.kept = ml.d_ff

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = [step(x) for step in self.ins]
        if self.gated:
            g, u = h if len(h) == 2 else h[0].split(self.d_ff, dim=-1)
            a = self.act(g) * u
        else:
            a = self.act(h[0])
        return self.down(a.contiguous())

    def prefill(self, x: torch.Tensor) -> torch.Tensor:
        """Dense MLP over the prompt."""
        return self._mlp(x)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """One token with input sparsity on both projections."""
        return self._mlp(x)

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(step.nbytes for step in self.ins) + self.down.nbytes

    @property
    def kept_share(self) -> float:
        """Mean share of the MLP's weights read per decoded token."""
        return self.bytes_per_token() / self.nbytes

    def bytes_per_token(self) -> float:
        """Mean weight bytes read per decoded token."""
        return sum(step.bytes_per_token() for step in self.ins) + self.down.bytes_per_token()


def check_decodable(method_name: str, sparsity: float = 0.5) -> None:
    """One-line MoyuError if ``method_name`` has no decode path in the lean runtime."""
    method = get_method(method_name)
    if method.no_decode and sparsity > 0:
        raise MoyuError(method.no_decode)


def mlp_factory(model: nn.Module, profile: Profile, dtype: torch.dtype = torch.float32
                ) -> Callable[[MLPLayer], MeteredStep]:
    """``MLPLayer -> step`` for the runtime, built from the same rules evaluation uses."""
    method = get_method(profile.method)
    check_decodable(profile.method, profile.target.get("sparsity", 0) or 0)
    profile.check_model(model)

    def make(ml: MLPLayer) -> MeteredStep | InputMLPStep:
        if method.granularity == "input":
            irule = method.input_rule(profile, ml)
            return MeteredStep(ml, dtype) if irule is None else InputMLPStep(ml, irule, dtype)
        rule = method.neuron_rule(profile, ml)
        if rule is None:
            return MeteredStep(ml, dtype)
        if isinstance(rule, ReluRule):
            return ThresholdStep(ml, rule.tau, relu=True, dtype=dtype)
        if isinstance(rule, GateThresholdRule):
            return ThresholdStep(ml, rule.tau, dtype=dtype)
        if isinstance(rule, PromptTopKRule):
            return PromptStep(ml, rule, dtype)
        if isinstance(rule, SketchRule):
            return SketchStep(ml, rule, dtype)
        if isinstance(rule, (PredictorRule, RouterRule)):
            return IndexStep(ml, rule, dtype)
        raise MoyuError(f"method '{profile.method}' has no decode step")
    return make


def linear_factory(model: nn.Module, profile: Profile, dtype: torch.dtype = torch.float32):
    """The runtime's ``linear_factory`` for input-sparsity methods (TEAL / WINA), else None.

    Attention projections get an :class:`InputLinearStep` with their own threshold (q, k,
    v or fused qkv, o); the lm_head and everything else stay dense.
    """
    method = get_method(profile.method)
    if method.granularity != "input":
        return None
    profile.check_model(model)
    from ..arch import mlp_layers
    rules = [method.input_rule(profile, ml) for ml in mlp_layers(model)]

    def make(index: int, role: str, weight: torch.Tensor, bias: torch.Tensor | None):
        rule = rules[index]
        if rule is None or role not in ("q", "k", "v", "qkv", "o"):
            return DenseLinear(weight, bias, dtype)
        return InputLinearStep(weight, bias, rule.thresholds[role], rule.scales.get(role), dtype)
    return make


def lean_model(model: nn.Module, profile: Profile | None, dtype: torch.dtype = torch.float32,
               max_seq: int = 2048):
    """A :class:`~moyu.runtime.LeanModel` running ``profile`` (dense when None)."""
    from ..runtime import LeanModel
    if profile is None:
        return LeanModel.from_hf(model, dtype=dtype, max_seq=max_seq)
    return LeanModel.from_hf(model, mlp_factory=mlp_factory(model, profile, dtype),
                             linear_factory=linear_factory(model, profile, dtype), dtype=dtype,
                             max_seq=max_seq)
