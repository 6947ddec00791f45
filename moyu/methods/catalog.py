"""Every method behind one interface: ``calibrate(...) -> Profile`` and ``build(...) -> Sparsifier``."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..arch import MLPLayer, mlp_layers
from ..errors import MoyuError
from ..evaluate import Windows
from ..profile import Profile, fingerprint
from . import calib as C
from .base import InputRule, NeuronRule, Sparsifier
from .inputs import GROUP_STREAM, column_norms, greedy_thresholds, uniform_thresholds
from .sequence import PromptThresholdRule, PromptTopKRule, griffin_stat
from .token import GateThresholdRule, ReluRule, TopKRule, cett_of_mask, tau_for_cett


# Calibration sampling shared by every method (a method's own defaults may override them):
# scored positions sampled per window, and windows read.
CALIB_DEFAULTS: dict[str, Any] = {"per_window": 64, "calib_windows": 16}


class Method:
    """Base class: a method calibrates a :class:`Profile` and turns one into a :class:`Sparsifier`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    granularity: ClassVar[str] = "token"   # token | sequence | input
    needs_gate: ClassVar[bool] = False
    streams: ClassVar[set[str]] = set()   # what calibration samples
    prompts: ClassVar[bool] = False       # calibration keeps prompt activations
    defaults: ClassVar[dict[str, Any]] = {}
    rule_type: ClassVar[type | None] = None   # the rule it applies (None: dense); the runtime keys steps on it

    @property
    def options(self) -> dict[str, Any]:
        """Every option ``calibrate`` accepts for this method, with its default."""
        return {**CALIB_DEFAULTS, **self.defaults}

    def check(self, model: nn.Module) -> None:
        """Refuse, in one line, an architecture this method cannot apply to."""
        if self.needs_gate and not mlp_layers(model)[0].gated:
            raise MoyuError(f"method '{self.name}' needs a gated MLP (a gate projection); "
                            f"'{model.config.model_type}' has a plain MLP: use oracle, griffin, "
                            "tda, teal, wina, dejavu, moe or relu")

    def calibrate(self, model: nn.Module, ids: torch.Tensor | None, target: dict[str, float],
                  windows: Windows = Windows(), progress: bool = False, **params: Any) -> Profile:
        """Fit per-layer parameters on calibration ``ids`` for ``target``; returns a Profile."""
        self.check(model)
        p = {**self.options, **params}
        prof = Profile(method=self.name, target=dict(target), params=p, model=fingerprint(model))
        layers = mlp_layers(model)
        samples = None
        if self.streams or self.prompts:
            if ids is None:
                raise MoyuError(f"method '{self.name}' needs calibration text")
            samples = C.collect(model, ids, windows, self.streams, per_window=p["per_window"],
                                max_windows=p["calib_windows"], prompts=self.prompts,
                                progress=progress)
        achieved = self.fit(prof, layers, samples, target, p)
        prof.calib = {"sparsity_per_layer": [round(float(v), 4) for v in achieved],
                      "sparsity": round(float(sum(achieved) / len(achieved)), 4),
                      "tokens": 0 if ids is None else int(len(ids))}
        return prof

    def fit(self, prof: Profile, layers: list[MLPLayer], samples: C.CalibSamples | None,
            target: dict[str, float], params: dict[str, Any]) -> list[float]:
        """Fit every layer (layer by layer unless a method allocates across layers)."""
        return [self.fit_layer(prof, ml, samples, target, params) for ml in layers]

    def fit_layer(self, prof: Profile, ml: MLPLayer, samples: C.CalibSamples | None,
                  target: dict[str, float], params: dict[str, Any]) -> float:
        """Store layer parameters in ``prof``; return the layer's sparsity on calibration data."""
        return float(target.get("sparsity", 0.0))

    def neuron_rule(self, prof: Profile, ml: MLPLayer) -> NeuronRule | None:
        """The layer's neuron rule (None: the method uses input rules or nothing)."""
        return None

    def input_rule(self, prof: Profile, ml: MLPLayer) -> InputRule | None:
        """The layer's input rule, for input-sparsity methods."""
        return None

    def build(self, model: nn.Module, prof: Profile) -> Sparsifier:
        """A sparsifier for ``model`` from ``prof`` (checked against the model)."""
        prof.check_model(model)
        self.check(model)
        layers = mlp_layers(model)
        nr = [self.neuron_rule(prof, ml) for ml in layers]
        ir = [self.input_rule(prof, ml) for ml in layers]
        info = {"target": prof.target.get("sparsity", prof.target.get("cett"))}
        return Sparsifier(model, neuron_rules=nr if any(r is not None for r in nr) else None,
                          input_rules=ir if any(r is not None for r in ir) else None,
                          method=self.name, info=info)


def _keep_count(ml: MLPLayer, sparsity: float) -> int:
    return int(round((1.0 - sparsity) * ml.d_ff))


class Dense(Method):
    name, summary = "dense", "all neurons (the reference)"


class Oracle(Method):
    rule_type = TopKRule
    name = "oracle"
    summary = "per token, top-k of |a_i| * ||W_down[:, i]|| from the full activation: quality ceiling, no speed"
    defaults = {"by": "contrib"}

    def neuron_rule(self, prof, ml):
        s = prof.target.get("sparsity", 0.0)
        return None if s == 0 else TopKRule(ml, _keep_count(ml, s), prof.params["by"])


class Cats(Method):
    rule_type = GateThresholdRule
    name, needs_gate = "cats", True
    summary = "per token, keep |act(gate . x)| > tau_l; tau_l from calibration quantiles"
    streams = {"g"}

    def fit_layer(self, prof, ml, samples, target, params):
        s = target["sparsity"]
        score = ml.act(samples.cat("g", ml.index)).abs()
        tau = C.quantile(score, s) if s > 0 else -1.0
        prof.set_layer(ml.index, "tau", torch.tensor(tau))
        return float((score <= tau).float().mean())

    def neuron_rule(self, prof, ml):
        tau = float(prof.layer(ml.index, "tau"))
        return None if tau < 0 else GateThresholdRule(ml, tau)


class Cett(Method):
    rule_type = GateThresholdRule
    name = "cett"
    summary = ("per token, CATS-style threshold (|act(gate)|, or |a| for plain MLPs); with --cett B "
               "every layer drops CETT <= B, with --sparsity S one shared CETT level is found so the "
               "average sparsity is S (error-equalised allocation across layers)")
    streams = {"a", "g"}
    defaults = {"per_window": 32}

    def _score(self, ml: MLPLayer, samples: C.CalibSamples) -> tuple[torch.Tensor, torch.Tensor]:
        a = samples.cat("a", ml.index)
        return a, (ml.act(samples.cat("g", ml.index)).abs() if ml.gated else a.abs())

    def fit(self, prof, layers, samples, target, params):
        if "cett" in target:
            return super().fit(prof, layers, samples, target, params)
        s = target["sparsity"]
        if s == 0:
            for ml in layers:
                prof.set_layer(ml.index, "tau", torch.tensor(-1.0))
            return [0.0] * len(layers)
        grid = [i / 40 for i in range(1, 40)]
        curves = []   # per layer: mean CETT at each sparsity of the grid
        for ml in layers:
            a, score = self._score(ml, samples)
            w = ml.w_down.detach().float()
            taus = [C.quantile(score, q) for q in grid]
            curves.append((taus, [float(cett_of_mask(a, score > t, w).mean()) for t in taus]))

        def allocate(level: float) -> list[int]:
            return [max([j for j, c in enumerate(cs) if c <= level], default=-1) for _, cs in curves]

        lo, hi = 0.0, 1.0
        for _ in range(40):  # bisection on the shared CETT level
            mid = (lo + hi) / 2
            got = sum(grid[j] if j >= 0 else 0.0 for j in allocate(mid)) / len(layers)
            lo, hi = (mid, hi) if got < s else (lo, mid)
        out = []
        for ml, j, (taus, _) in zip(layers, allocate(hi), curves):
            prof.set_layer(ml.index, "tau", torch.tensor(taus[j] if j >= 0 else -1.0))
            out.append(grid[j] if j >= 0 else 0.0)
        return out

    def fit_layer(self, prof, ml, samples, target, params):
        a, score = self._score(ml, samples)
        budget = target["cett"]
        tau, q = tau_for_cett(ml, a, score, budget) if budget > 0 else (-1.0, 0.0)
        prof.set_layer(ml.index, "tau", torch.tensor(tau))
        return q

    def neuron_rule(self, prof, ml):
        tau = float(prof.layer(ml.index, "tau"))
        return None if tau < 0 else GateThresholdRule(ml, tau)


class Relu(Method):
    rule_type = ReluRule
    name = "relu"
    summary = ("swap the activation for ReLU at sparse positions (no training); thresholds >= 0 "
               "raise sparsity past ReLU's natural level")
    streams = {"g", "u"}

    def fit_layer(self, prof, ml, samples, target, params):
        s = target["sparsity"]
        pre = samples.cat("g" if ml.gated else "u", ml.index)
        tau = max(C.quantile(pre, s), 0.0) if s > 0 else -1.0
        prof.set_layer(ml.index, "tau", torch.tensor(tau))
        return float((pre <= max(tau, 0.0)).float().mean()) if s > 0 else 0.0

    def neuron_rule(self, prof, ml):
        tau = float(prof.layer(ml.index, "tau"))
        return None if tau < 0 else ReluRule(ml, tau)


class Griffin(Method):
    rule_type = PromptTopKRule
    name, granularity = "griffin", "sequence"
    summary = "per sequence, top-k of the prompt's row-normalised activation norms, fixed for generation"

    def neuron_rule(self, prof, ml):
        s = prof.target.get("sparsity", 0.0)
        return None if s == 0 else PromptTopKRule(ml, _keep_count(ml, s))


class Tda(Method):
    rule_type = PromptThresholdRule
    name, granularity, prompts = "tda", "sequence", True
    summary = ("per sequence, keep neurons whose max-normalised prompt statistic exceeds theta_l; "
               "theta_l calibrated so the layer's average sparsity hits the target")
    defaults = {"calib_windows": 16}

    def fit_layer(self, prof, ml, samples, target, params):
        s = target["sparsity"]
        r = []
        for a_p in samples.prompts[ml.index]:
            st = griffin_stat(a_p[None])[0]
            r.append(st / st.max().clamp_min(1e-12))
        r = torch.stack(r)
        theta = C.quantile(r, s) if s > 0 else -1.0
        prof.set_layer(ml.index, "theta", torch.tensor(theta))
        return float((r <= theta).float().mean()) if s > 0 else 0.0

    def neuron_rule(self, prof, ml):
        theta = float(prof.layer(ml.index, "theta"))
        return None if theta < 0 else PromptThresholdRule(ml, theta)


class Teal(Method):
    rule_type = InputRule
    name, granularity = "teal", "input"
    summary = "per token, zero input channels |x_j| < tau of every linear; greedy or uniform per layer"
    streams = {"x", "a", "xa", "xo"}
    defaults = {"allocation": "greedy", "per_window": 16}
    scaled = False

    def fit_layer(self, prof, ml, samples, target, params):
        s = target["sparsity"]
        data = {g: samples.cat(st, ml.index) for g, st in GROUP_STREAM.items()}
        scales = column_norms(ml) if self.scaled else None
        if params["allocation"] == "greedy" and s > 0:
            taus, levels = greedy_thresholds(ml, data, s, scales)
        else:
            taus, levels = uniform_thresholds(data, s, scales), {g: s for g in data}
        for g, tau in taus.items():
            prof.set_layer(ml.index, f"tau_{g}", torch.tensor(tau))
        sizes = {g: w for g, w in _group_sizes(ml).items()}
        return sum(levels[g] * sizes[g] for g in levels) / sum(sizes.values())

    def input_rule(self, prof, ml):
        taus = {g: float(prof.layer(ml.index, f"tau_{g}")) for g in GROUP_STREAM}
        if all(t < 0 for t in taus.values()):
            return None
        return InputRule(ml, taus, column_norms(ml) if self.scaled else None)


class Wina(Teal):
    name = "wina"
    summary = "like TEAL, scoring each input channel by |x_j| * ||W[:, j]||_2"
    scaled = True


def _group_sizes(ml: MLPLayer) -> dict[str, int]:
    from .inputs import group_weights
    return {g: w.numel() for g, w in group_weights(ml).items()}
