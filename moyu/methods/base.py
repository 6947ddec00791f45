"""The common machinery of dynamic-activation methods: targets, rules, and the sparsifier.

A method is calibrated into a :class:`~moyu.profile.Profile`; a profile is turned into
one rule per layer; :class:`Sparsifier` installs the rules on a model with forward hooks
(removed on exit, so the dense model is one ``with`` block away).

Two kinds of rules:

* :class:`NeuronRule` chooses which MLP neurons to keep. The hook on the down
  projection sees the activation vector ``a`` and zeroes the dropped neurons, which is
  exactly what computing only the kept gate/up rows and down columns gives.
  Token-level rules decide per position; sequence-level rules decide once from the
  prompt and keep that set for every later position of the sequence.
* :class:`InputRule` zeroes input channels of every linear (TEAL / WINA style), each
  projection (q, k, v, o, gate, up, down; fused qkv / gate_up) with its own threshold.

Rules hold only their own parameters (thresholds, norms, activation kind, ...), never the
model: the runtime builds decode steps from them after the HF model is gone.

Positions before the *dense prefix* run dense. With :meth:`Sparsifier.begin` the prefix
is explicit (the evaluation protocol), one length for the batch or one per row (an
evaluation harness: each row's context runs dense, its answer sparse); without it, a
forward of more than one token is a prefill (dense; sequence rules choose their sets
from it) and single-token forwards are decode steps (sparse), which is what
``model.generate`` does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..arch import MLPLayer, mlp_layers
from ..errors import MoyuError


def check_sparsity(s: float) -> float:
    """Validate a target sparsity; one-line error outside [0, 1)."""
    if not isinstance(s, (int, float)) or not 0.0 <= float(s) < 1.0:
        raise MoyuError(f"sparsity {s} is outside [0, 1): pass the share of neurons to skip, e.g. 0.5")
    return float(s)


@dataclass
class LayerInputs:
    """What the hooks of one layer saw in the current forward (only what a rule asks for)."""

    x: torch.Tensor | None = None       # MLP input [B, T, d]
    g: torch.Tensor | None = None       # gate pre-activation [B, T, d_ff]
    u: torch.Tensor | None = None       # up (fc1) output [B, T, d_ff], bias included
    x_prev: torch.Tensor | None = None  # the previous layer's MLP input (lookahead predictors)

    def tail(self, p: int) -> "LayerInputs":
        """The same tensors from position ``p`` on."""
        return self.cut(slice(p, None))

    def cut(self, sl: slice) -> "LayerInputs":
        """The same tensors restricted to positions ``sl``."""
        c = (lambda t: None if t is None else t[:, sl])
        return LayerInputs(c(self.x), c(self.g), c(self.u), c(self.x_prev))


def down_norms(ml: MLPLayer) -> torch.Tensor:
    """||W_down[:, i]||_2 per neuron: what one unit of activation i adds to the output."""
    return ml.down_norms()


def act_kind(ml: MLPLayer) -> str:
    """The layer's activation as a kernels' name (``silu``, ``gelu``, ``gelu_tanh``, ``relu``)."""
    from ..kernels.packing import activation_kind
    return activation_kind(ml.act)


class NeuronRule:
    """Per-layer choice of MLP neurons. Subclasses set ``needs`` and override one of the hooks.

    A rule holds only its own parameters; it never keeps a reference to the model.
    """

    needs: frozenset[str] = frozenset()   # any of "x", "g", "u", "x_prev"
    sequence: bool = False               # True: one set per sequence, chosen from the prompt
    full_reads: float = 0.0              # share of the MLP's bytes read for every token anyway
    kept_reads: float | None = None      # share read per kept neuron on top (None: 1 - full_reads)

    def mask(self, a: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        """Token-level: boolean keep-mask shaped like ``a`` ([B, T, d_ff])."""
        raise NotImplementedError

    def choose(self, a_prompt: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        """Sequence-level: keep-mask [B, d_ff] from the prompt's activations [B, P, d_ff]."""
        raise NotImplementedError

    def apply(self, a: torch.Tensor, keep: torch.Tensor, inp: LayerInputs) -> torch.Tensor:
        """The activation the down projection receives (masking by default)."""
        return a * keep.to(a.dtype)


def projections(ml: MLPLayer) -> dict[str, nn.Module]:
    """Every linear of a decoder layer by role: ``q``, ``k``, ``v`` (or fused ``qkv``), ``o``,
    ``gate``, ``up`` (or fused ``gate_up``, Phi-3) and ``down``."""
    out = dict(ml.attn_linears())
    mlp = ml.mlp_linears()
    if ml.arch.gate_up:
        out["gate_up"] = mlp["up"]
    else:
        out.update({r: m for r, m in mlp.items() if r != "down"})
    out["down"] = mlp["down"]
    return out


def projection_weight(ml: MLPLayer, role: str) -> torch.Tensor:
    """The weight of projection ``role`` in ``nn.Linear`` layout ``[out, in]`` (float32)."""
    w = projections(ml)[role].weight.detach().float()
    return w.t() if ml.arch.conv1d else w


class InputRule:
    """Per-layer input-channel sparsity for every linear of a layer (TEAL / WINA).

    Projection ``role`` keeps input channel j when ``|x_j| * scale_j > tau_role``
    (``scale`` absent: 1). Roles are those of :func:`projections`; a negative ``tau``
    leaves that projection dense.
    """

    def __init__(self, thresholds: dict[str, float], scales: dict[str, torch.Tensor] | None = None,
                 transforms: dict[str, Any] | None = None):
        self.thresholds = dict(thresholds)    # role -> tau
        self.scales = dict(scales or {})      # role -> per-channel factor (WINA: column norms)
        # role -> change of input coordinates (WINA's SVD rotation, moyu.methods.rotation):
        # channels are scored and masked in the rotated basis, then mapped back
        self.transforms = dict(transforms or {})

    def coords(self, role: str, x: torch.Tensor) -> torch.Tensor:
        """The input in the coordinates its channels are scored in (``x`` itself without a transform)."""
        t = self.transforms.get(role)
        return x if t is None else t.forward(x)

    def restore(self, role: str, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The linear's input from (masked) coordinates (inverse of :meth:`coords`)."""
        t = self.transforms.get(role)
        return z if t is None else t.back(z, dtype)

    def keep(self, role: str, x: torch.Tensor) -> torch.Tensor:
        """Keep-mask of input channels of ``x`` for projection ``role``."""
        score = x.abs()
        if role in self.scales:
            score = score * self.scales[role].to(x.dtype)
        return score > self.thresholds[role]


def out_features(mod: nn.Module, conv1d: bool) -> int:
    """Output width of a linear (Conv1D stores [in, out])."""
    return mod.weight.shape[1] if conv1d else mod.weight.shape[0]


@dataclass
class _Counter:
    kept: float = 0.0
    total: float = 0.0
    skipped_bytes: float = 0.0


class Sparsifier:
    """Installs per-layer rules with hooks; a reusable, reversible context manager."""

    def __init__(self, model: nn.Module, neuron_rules: list[NeuronRule] | None = None,
                 input_rules: list[InputRule] | None = None, method: str = "?",
                 info: dict[str, Any] | None = None):
        self.model = model
        self.layers = mlp_layers(model)
        self.neuron_rules = neuron_rules
        self.input_rules = input_rules
        self.method = method
        self.info = info or {}
        self.prompt_len: int | None = None
        self._handles: list = []
        self._inputs: list[LayerInputs] = [LayerInputs() for _ in self.layers]
        self._sets: list[torch.Tensor | None] = [None] * len(self.layers)
        self._prefilled = [False] * len(self.layers)
        self._p_cache: dict[int, int] = {}
        self.counters = [_Counter() for _ in self.layers]
        self.total_linear_bytes = sum(_layer_linear_params(ml) for ml in self.layers)

    # -- protocol ---------------------------------------------------------------------------
    # positions before the boundary run exactly as in the dense model, so an evaluation may
    # continue the dense prefill's own KV cache (unless a rule must see the prompt)
    dense_prompt = True

    @property
    def observes_prompt(self) -> bool:
        """True when a rule chooses its set from the prompt (sequence rules), so the prompt
        must run through this sparsifier's hooks."""
        return any(r is not None and r.sequence for r in (self.neuron_rules or []))

    def begin(self, prompt_len: int | Sequence[int] | torch.Tensor | None) -> None:
        """Positions ``< prompt_len`` of each following forward run dense (None: auto mode).

        A sequence or 1-D tensor gives one boundary per batch row: row ``b`` runs dense
        before ``prompt_len[b]`` and sparse from there; a sequence rule chooses each row's
        set from that row's own prefix. Only sparse positions are counted.
        """
        if prompt_len is not None and not isinstance(prompt_len, int):
            prompt_len = torch.as_tensor(prompt_len, dtype=torch.long).reshape(-1)
            if prompt_len.numel() == 0 or bool((prompt_len < 0).any()):
                raise MoyuError("prompt boundaries must be one non-negative length per batch row")
        elif prompt_len is not None and prompt_len < 0:
            raise MoyuError(f"prompt length {prompt_len} is negative: pass the number of dense positions")
        self.prompt_len = prompt_len
        self._sets = [None] * len(self.layers)
        self._prefilled = [False] * len(self.layers)

    def resume(self) -> None:
        """Following forwards continue the sequences of the last one (a KV-cached tail): every
        position runs sparse and sequence rules keep the sets they chose from its prompt."""
        self.prompt_len = 0

    def select_rows(self, rows: Sequence[int] | torch.Tensor) -> None:
        """As :meth:`resume`, for a batch whose row ``j`` continues row ``rows[j]`` of the last
        forward (e.g. several answers on copies of one prompt's KV cache): sequence rules keep
        each row's set from that row's own prompt."""
        idx = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        self._sets = [None if s is None else s.index_select(0, idx) for s in self._sets]
        self.prompt_len = 0

    def reset_counters(self) -> None:
        """Forget the measured sparsity so far."""
        self.counters = [_Counter() for _ in self.layers]

    def measured(self) -> dict[str, Any]:
        """Achieved sparsity on the sparse positions seen so far, overall and per layer."""
        per_layer = [1.0 - c.kept / c.total if c.total else 0.0 for c in self.counters]
        total = sum(c.total for c in self.counters)
        kept = sum(c.kept for c in self.counters)
        tokens = self.counters[0].total / max(self._unit(0), 1) if self.counters else 0
        skipped = sum(c.skipped_bytes for c in self.counters)
        return {
            "method": self.method,
            **self.info,
            "sparsity": 1.0 - kept / total if total else 0.0,
            "sparsity_per_layer": [round(v, 4) for v in per_layer],
            "weights_skipped": skipped / (tokens * self.total_linear_bytes) if tokens else 0.0,
        }

    def _unit(self, i: int) -> int:
        """Counter units per token for layer i (neurons, or the weights of all its linears)."""
        if self.input_rules is not None:
            return _layer_linear_params(self.layers[i])
        return self.layers[i].d_ff

    def _dense_prefix(self, i: int, t: int) -> int | torch.Tensor:
        if isinstance(self.prompt_len, torch.Tensor):
            return self.prompt_len.clamp(max=t)
        if self.prompt_len is not None:
            return min(self.prompt_len, t)
        if t > 1 or not self._prefilled[i]:
            self._prefilled[i] = True
            return t
        return 0

    # -- hooks ------------------------------------------------------------------------------
    def __enter__(self) -> "Sparsifier":
        if self._handles:
            raise MoyuError("this sparsifier is already active: exit the first `with` block first")
        for i, ml in enumerate(self.layers):
            if self.neuron_rules is not None:
                self._install_neuron(i, ml, self.neuron_rules[i])
            if self.input_rules is not None and self.input_rules[i] is not None:
                self._install_input(i, ml, self.input_rules[i])
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._inputs = [LayerInputs() for _ in self.layers]

    def _install_neuron(self, i: int, ml: MLPLayer, rule: NeuronRule | None) -> None:
        if rule is None:  # a dense layer among sparse ones: count it, change nothing
            def count(a):
                a = a if a.dim() == 3 else a[None]
                p, sparse = _rows(self._dense_prefix(i, a.shape[1]), a.shape[0], a.shape[1])
                n = (a[:, p:].shape[0] * a[:, p:].shape[1] if sparse is None else int(sparse.sum())) * a.shape[2]
                c = self.counters[i]
                c.kept += n
                c.total += n
            self._handles.append(ml.tap("act", count))
            return
        inp = self._inputs[i]
        for need, stream in (("x", "x"), ("g", "gate"), ("u", "up")):
            if need in rule.needs:
                self._handles.append(ml.tap(stream, lambda t, need=need: setattr(inp, need, t)))
        if "x_prev" in rule.needs:   # lookahead: the previous layer's MLP input (layer 0: its own)
            self._handles.append(self.layers[max(i - 1, 0)].tap("x", lambda t: setattr(inp, "x_prev", t)))

        d, dff = ml.w_up.shape[1], ml.d_ff
        mlp_params = dff * d * (3 if ml.gated else 2)

        def down_pre(a):
            squeeze = a.dim() == 2
            if squeeze:
                a = a[None]
            t = a.shape[1]
            bounds = self._dense_prefix(i, t)
            p, sparse = _rows(bounds, a.shape[0], t)
            if rule.sequence and sparse is not None:   # each row chooses from its own prefix
                self._sets[i] = torch.cat([_choose(rule, a, inp, int(q), r) for r, q in enumerate(bounds)])
            elif rule.sequence and p > 0:
                self._sets[i] = rule.choose(a[:, :p], inp.cut(slice(None, p)))
            if p >= t:
                return None
            tail_inp = inp.tail(p)
            if rule.sequence:
                keep = self._sets[i]
                if keep is None:
                    raise MoyuError(f"method '{self.method}' chooses neurons from the prompt, but "
                                    "the first forward had no prompt: run the prompt first")
                keep = keep[:, None, :].expand(a.shape[0], t - p, dff)
            else:
                keep = rule.mask(a[:, p:], tail_inp)
            new_tail = rule.apply(a[:, p:], keep, tail_inp)
            if sparse is not None:   # rows whose boundary lies further keep these positions dense
                new_tail = torch.where(sparse[..., None], new_tail, a[:, p:])
                keep = keep & sparse[..., None]
            c = self.counters[i]
            n_keep = float(keep.sum())
            n_tok = keep.shape[0] * keep.shape[1] if sparse is None else int(sparse.sum())
            c.kept += n_keep
            c.total += n_tok * dff
            kept_reads = 1 - rule.full_reads if rule.kept_reads is None else rule.kept_reads
            c.skipped_bytes += mlp_params * ((1 - rule.full_reads) * n_tok - kept_reads * n_keep / dff)
            out = torch.cat([a[:, :p], new_tail], 1) if p else new_tail
            return out[0] if squeeze else out

        self._handles.append(ml.tap("act", down_pre))

    def _install_input(self, i: int, ml: MLPLayer, rule: InputRule) -> None:
        conv1d = ml.arch.conv1d
        for role, mod in projections(ml).items():
            outf = out_features(mod, conv1d)

            def pre(_m, args, role=role, outf=outf):
                x = args[0]
                squeeze = x.dim() == 2
                if squeeze:
                    x = x[None]
                t = x.shape[1]
                # The first projection of the layer advances the auto-mode prefill state;
                # the later ones reuse its decision.
                if role in ("q", "qkv"):
                    self._p_cache[i] = self._dense_prefix(i, t)
                p, sparse = _rows(self._p_cache[i] if self.prompt_len is None
                                  else self._dense_prefix(i, t), x.shape[0], t)
                if p >= t:
                    return None
                xt = rule.coords(role, x[:, p:])
                keep = rule.keep(role, xt)
                if sparse is not None:
                    keep = keep | ~sparse[..., None]
                # counted in weights (a channel of a wide linear skips more bytes)
                c = self.counters[i]
                n_keep = float(keep.sum())
                n_all = keep.numel() if sparse is None else int(sparse.sum()) * keep.shape[-1]
                if sparse is not None:
                    n_keep -= float((~sparse).sum()) * keep.shape[-1]
                c.kept += n_keep * outf
                c.total += n_all * outf
                c.skipped_bytes += (n_all - n_keep) * outf
                tail = rule.restore(role, xt * keep.to(xt.dtype), x.dtype)
                out = torch.cat([x[:, :p], tail], 1) if p else tail
                return (out[0] if squeeze else out,)

            self._handles.append(mod.register_forward_pre_hook(pre))


def _rows(p: int | torch.Tensor, b: int, t: int) -> tuple[int, torch.Tensor | None]:
    """The smallest dense prefix of a batch and, for boundaries that differ per row, the
    mask [B, t - prefix] of the positions from it on that run sparse (None: all of them)."""
    if not isinstance(p, torch.Tensor):
        return p, None
    if p.numel() != b:
        raise MoyuError(f"{p.numel()} prompt boundaries for a batch of {b} rows: pass one per row")
    lo = int(p.min())
    if bool((p == lo).all()):
        return lo, None
    return lo, torch.arange(lo, t)[None, :] >= p[:, None]


def _choose(rule: NeuronRule, a: torch.Tensor, inp: LayerInputs, p: int, r: int) -> torch.Tensor:
    """A sequence rule's keep-mask [1, d_ff] for row ``r`` from its own first ``p`` positions."""
    if p == 0:
        raise MoyuError("a sequence method needs at least one dense prompt position per row")
    cut = (lambda v: None if v is None else v[r:r + 1, :p])
    return rule.choose(a[r:r + 1, :p], LayerInputs(cut(inp.x), cut(inp.g), cut(inp.u), cut(inp.x_prev)))


def _layer_linear_params(ml: MLPLayer) -> int:
    mods = list(ml.attn_linears().values()) + list(ml.mlp_linears().values())
    return sum(m.weight.numel() for m in mods)
