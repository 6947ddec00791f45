"""The method interface and its registry.

A method lives in one module of this package with its rule(s), its options dataclass
and its :class:`Method` subclass, and registers an instance with :func:`register` at
import. ``calibrate(...)`` fits per-layer parameters into a :class:`~moyu.profile.Profile`;
``build(...)`` turns a profile into a :class:`~moyu.methods.base.Sparsifier` via one rule
per layer. Rules hold only their own parameters (never the model), so the runtime can
build decode steps from them after the HF model is gone.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from ..arch import MLPLayer, mlp_layers
from ..errors import MoyuError
from ..evaluate import Windows
from ..profile import Profile, fingerprint
from . import calib as C
from .base import InputRule, NeuronRule, Sparsifier
from .options import CalibOptions, make_options

METHODS: dict[str, "Method"] = {}
# Models this large calibrate on fewer windows unless ``calib_windows`` is given: a window's
# forward is what calibration costs, and on 1.5B the default 16 windows took ~3 minutes of
# the 5 that `moyu eval` may take (docs/findings.md measures the quality difference)
LARGE_MODEL_PARAMS = 1_000_000_000
LARGE_MODEL_CALIB_WINDOWS = 8


def register(method: "Method") -> "Method":
    """Add ``method`` to the registry under its name (every method module calls this once)."""
    METHODS[method.name] = method
    return method


def get_method(name: str) -> "Method":
    """The method called ``name``; one-line error listing the known ones."""
    if name not in METHODS:
        raise MoyuError(f"unknown method '{name}': known methods are {', '.join(METHODS)}")
    return METHODS[name]


def keep_count(ml: MLPLayer, sparsity: float) -> int:
    """Neurons kept per token at ``sparsity``."""
    return int(round((1.0 - sparsity) * ml.d_ff))


class Method:
    """Base class: a method calibrates a :class:`Profile` and turns one into a :class:`Sparsifier`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    granularity: ClassVar[str] = "token"   # token | sequence | input
    needs_gate: ClassVar[bool] = False
    streams: ClassVar[set[str]] = set()   # what calibration samples
    prompts: ClassVar[bool] = False       # calibration keeps prompt activations
    # which calibration text it reads (moyu.data.tokens sample): "head", the first tokens,
    # or "spread", pieces from all over the text (a per-prompt statistic needs many texts)
    calib_sample: ClassVar[str] = "head"
    Options: ClassVar[type] = CalibOptions
    version: ClassVar[int] = 1            # bump when the profile's tensors or options change meaning
    rule_type: ClassVar[type | None] = None   # the rule it applies (None: dense); the runtime keys decode steps on it

    @property
    def options(self) -> dict[str, Any]:
        """Every option ``calibrate`` accepts for this method, with its default."""
        return dataclasses.asdict(self.Options())

    def make_options(self, **values: Any):
        """Validated options (one-line MoyuError on an unknown key or a bad value)."""
        return make_options(self.Options, self.name, values)

    def check(self, model: nn.Module) -> None:
        """Refuse, in one line, an architecture this method cannot apply to."""
        if self.needs_gate and not mlp_layers(model)[0].gated:
            plain = [n for n, m in METHODS.items() if not m.needs_gate and n != "dense"]
            raise MoyuError(f"method '{self.name}' needs a gated MLP (a gate projection); "
                            f"'{model.config.model_type}' has a plain MLP: use {', '.join(plain)}")

    def calibrate(self, model: nn.Module, ids: torch.Tensor | None, target: dict[str, float],
                  windows: Windows = Windows(), progress: bool = False, **params: Any) -> Profile:
        """Fit per-layer parameters on calibration ``ids`` for ``target``; returns a Profile."""
        self.check(model)
        windows = windows.resolved(model)
        opts = self.make_options(**params)
        if "calib_windows" not in params and sum(p.numel() for p in model.parameters()) >= LARGE_MODEL_PARAMS:
            opts = dataclasses.replace(opts, calib_windows=min(opts.calib_windows, LARGE_MODEL_CALIB_WINDOWS))
        prof = Profile(method=self.name, target=dict(target), params=dataclasses.asdict(opts),
                       model=fingerprint(model), config_version=self.version)
        layers = mlp_layers(model)
        samples = None
        if self.streams or self.prompts:
            if ids is None:
                raise MoyuError(f"method '{self.name}' needs calibration text")
            samples = C.collect(model, ids, windows, self.streams, per_window=opts.per_window,
                                max_windows=opts.calib_windows,
                                prompts=(self.prompt_summary(opts, windows) or True) if self.prompts else False,
                                progress=progress)
        # for methods that replay blocks (and show their own progress)
        self.model, self.ids, self.windows, self.progress = model, ids, windows, progress
        try:
            achieved = self.fit(prof, layers, samples, target, opts)
        finally:
            self.model = self.ids = None
        prof.calib = {"sparsity_per_layer": [round(float(v), 4) for v in achieved],
                      "sparsity": round(float(sum(achieved) / len(achieved)), 4),
                      "tokens": 0 if ids is None else int(len(ids))}
        return prof

    def prompt_summary(self, opts: Any, windows: Windows) -> "Any | None":
        """What calibration keeps of each window's prompt activations ``[P, d_ff]``: a callable
        returning a smaller tensor, or None for the activations themselves."""
        return None

    def fit(self, prof: Profile, layers: list[MLPLayer], samples: C.CalibSamples | None,
            target: dict[str, float], opts: Any) -> list[float]:
        """Fit every layer (layer by layer unless a method allocates across layers)."""
        return [self.fit_layer(prof, ml, samples, target, opts) for ml in layers]

    def fit_layer(self, prof: Profile, ml: MLPLayer, samples: C.CalibSamples | None,
                  target: dict[str, float], opts: Any) -> float:
        """Store layer parameters in ``prof``; return the layer's sparsity on calibration data."""
        return float(target.get("sparsity", 0.0))

    def neuron_rule(self, prof: Profile, ml: MLPLayer) -> NeuronRule | None:
        """The layer's neuron rule (None: the method uses input rules or nothing)."""
        return None

    def input_rule(self, prof: Profile, ml: MLPLayer) -> InputRule | None:
        """The layer's input rule, for input-sparsity methods."""
        return None

    def check_profile(self, prof: Profile) -> None:
        """Refuse, in one line, a profile this method (at this version) cannot read."""
        if prof.method != self.name:
            raise MoyuError(f"profile is for method '{prof.method}', not '{self.name}'")
        if prof.config_version != self.version:
            raise MoyuError(f"profile was calibrated with {self.name} config v{prof.config_version}, "
                            f"this moyu reads v{self.version}: re-create it with `moyu calibrate`")
        self.make_options(**prof.params)

    def rules(self, prof: Profile, layers: list[MLPLayer]
              ) -> tuple[list[NeuronRule | None], list[InputRule | None]]:
        """Every layer's neuron and input rule from ``prof``; one line if its tensors do not fit."""
        self.check_profile(prof)
        try:
            return ([self.neuron_rule(prof, ml) for ml in layers],
                    [self.input_rule(prof, ml) for ml in layers])
        except KeyError as e:
            raise MoyuError(f"profile tensors do not match method '{self.name}' (no {e.args[0]!r}): "
                            "the file is damaged or from another version; re-create it with "
                            "`moyu calibrate`") from None

    def build(self, model: nn.Module, prof: Profile) -> Sparsifier:
        """A sparsifier for ``model`` from ``prof`` (checked against the model)."""
        prof.check_model(model)
        self.check(model)
        nr, ir = self.rules(prof, mlp_layers(model))
        info = {"target": prof.target.get("sparsity", prof.target.get("cett"))}
        return Sparsifier(model, neuron_rules=nr if any(r is not None for r in nr) else None,
                          input_rules=ir if any(r is not None for r in ir) else None,
                          method=self.name, info=info)
