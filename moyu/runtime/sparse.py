"""Decode steps of the sparse methods, looked up by the type of the method's rule.

Each step runs the prompt densely in ``prefill`` and one token per ``decode`` call,
choosing neurons with the very rule objects the evaluation hooks use, so the quality
``moyu eval`` reports is the quality of what ``moyu bench`` times (``tests/test_steps.py``
checks that kept sets and logits agree). A method decodes in the runtime when its rule
type has an entry in :data:`STEPS` (:func:`register_step`); a missing entry is the one
place "no decode path" comes from.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

import torch
from torch import Tensor

from .. import kernels as K
from ..arch import MLPLayer
from ..errors import MoyuError
from ..kernels.formats import WeightFormat
from ..kernels.packing import ACTIVATION_FNS, PackedMLP, activation_id, activation_kind
from ..methods.base import InputRule, LayerInputs, NeuronRule
from .steps import DenseLinear, DenseMLPStep, packed_activations, packed_mlp_matmul

StepBuilder = Callable[[MLPLayer, NeuronRule, WeightFormat], DenseMLPStep]
STEPS: dict[type, StepBuilder] = {}
"""Decode step builders keyed by rule type (subclasses inherit their base's entry)."""


def register_step(*rule_types: type) -> Callable[[StepBuilder], StepBuilder]:
    """Register ``builder(layer, rule, fmt) -> step`` as the decode path of ``rule_types``."""
    def wrap(builder: StepBuilder) -> StepBuilder:
        for t in rule_types:
            STEPS[t] = builder
        return builder
    return wrap


def step_builder(rule_type: type) -> StepBuilder | None:
    """The builder registered for ``rule_type`` or its nearest base class; None if none."""
    for t in rule_type.__mro__:
        if t in STEPS:
            return STEPS[t]
    return None


def _nbytes(*tensors: Tensor | None) -> int:
    return sum(t.nbytes for t in tensors if t is not None)


class IndexStep(DenseMLPStep):
    """Token-level rule: the rule's mask on this token gives the kept indices."""

    def __init__(self, layer: MLPLayer, rule: NeuronRule, fmt: WeightFormat):
        super().__init__(layer, fmt)
        self.rule, self.d_ff = rule, layer.d_ff
        self.selector_bytes = _nbytes(*(getattr(rule, n, None) for n in ("a", "b", "w", "bias")))

    @property
    def nbytes(self) -> int:
        """Bytes held: the packed MLP and the predictor."""
        return self.packed.nbytes + self.selector_bytes

    def bytes_per_token(self) -> float:
        return self.kept_share * self.packed.nbytes + self.selector_bytes

    def select(self, x: Tensor) -> Tensor:
        """Kept neuron indices for one token."""
        x3 = x.reshape(1, 1, -1)
        dummy = x3.new_empty(1, 1, self.d_ff)
        return self.rule.mask(dummy, LayerInputs(x=x3)).reshape(-1).nonzero().squeeze(1).to(torch.int32)

    def decode(self, x: Tensor) -> Tensor:
        idx = self.select(x)
        self.count(int(idx.numel()))
        return self.kernels.mlp(x, self.packed, idx)


class ThresholdStep(DenseMLPStep):
    """CATS / ReLU: the fused kernel reads the gate, then up/down only for kept neurons."""

    def __init__(self, layer: MLPLayer, tau: float, relu: bool, fmt: WeightFormat):
        super().__init__(layer, fmt)
        # ReLU runs only at decode; the prompt keeps the model's own activation (same weights)
        self.sparse = replace(self.packed, act="relu", act_id=activation_id("relu")) if relu else self.packed
        self.tau = tau
        self.mode = "gate" if layer.gated else "act"

    def fused(self):
        """The CATS rule in the fused decode loop (quantized weights only)."""
        if not self.fmt.quantized:
            return None
        from .fused import FusedMLP
        return FusedMLP(self.sparse, self.mode, self.tau)

    def decode(self, x: Tensor) -> Tensor:
        y, kept = self.kernels.threshold(x, self.sparse, self.tau, mode=self.mode)
        self.count(int(kept))
        return y

    def bytes_per_token(self) -> float:
        p = self.packed
        first = p.w_in.nbytes // 2 if p.gated else p.w_in.nbytes   # gate (or fc1): every neuron
        return first + self.kept_share * (p.nbytes - first)


class SketchStep(DenseMLPStep):
    """moyu's ``sketch``: one fused kernel scores every neuron from the int8 sketch and
    computes only the kept ones (exactly, or from the sketch's estimate with ``reuse``).

    On block-quantized weights the quantized gate/up rows *are* the sketch: every neuron's
    activation comes from them (no second copy), and only the kept neurons' down rows are
    read, with or without ``reuse``.
    """

    def __init__(self, layer: MLPLayer, rule: NeuronRule, fmt: WeightFormat):
        super().__init__(layer, fmt)
        sk, tau = rule.sketch, float(rule.tau)
        self.reuse = bool(rule.reuse) or fmt.quantized
        if fmt.quantized:
            self.sketch_nbytes = 0
            self.tau, self.down_norm = tau, self.packed.down_norm()
            self._run = lambda x: self.kernels.sketch(x, self.packed, self.down_norm, tau, self._out)
        else:
            self.sketch_nbytes = sk.nbytes
            args = (sk.codes, sk.scales, sk.bias, sk.down_norm, tau)
            self._run = lambda x: K.sketch_mlp(x, *args, self.packed, self.reuse, self._out)

    def decode(self, x: Tensor) -> Tensor:
        y, kept = self._run(x)
        self.count(int(kept))
        return y

    def fused(self):
        """The sketch rule in the fused decode loop (quantized weights only)."""
        if not self.fmt.quantized:
            return None
        from .fused import FusedMLP
        return FusedMLP(self.packed, "act", self.tau, self.down_norm)

    @property
    def nbytes(self) -> int:
        """Bytes held: the packed MLP and the int8 sketch."""
        return self.packed.nbytes + self.sketch_nbytes

    def bytes_per_token(self) -> float:
        p = self.packed
        if self.fmt.quantized:   # every gate/up row, the kept down rows
            return p.w_in.nbytes + self.kept_share * p.w_down_t.nbytes
        return self.sketch_nbytes + self.kept_share * (p.w_down_t.nbytes if self.reuse else p.nbytes)


class PromptStep(DenseMLPStep):
    """GRIFFIN / TDA: choose the set from the prompt, slice the weights once, decode densely
    on the slice. The prompt's activations come from the packed weights themselves."""

    def __init__(self, layer: MLPLayer, rule: NeuronRule, fmt: WeightFormat):
        super().__init__(layer, fmt)
        self.rule = rule
        self.sliced: PackedMLP | None = None
        self.slice_seconds = 0.0
        self.keep_prompt = False          # hold the prompt's activations for prefill_from
        self._prompt_a: Tensor | None = None

    def prefill(self, x: Tensor) -> Tensor:
        return self.prefill_from(x, 0)

    def prefill_from(self, x: Tensor, start: int) -> Tensor:
        """Prompt positions ``start ..`` (``x``); the set is chosen from the whole prompt, the
        first ``start`` positions' activations coming from the previous prefill."""
        a = packed_activations(x, self.packed)
        y = packed_mlp_matmul(x, self.packed, a)
        if start:
            if self._prompt_a is None or self._prompt_a.shape[0] < start:
                raise MoyuError("no kept prompt to continue: enable_prompt_reuse() before the first prefill")
            a = torch.cat([self._prompt_a[:start], a])
        self._prompt_a = a if self.keep_prompt else None
        t0 = time.perf_counter()
        keep = self.rule.choose(a[None], LayerInputs())[0]
        idx = keep.nonzero().squeeze(1).to(torch.int32)
        self.sliced = self.packed.slice(idx)
        self.kept = int(idx.numel())
        self.slice_seconds = time.perf_counter() - t0
        return y

    def decode(self, x: Tensor) -> Tensor:
        if self.sliced is None:
            raise MoyuError("a sequence-level method needs the prompt first: call prefill")
        self.count(self.sliced.d_ff)
        return self.kernels.mlp(x, self.sliced, None)

    def bytes_per_token(self) -> float:
        return self.sliced.nbytes if self.sliced is not None else self.packed.nbytes


class InputLinearStep(DenseLinear):
    """TEAL / WINA on one linear: a decoded token reads only the columns of kept input
    channels (``|x_j| * scale_j > tau``, the rule's own test); prompts run dense."""

    def __init__(self, weight: Tensor, bias: Tensor | None, tau: float,
                 scale: Tensor | None, fmt: WeightFormat):
        super().__init__(weight, bias, fmt, transposed=True)
        self.tau = float(tau)
        self.scale = None if scale is None else scale.detach().float().contiguous()
        self.kept_sum = self.calls = 0

    def keep(self, x: Tensor) -> Tensor:
        """Kept input channels of one token."""
        score = x.abs() if self.scale is None else x.abs() * self.scale
        return (score > self.tau).nonzero().squeeze(1)

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() == 2 or self.tau < 0:
            return super().__call__(x)
        idx = self.keep(x)
        self.kept_sum += idx.numel()
        self.calls += 1
        if self.qt is not None:
            from ..kernels.quant_ops import q_axpy
            return q_axpy(x, self.qt, idx, bias=self.bias)
        return K.input_sparse_linear(x, self.packed, idx)

    @property
    def kept_share(self) -> float:
        """Mean share of input channels (= weight columns) read per decoded token."""
        return self.kept_sum / (self.calls * self.in_features) if self.calls else 1.0

    def bytes_per_token(self) -> float:
        """Mean weight bytes read per decoded token."""
        return self.kept_share * self.nbytes


def input_threshold(rule: InputRule, role: str) -> tuple[float, Tensor | None]:
    """``(tau, scale)`` of the linear ``role`` (q, k, v, qkv, o, gate, up, down) under ``rule``:
    its own entry where the rule has per-projection thresholds, else its group's."""
    group = {"q": "attn", "k": "attn", "v": "attn", "qkv": "attn", "gate": "mlp", "up": "mlp"}.get(role, role)
    key = role if role in rule.thresholds else group
    if getattr(rule, "transforms", None):
        raise MoyuError("wina with --option transform=svd has no decode path in the lean runtime (its "
                        "rotation is applied in evaluation hooks, not folded into the weights): bench wina "
                        "without the transform")
    return rule.thresholds[key], rule.scales.get(key)


class InputMLPStep:
    """TEAL / WINA on the MLP: gate/up read only the kept input channels of ``x``, down
    only those of ``a``. ``kept_share`` is the share of MLP weights read."""

    def __init__(self, layer: MLPLayer, rule: InputRule, fmt: WeightFormat):
        roles = {"up": (layer.w_up, layer.b_up), "down": (layer.w_down, layer.b_down)}
        if layer.gated:
            roles["gate"] = (layer.w_gate, layer.b_gate)
        self.lin = {r: InputLinearStep(w, b, *input_threshold(rule, r), fmt) for r, (w, b) in roles.items()}
        self.act = ACTIVATION_FNS[activation_id(activation_kind(layer.act))]
        self.gated = layer.gated
        self.kept = layer.d_ff

    def _mlp(self, x: Tensor) -> Tensor:
        u = self.lin["up"](x)
        a = self.act(self.lin["gate"](x)) * u if self.gated else self.act(u)
        return self.lin["down"](a.contiguous())

    def prefill(self, x: Tensor) -> Tensor:
        """Dense MLP over the prompt."""
        return self._mlp(x)

    def decode(self, x: Tensor) -> Tensor:
        """One token with input sparsity on every projection."""
        return self._mlp(x)

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(s.nbytes for s in self.lin.values())

    @property
    def kept_share(self) -> float:
        """Mean share of the MLP's weights read per decoded token."""
        return self.bytes_per_token() / self.nbytes

    def bytes_per_token(self) -> float:
        """Mean weight bytes read per decoded token."""
        return sum(s.bytes_per_token() for s in self.lin.values())


class StaticStep(DenseMLPStep):
    """``static``: one fixed neuron set per layer, sliced out of the weights once."""

    def __init__(self, layer: MLPLayer, rule: NeuronRule, fmt: WeightFormat):
        super().__init__(layer, fmt)
        self.sliced = self.packed.slice(rule.keep.nonzero().squeeze(1))

    def decode(self, x: Tensor) -> Tensor:
        self.count(self.sliced.d_ff)
        return self.kernels.mlp(x, self.sliced, None)

    @property
    def nbytes(self) -> int:
        """Bytes held: the full packed MLP (prefill is dense) and the kept slice."""
        return self.packed.nbytes + self.sliced.nbytes

    def bytes_per_token(self) -> float:
        return self.sliced.nbytes


def _register_builtin_steps() -> None:
    """Decode paths of the built-in rules. None for oracle (its top-k needs every
    activation) nor for dejavu's lookahead predictor (it reads the previous layer's input)."""
    from ..methods.cats import GateThresholdRule
    from ..methods.dejavu import PredictorRule
    from ..methods.griffin import PromptTopKRule
    from ..methods.moe import RouterRule
    from ..methods.relu import ReluRule
    from ..methods.sketch import SketchRule
    from ..methods.static import StaticRule

    register_step(PredictorRule, RouterRule)(IndexStep)
    register_step(SketchRule)(SketchStep)
    register_step(PromptTopKRule)(PromptStep)
    register_step(StaticRule)(StaticStep)
    register_step(GateThresholdRule)(lambda layer, rule, fmt: ThresholdStep(layer, rule.tau, False, fmt))
    register_step(ReluRule)(lambda layer, rule, fmt: ThresholdStep(layer, rule.tau, True, fmt))
    register_step(InputRule)(InputMLPStep)


_register_builtin_steps()
