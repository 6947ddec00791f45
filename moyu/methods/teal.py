"""``teal`` and ``wina``: input sparsity, every projection of a layer with its own threshold.

Each linear (q, k, v, o, gate, up, down; fused qkv / gate_up where the model fuses them)
zeroes the input channels whose score is below its threshold, so a decoded token reads
only the kept weight columns. TEAL scores a channel by ``|x_j|``; WINA by
``|x_j| * ||W[:, j]||_2`` on the projections where its reference code applies the
column norm (see :data:`WINA_SCALED`).

Allocation follows TEAL's ``greedyopt.py`` (FasterDecoding/TEAL): per layer, start dense
and repeatedly raise the sparsity of the one projection whose step costs the least
error of the *whole decoder block's output* (the block replayed on calibration windows
with every projection's current threshold), each projection stepping by
``step * d^2 / its size`` so that every step adds the same share of the block's weights.
Thresholds are quantiles of each projection's calibration input scores. Deviations
(documented in docs/methods.md): the last step is trimmed so the block lands exactly on
the target, the error is measured on the scored positions of moyu's windows (prompt
positions stay dense, as in evaluation), and the default step is coarser than TEAL's
(0.05) and the block is replayed on two quarter-length windows, to fit a CPU; and
thresholds are re-estimated (``refine`` passes, default 1) on the inputs each projection
sees with the thresholds applied, because dense-model quantiles overshoot the target on
held-out text (upstream sparsity leaves more small channels downstream). ``allocation="uniform"`` gives every projection the target.

Two savings change the greedy's cost, not its result: the MLP is replayed on the scored
positions alone (:class:`BlockReplay`), and a block's greedy path is kept per model and
calibration text, so lower targets read their allocation off a higher one's path
(:class:`GreedyPath`).
"""
from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from tqdm import tqdm

from ..arch import MLPLayer
from . import calib as C
from .base import InputRule, projection_weight, projections
from .method import Method, register
from .rotation import rotations
from .options import CalibOptions, per_window_field

# calibration stream holding each projection's input
ROLE_STREAM = {"q": "xa", "k": "xa", "v": "xa", "qkv": "xa", "o": "xo",
               "gate": "x", "up": "x", "gate_up": "x", "down": "a"}
# where microsoft/wina multiplies |x| by the weight's column norms (wina/self_attn.py,
# wina/mlp.py): k and gate (fused qkv and gate_up on Phi); q, v, o, up, down unscaled.
# Plain MLPs (no gate) are outside the reference: moyu scales their fc1, the gate's analogue.
WINA_SCALED = {"k", "qkv", "gate", "gate_up"}


def roles(ml: MLPLayer) -> list[str]:
    """The layer's projection roles, in block order."""
    return list(projections(ml))


def role_sizes(ml: MLPLayer) -> dict[str, int]:
    """Weights per projection."""
    return {r: m.weight.numel() for r, m in projections(ml).items()}


def wina_scales(ml: MLPLayer) -> dict[str, torch.Tensor]:
    """WINA's per-input-channel factor ``||W[:, j]||_2`` for the projections it scales."""
    rs = roles(ml)
    scaled = {r for r in rs if r in WINA_SCALED}
    if not ml.gated:
        scaled.add("up")
    return {r: projection_weight(ml, r).norm(dim=0) for r in rs if r in scaled}


class SortedScores:
    """A projection's calibration input scores, sorted once: quantiles by lookup."""

    def __init__(self, scores: torch.Tensor):
        self.sorted = scores.reshape(-1).float().sort().values

    def tau(self, level: float) -> float:
        """Threshold dropping a share ``level`` of the scores (``level <= 0``: -1, dense)."""
        if level <= 0:
            return -1.0
        n = self.sorted.numel()
        k = min(max(int(round(min(level, 1.0) * (n - 1))), 0), n - 1)
        return float(self.sorted[k])


class BlockReplay:
    """One decoder layer run again on captured calibration inputs, with per-projection thresholds.

    The error of a set of thresholds is TEAL's: the L2 norm over the scored positions of
    the difference to the dense block output, averaged over channels and summed over windows.
    """

    def __init__(self, ml: MLPLayer, calls: list[tuple[tuple, dict]], prompt: int,
                 scales: dict[str, torch.Tensor], transforms: dict | None = None):
        self.ml, self.calls, self.p, self.scales = ml, calls, prompt, scales
        self.rule = InputRule({}, scales, transforms)   # the rotation (WINA transform=svd), if any
        self.mods = projections(ml)
        self.taus: dict[str, float] = {}
        self.in_tail = False   # inside the MLP run on the scored positions alone
        self.tail_mlp = False
        self.dense = [self._run(c) for c in calls]
        # The MLP is position-wise and its output at a position reaches only that position of
        # the block output, so the prompt positions (dense, not compared) need no MLP: it runs
        # on the scored tail alone. Used only where a dense run shows this changes nothing (an
        # MLP that returns more than a tensor, or OPT's MLP-less layer, keeps the full run).
        try:
            self.tail_mlp = True
            same = torch.allclose(self._run(calls[0]), self.dense[0], rtol=1e-4, atol=1e-5)
        except Exception:   # noqa: BLE001 - any failure means: keep the full run
            same = False
        self.tail_mlp = same

    def _run(self, call: tuple[tuple, dict]) -> torch.Tensor:
        handles = []
        if self.tail_mlp:
            handles = [self.ml.mlp.register_forward_pre_hook(self._tail_in),
                       self.ml.mlp.register_forward_hook(self._tail_out)]
        try:
            with torch.inference_mode():
                out = self.ml.layer(*call[0], **call[1])
        finally:
            self.in_tail = False
            for h in handles:
                h.remove()
        return (out[0] if isinstance(out, tuple) else out)[..., self.p:, :].float()

    def _tail_in(self, _m, args):
        self.in_tail = True
        return (args[0][..., self.p:, :],) + tuple(args[1:])

    def _tail_out(self, _m, _args, out):
        self.in_tail = False
        if not isinstance(out, torch.Tensor):
            raise TypeError("MLP output is not a tensor")
        # zeros where the prompt positions were: their block outputs are never compared
        return torch.cat([out.new_zeros(*out.shape[:-2], self.p, out.shape[-1]), out], -2)

    def error(self, taus: dict[str, float]) -> float:
        """Block output error with thresholds ``taus`` (role -> tau; missing or < 0: dense)."""
        self.taus = taus
        handles = [m.register_forward_pre_hook(self._mask(r)) for r, m in self.mods.items()
                   if taus.get(r, -1.0) >= 0]
        try:
            return sum(float((self._run(c) - d).norm(dim=-2).mean())
                       for c, d in zip(self.calls, self.dense))
        finally:
            for h in handles:
                h.remove()

    def _mask(self, role: str):
        scale = self.scales.get(role)

        def pre(_m, args):
            x = args[0]
            p = 0 if self.in_tail else self.p   # inside a tail-only MLP every position is scored
            tail = self.rule.coords(role, x[..., p:, :])
            score = tail.abs() if scale is None else tail.abs() * scale
            tail = self.rule.restore(role, tail * (score > self.taus[role]).to(tail.dtype), x.dtype)
            return (torch.cat([x[..., :p, :], tail], -2),)
        return pre


class GreedyPath:
    """TEAL's greedy allocation of one block as a path of steps, extended on demand.

    Each greedy step depends only on the levels reached, never on the target, so the
    allocation for a lower target is a prefix of the allocation for a higher one: a sweep
    over 30/50/70 % walks the 70 % path once and reads the lower targets off it.
    """

    def __init__(self, sizes: dict[str, int], step: float, ref: int):
        self.sizes = sizes
        self.total = sum(sizes.values())
        self.steps = {r: step * ref / sizes[r] for r in sizes}
        self.chosen: list[str] = []   # the role stepped at each step, in order
        self.level = {r: 0.0 for r in sizes}   # levels at the end of the path

    def effective(self, level: dict[str, float]) -> float:
        """Share of the block's weights skipped at per-projection ``level``."""
        return sum(min(level[r], 1.0) * self.sizes[r] for r in level) / self.total

    def reaches(self, target: float) -> bool:
        """Whether the path already covers ``target`` (no block replay needed), or cannot
        go on (every projection fully sparse)."""
        return (self.effective(self.level) >= target - 1e-9
                or all(v >= 1.0 for v in self.level.values()))

    def extend(self, replay: BlockReplay, scores: dict[str, SortedScores], target: float) -> None:
        """Take greedy steps until the block's effective sparsity reaches ``target``."""
        while not self.reaches(target):
            best, best_err = None, float("inf")
            for r in self.level:
                if self.level[r] >= 1.0:
                    continue
                trial = {**self.level, r: min(self.level[r] + self.steps[r], 1.0)}
                err = replay.error({q: scores[q].tau(v) for q, v in trial.items()})
                if err < best_err:
                    best, best_err = r, err
            if best is None:   # no finite error to compare: stop where the path is
                break
            self.level[best] = min(self.level[best] + self.steps[best], 1.0)
            self.chosen.append(best)

    def levels(self, target: float) -> dict[str, float]:
        """Each projection's level for ``target``: the path's prefix that first reaches it, its
        last step trimmed so the block lands exactly on the target."""
        level = {r: 0.0 for r in self.sizes}
        last = None
        for r in self.chosen:
            if self.effective(level) >= target - 1e-9:
                break
            level[r] = min(level[r] + self.steps[r], 1.0)
            last = r
        over = self.effective(level) - target
        if last is not None and over > 0:
            level[last] = max(level[last] - over * self.total / self.sizes[last], 0.0)
        return level


# greedy paths per model, kept between calibrations so that a sweep's targets share one path;
# an entry dies with its model
_PATHS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, GreedyPath]]" = weakref.WeakKeyDictionary()


def _path_key(name: str, ml: MLPLayer, text: str, *config) -> tuple:
    """What a greedy path depends on: method, layer, weights (in-place edits bump their
    version), calibration text (its digest) and options."""
    weights = tuple((m.weight.data_ptr(), m.weight._version) for m in projections(ml).values())
    return (name, ml.index, weights, text) + config


@dataclass(frozen=True)
class TealOptions(CalibOptions):
    per_window: int = per_window_field(16)
    allocation: Literal["greedy", "uniform"] = field(default="greedy", metadata={
        "help": "greedy (TEAL: by block output error) or uniform (every projection at the target)"})
    step: float = field(default=0.25, metadata={
        "min": 1e-3, "help": "greedy step of a d x d projection (TEAL's base step; others scale by size)"})
    refine: int = field(default=1, metadata={
        "min": 0, "help": "passes re-estimating thresholds on the inputs seen under sparsity (0: TEAL's dense quantiles)"})
    greedy_windows: int = field(default=2, metadata={
        "min": 2, "help": "short calibration windows the block is replayed on to measure its output error"})


@dataclass(frozen=True)
class WinaOptions(TealOptions):
    transform: Literal["none", "svd"] = field(default="none", metadata={
        "help": "svd: WINA's orthogonal transform (score and mask channels of the SVD-rotated, norm-folded input)"})


class Teal(Method):
    rule_type = InputRule
    name, granularity = "teal", "input"
    summary = ("per token, zero input channels |x_j| < tau_p of every projection (q, k, v, o, gate, up, "
               "down each its own); greedy allocation by block output error or uniform")
    streams = {"x", "a", "xa", "xo"}
    Options = TealOptions
    version = 2   # v1 shared thresholds across q/k/v and gate/up
    scaled = False

    def scales(self, ml: MLPLayer, transform: str = "none") -> dict[str, torch.Tensor]:
        """Per-projection channel factors of the score (TEAL: none; WINA: column norms, of
        the rotated weights with ``transform="svd"``)."""
        if not self.scaled:
            return {}
        if transform == "none":
            return wina_scales(ml)
        return {r: v for r, v in rotations(ml, roles(ml))[1].items() if r in wina_scales(ml)}

    def transforms(self, ml: MLPLayer, transform: str = "none") -> dict:
        """Per-projection change of input coordinates (WINA ``transform="svd"``; else none)."""
        return {} if transform == "none" else rotations(ml, roles(ml))[0]

    def fit(self, prof, layers, samples, target, opts):
        s = target["sparsity"]
        greedy = opts.allocation == "greedy" and s > 0
        calls = None
        # the block is replayed on short windows (a quarter of the evaluation layout) to keep
        # the greedy's many block forwards affordable on a CPU
        rw = replace(self.windows, prompt=max(1, self.windows.prompt // 4), scored=max(1, self.windows.scored // 4))
        out, levels = [], []
        tf = getattr(opts, "transform", "none")
        paths = _PATHS.setdefault(self.model, {}) if greedy else {}
        text = hashlib.sha1(self.ids.detach().cpu().numpy().tobytes()).hexdigest() if greedy else ""
        for ml in tqdm(layers, desc=f"{self.name} greedy allocation", leave=False,
                       disable=not (greedy and getattr(self, "progress", False))):
            sc, rot = self.scales(ml, tf), self.transforms(ml, tf)
            scores = self._scores(ml, samples, sc, rot)
            sizes = role_sizes(ml)
            if not greedy:
                level = {r: s for r in scores}
            else:
                # the path of a block depends on the dense calibration scores and block inputs,
                # both fixed by the text and the options: one path serves every target
                key = _path_key(self.name, ml, text, self.windows, opts.greedy_windows, opts.step,
                                opts.per_window, opts.calib_windows, tf)
                d = ml.w_up.shape[1]
                path = paths.setdefault(key, GreedyPath(sizes, opts.step, d * d))
                if not path.reaches(s):
                    if calls is None:
                        calls = C.block_inputs(self.model, self.ids, rw, opts.greedy_windows)
                    path.extend(BlockReplay(ml, calls[ml.index], rw.lead, sc, rot), scores, s)
                level = path.levels(s)
            for r in scores:
                prof.set_layer(ml.index, f"tau_{r}", torch.tensor(scores[r].tau(level[r])))
            levels.append(level)
            out.append(sum(level[r] * sizes[r] for r in sizes) / sum(sizes.values()))
        for _ in range(opts.refine if s > 0 else 0):
            # Dense-model quantiles overshoot once upstream projections are sparse (their
            # outputs have more small channels): re-estimate each threshold, at the same
            # level, on the inputs seen with the current thresholds applied.
            sp = self.build(self.model, prof)
            sp.begin(self.windows.lead)
            again = C.collect(self.model, self.ids, self.windows, self.streams, per_window=opts.per_window,
                              max_windows=opts.calib_windows, during=sp)
            for ml, level in zip(layers, levels):
                scores = self._scores(ml, again, self.scales(ml, tf), self.transforms(ml, tf))
                for r in scores:
                    prof.set_layer(ml.index, f"tau_{r}", torch.tensor(scores[r].tau(level[r])))
        return out

    def _scores(self, ml: MLPLayer, samples: C.CalibSamples, sc: dict[str, torch.Tensor],
                rot: dict | None = None) -> dict[str, SortedScores]:
        out = {}
        for r in roles(ml):
            x = samples.cat(ROLE_STREAM[r], ml.index)
            if rot and r in rot:
                x = rot[r].forward(x)
            out[r] = SortedScores(x.abs() * sc[r] if r in sc else x.abs())
        return out

    def input_rule(self, prof, ml):
        taus = {r: float(prof.layer(ml.index, f"tau_{r}")) for r in roles(ml)}
        if all(t < 0 for t in taus.values()):
            return None
        tf = prof.params.get("transform", "none")
        return InputRule(taus, self.scales(ml, tf), self.transforms(ml, tf))


class Wina(Teal):
    name = "wina"
    summary = ("like TEAL, scoring input channels by |x_j| * ||W[:, j]||_2 where microsoft/wina does "
               "(k and gate; fused qkv and gate_up), |x_j| elsewhere; transform=svd: in the SVD-rotated basis")
    scaled = True
    Options = WinaOptions


register(Teal())
register(Wina())
