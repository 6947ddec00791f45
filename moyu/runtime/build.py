"""From a model and a profile to a :class:`~moyu.runtime.LeanModel` running that profile."""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from ..arch import MLPLayer, mlp_layers
from ..errors import MoyuError
from ..kernels.formats import WeightFormat, weight_format
from ..methods import METHODS, get_method
from ..profile import Profile
from .sparse import InputLinearStep, input_threshold, step_builder
from .steps import DenseLinear, DenseMLPStep


def decodable(method_name: str) -> bool:
    """True when ``method_name`` has a decode path in the runtime (dense always has)."""
    rule_type = get_method(method_name).rule_type
    return rule_type is None or step_builder(rule_type) is not None


def check_decodable(method_name: str, sparsity: float = 0.5) -> None:
    """One-line MoyuError if ``method_name`` has no decode path in the lean runtime."""
    if sparsity == 0 or decodable(method_name):
        return
    method = get_method(method_name)
    ok = ", ".join(n for n in METHODS if decodable(n))
    raise MoyuError(f"method '{method_name}' has no decode path in the lean runtime (no step for its "
                    f"{method.rule_type.__name__}: {method.summary}); bench one of {ok}")


def mlp_factory(model: nn.Module, profile: Profile, fmt: "str | WeightFormat" = "fp32"
                ) -> Callable[[MLPLayer], DenseMLPStep]:
    """``MLPLayer -> step`` for the runtime, built from the same rules evaluation uses."""
    method = get_method(profile.method)
    check_decodable(profile.method, profile.target.get("sparsity", 0) or 0)
    profile.check_model(model)
    fmt = weight_format(fmt)

    def make(ml: MLPLayer):
        rule = method.input_rule(profile, ml) if method.granularity == "input" else method.neuron_rule(profile, ml)
        if rule is None:
            return DenseMLPStep(ml, fmt)
        builder = step_builder(type(rule))
        if builder is None:   # a rule type without a step (checked above; a plug-in may differ)
            raise MoyuError(f"method '{profile.method}' has no decode step for {type(rule).__name__}")
        return builder(ml, rule, fmt)
    return make


def linear_factory(model: nn.Module, profile: Profile, fmt: "str | WeightFormat" = "fp32"):
    """The runtime's ``linear_factory`` for input-sparsity methods (TEAL / WINA), else None.

    Attention projections get an :class:`InputLinearStep` with the rule's threshold for
    their role; the lm_head and everything else stay dense.
    """
    method = get_method(profile.method)
    if method.granularity != "input":
        return None
    profile.check_model(model)
    fmt = weight_format(fmt)
    rules = [method.input_rule(profile, ml) for ml in mlp_layers(model)]

    def make(index: int, role: str, weight: Tensor, bias: Tensor | None):
        rule = rules[index]
        if rule is None or role not in ("q", "k", "v", "qkv", "o"):
            return DenseLinear(weight, bias, fmt)
        return InputLinearStep(weight, bias, *input_threshold(rule, role), fmt)
    return make


def lean_model(model: nn.Module, profile: Profile | None, weights: "str | WeightFormat" = "fp32",
               max_seq: int = 2048):
    """A :class:`~moyu.runtime.LeanModel` running ``profile`` (dense when None) with its
    weights packed in the format ``weights`` (``fp32``, ``bf16``, ...)."""
    from .lean import LeanModel
    if profile is None:
        return LeanModel.from_hf(model, weights=weights, max_seq=max_seq)
    return LeanModel.from_hf(model, mlp_factory=mlp_factory(model, profile, weights),
                             linear_factory=linear_factory(model, profile, weights), weights=weights,
                             max_seq=max_seq)
