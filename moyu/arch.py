"""Where each supported architecture keeps its MLP, its linears and its activation.

The table is data, not model code: one :class:`Architecture` per ``model_type`` holds
attribute paths. Everything else in moyu reaches a model's internals through
:func:`architecture_of` and :func:`mlp_layers`, so a new architecture is one table row.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from .errors import MoyuError


@dataclass(frozen=True)
class Architecture:
    """Attribute paths of one architecture family (dotted, relative as noted)."""

    layers: str                     # from the model root to the decoder ModuleList
    mlp: str                        # from a decoder layer to the MLP container ("" = the layer)
    up: str                         # from the MLP: up projection (plain MLP: fc1)
    down: str                       # from the MLP: down projection (plain MLP: fc2)
    act: str                        # from the MLP: activation module
    gate: str | None = None         # from the MLP: gate projection (gated MLPs)
    gate_up: str | None = None      # from the MLP: fused [gate; up] projection (Phi-3)
    attn: str = "self_attn"         # from a decoder layer
    q: str | None = "q_proj"        # from the attention module
    k: str | None = "k_proj"
    v: str | None = "v_proj"
    qkv: str | None = None          # fused q/k/v projection
    o: str = "o_proj"
    conv1d: bool = False            # GPT-2 style Conv1D: weight stored as [in, out]
    decoder: str | None = "llama"   # the lean runtime's converter family (None: no runtime path)
    quirks: frozenset[str] = frozenset()  # departures from the family's layout (see QUIRKS)

    def __post_init__(self):
        unknown = set(self.quirks) - set(QUIRKS)
        if unknown:
            raise ValueError(f"unknown architecture quirks {sorted(unknown)}: known are {sorted(QUIRKS)}")

    @property
    def gated(self) -> bool:
        """True when the MLP computes act(gate(x)) * up(x)."""
        return self.gate is not None or self.gate_up is not None


# What a row of the llama family may depart in; the runtime's converter reads these flags
# instead of branching on model_type.
QUIRKS = {
    "sandwich_norms": "norms before and after both attention and MLP (Gemma 2/3)",
    "query_pre_attn_scalar": "attention scale is query_pre_attn_scalar ** -0.5 (Gemma 2/3)",
    "rope_per_layer_type": "one rotary table per layer type: local and global layers (Gemma 3)",
    "attn_softcap": "tanh soft-cap of attention logits, attn_logit_softcapping (Gemma 2)",
    "final_softcap": "tanh soft-cap of the output logits, final_logit_softcapping (Gemma 2/3)",
    "multipliers": "embedding/residual/attention multipliers and logits_scaling (Granite)",
    "clip_qkv": "q/k/v clipped to +-clip_qkv (OLMo)",
    "sliding_window": "every layer attends within config.sliding_window (Mistral)",
}

_LLAMA = Architecture(layers="model.layers", mlp="mlp", gate="gate_proj", up="up_proj",
                  down="down_proj", act="act_fn")

ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA,
    "mistral": replace(_LLAMA, quirks=frozenset({"sliding_window"})),
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": replace(_LLAMA, quirks=frozenset({"sandwich_norms", "query_pre_attn_scalar",
                                                "attn_softcap", "final_softcap"})),
    # model_type "gemma3" is the multimodal Gemma3ForConditionalGeneration: its decoder
    # sits under the language model (the text-only LM is "gemma3_text").
    "gemma3": Architecture(layers="model.language_model.layers", mlp="mlp", gate="gate_proj",
                       up="up_proj", down="down_proj", act="act_fn", decoder=None),
    "gemma3_text": replace(_LLAMA, quirks=frozenset({"sandwich_norms", "query_pre_attn_scalar",
                                                     "rope_per_layer_type", "final_softcap"})),
    "granite": replace(_LLAMA, quirks=frozenset({"multipliers"})),
    "olmo": replace(_LLAMA, quirks=frozenset({"clip_qkv"})),
    "phi3": Architecture(layers="model.layers", mlp="mlp", gate_up="gate_up_proj", up="gate_up_proj",
                     down="down_proj", act="activation_fn", q=None, k=None, v=None,
                     qkv="qkv_proj"),
    "gpt2": Architecture(layers="transformer.h", mlp="mlp", up="c_fc", down="c_proj", act="act",
                     attn="attn", q=None, k=None, v=None, qkv="c_attn", o="c_proj", conv1d=True,
                     decoder="gpt2"),
    "opt": Architecture(layers="model.decoder.layers", mlp="", up="fc1", down="fc2",
                    act="activation_fn", o="out_proj", decoder="opt"),
    "gpt_neox": Architecture(layers="gpt_neox.layers", mlp="mlp", up="dense_h_to_4h",
                         down="dense_4h_to_h", act="act", attn="attention", q=None, k=None,
                         v=None, qkv="query_key_value", o="dense", decoder="neox"),
}


def supported_types() -> list[str]:
    """Sorted list of the ``model_type`` values moyu knows."""
    return sorted(ARCHITECTURES)


def architecture_of(model: nn.Module) -> Architecture:
    """The :class:`Architecture` of ``model``; one-line :class:`MoyuError` if unsupported."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in ARCHITECTURES:
        raise MoyuError(f"unsupported architecture '{mt}': moyu supports "
                        f"{', '.join(supported_types())}; add a row to moyu/arch.py")
    return ARCHITECTURES[mt]


def _get(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in filter(None, path.split(".")):
        obj = getattr(obj, part)
    return obj


def _observe(fn: Callable[[torch.Tensor], object], t: torch.Tensor) -> None:
    """Call a read-only tap (its return value must not reach the hook machinery)."""
    fn(t)


STREAMS: tuple[str, ...] = ("x", "gate", "up", "act", "out", "attn_in", "o_in")
"""What :meth:`MLPLayer.tap` can observe (``gate`` only on gated MLPs)."""


class MLPLayer:
    """One decoder layer's MLP seen through the table: modules and weights in a common layout.

    Weights are returned in ``nn.Linear`` layout (``[out, in]``) whatever the storage:
    ``w_gate``/``w_up`` are ``[d_ff, d]``, ``w_down`` is ``[d, d_ff]``.
    """

    def __init__(self, model: nn.Module, index: int, arch: Architecture):
        self.index = index
        self.arch = arch
        self.layer = _get(model, arch.layers)[index]
        self.mlp = _get(self.layer, arch.mlp)
        self.up = _get(self.mlp, arch.up)
        self.down = _get(self.mlp, arch.down)
        self.gate = _get(self.mlp, arch.gate) if arch.gate else None
        self.act: Callable[[torch.Tensor], torch.Tensor] = _get(self.mlp, arch.act)
        self.attn = _get(self.layer, arch.attn)

    @property
    def gated(self) -> bool:
        """True for act(gate) * up MLPs."""
        return self.arch.gated

    @property
    def d_ff(self) -> int:
        """Number of MLP neurons."""
        return self.w_down.shape[1]

    def _linear_weight(self, mod: nn.Module) -> torch.Tensor:
        return mod.weight.t() if self.arch.conv1d else mod.weight

    @property
    def w_up(self) -> torch.Tensor:
        """Up (or fc1) weight, ``[d_ff, d]``."""
        w = self._linear_weight(self.up)
        return w[w.shape[0] // 2:] if self.arch.gate_up else w

    @property
    def w_gate(self) -> torch.Tensor | None:
        """Gate weight, ``[d_ff, d]``, or None for a plain MLP."""
        if self.arch.gate_up:
            w = self.up.weight
            return w[: w.shape[0] // 2]
        return None if self.gate is None else self._linear_weight(self.gate)

    @property
    def w_down(self) -> torch.Tensor:
        """Down (or fc2) weight, ``[d, d_ff]``."""
        return self._linear_weight(self.down)

    @property
    def b_up(self) -> torch.Tensor | None:
        """Bias of up / fc1 (``[d_ff]``) or None."""
        b = getattr(self.up, "bias", None)
        if b is not None and self.arch.gate_up:
            b = b[b.shape[0] // 2:]
        return b

    @property
    def b_gate(self) -> torch.Tensor | None:
        """Bias of the gate projection or None."""
        if self.arch.gate_up:
            b = getattr(self.up, "bias", None)
            return None if b is None else b[: b.shape[0] // 2]
        return None if self.gate is None else getattr(self.gate, "bias", None)

    @property
    def b_down(self) -> torch.Tensor | None:
        """Bias of down / fc2 (``[d]``) or None."""
        return getattr(self.down, "bias", None)

    def gate_module(self) -> nn.Module | None:
        """The module whose output holds the gate pre-activation (fused for Phi-3)."""
        return self.up if self.arch.gate_up else self.gate

    def gate_from_output(self, out: torch.Tensor) -> torch.Tensor:
        """Gate pre-activation from :meth:`gate_module`'s output."""
        return out[..., : out.shape[-1] // 2] if self.arch.gate_up else out

    def down_norms(self) -> torch.Tensor:
        """``||W_down[:, i]||_2`` per neuron (float32): what one unit of activation i adds."""
        return self.w_down.detach().float().norm(dim=0)

    def intermediate(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP activation vector ``a`` for MLP input ``x`` (what enters ``down``)."""
        u = nn.functional.linear(x, self.w_up, self.b_up)
        if not self.gated:
            return self.act(u)
        g = nn.functional.linear(x, self.w_gate, self.b_gate)
        return self.act(g) * u

    def tap(self, stream: str, fn: Callable[[torch.Tensor], "torch.Tensor | None"]):
        """Call ``fn`` with one of this MLP's streams on every forward; returns the hook handle.

        Streams (see :data:`STREAMS`): ``x`` the MLP input, ``gate`` the gate pre-activation,
        ``up`` the up (fc1) output with its bias, ``act`` the activation vector entering the
        down projection, ``out`` the MLP output, ``attn_in`` the input of the attention
        projections and ``o_in`` that of the attention output projection. Tensors come as
        the model has them (``[B, T, F]``, or ``[T, F]`` where a model flattens). Only
        ``act`` may be edited: a non-None return replaces what the down projection gets.
        Fused projections (Phi-3's gate_up) are split here, so callers never see them.
        """
        if stream == "act":
            def pre(_m, args):
                new = fn(args[0])
                return None if new is None else (new,)
            return self.down.register_forward_pre_hook(pre)
        if stream in ("x", "attn_in", "o_in"):
            if stream == "x":
                mod = self.up
            else:
                lin = self.attn_linears()
                mod = lin["o"] if stream == "o_in" else lin.get("qkv", lin.get("q"))
            return mod.register_forward_pre_hook(lambda _m, args: _observe(fn, args[0]))
        if stream == "gate" and self.gated:
            return self.gate_module().register_forward_hook(
                lambda _m, _a, out: _observe(fn, self.gate_from_output(out)))
        if stream == "up":
            fused = self.arch.gate_up
            return self.up.register_forward_hook(
                lambda _m, _a, out: _observe(fn, out[..., out.shape[-1] // 2:] if fused else out))
        if stream == "out":
            return self.down.register_forward_hook(lambda _m, _a, out: _observe(fn, out))
        raise ValueError(f"unknown MLP stream '{stream}' (gated={self.gated}): use one of {', '.join(STREAMS)}")

    def attn_linears(self) -> dict[str, nn.Module]:
        """The attention projections by role: ``q``, ``k``, ``v`` or ``qkv``, and ``o``."""
        s = self.arch
        names = {"qkv": s.qkv} if s.qkv else {"q": s.q, "k": s.k, "v": s.v}
        names["o"] = s.o
        return {role: _get(self.attn, path) for role, path in names.items()}

    def mlp_linears(self) -> dict[str, nn.Module]:
        """The MLP projections by role: ``gate`` (if separate), ``up``, ``down``."""
        out = {"up": self.up, "down": self.down}
        if self.gate is not None:
            out = {"gate": self.gate, **out}
        return out


def mlp_layers(model: nn.Module) -> list[MLPLayer]:
    """Every decoder layer's :class:`MLPLayer`, in order."""
    arch = architecture_of(model)
    n = len(_get(model, arch.layers))
    return [MLPLayer(model, i, arch) for i in range(n)]
