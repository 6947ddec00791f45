"""From a Hugging Face model to the runtime's flat description (:class:`FlatModel`).

One function per decoder family (the ``decoder`` column of :mod:`moyu.arch`'s table) reads
the HF modules once, and a row's ``quirks`` say where it departs from its family; the decode
loop never touches the HF modules.
All attention projections are normalised to a fused ``[q; k; v]`` output (GPT-NeoX's
per-head interleaved rows are permuted at load), so one attention routine serves all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..arch import ARCHITECTURES, MLPLayer, mlp_layers, architecture_of
from ..errors import MoyuError
from .. import kernels as K
from .steps import LinearFactory, MLPFactory, MLPStep

class Norm:
    """RMSNorm or LayerNorm with its weights held as plain tensors (fp32)."""

    def __init__(self, kind: str, d: int, weight: Tensor | None, bias: Tensor | None, eps: float):
        self.kind, self.shape, self.eps = kind, (d,), float(eps)
        self.weight = None if weight is None else weight.detach().float().contiguous()
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def __call__(self, x: Tensor) -> Tensor:
        if self.kind == "rms":
            if x.dtype == torch.float32:
                return K.rms_norm(x, self.weight, self.eps)
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)

    @property
    def nbytes(self) -> int:
        """Bytes of the parameters."""
        return sum(t.nbytes for t in (self.weight, self.bias) if t is not None)


def norm_from(mod: nn.Module | None) -> Norm | None:
    """A :class:`Norm` equivalent to an HF norm module (Gemma's ``1 + w`` folded in)."""
    if mod is None:
        return None
    name = type(mod).__name__
    w = getattr(mod, "weight", None)
    if isinstance(mod, nn.LayerNorm):
        return Norm("layer", mod.normalized_shape[-1], w, mod.bias, mod.eps)
    if name == "OlmoLayerNorm":
        return Norm("layer", mod.normalized_shape[-1], None, None, 1e-5)
    if "RMSNorm" in name:
        eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-6))
        if "Gemma" in name:
            w = 1.0 + w.detach().float()
        return Norm("rms", w.shape[0], w, None, eps)
    raise MoyuError(f"unsupported norm module {name} in the lean runtime")


@dataclass
class LeanLayer:
    """One decoder layer as the runtime runs it."""

    qkv: list[Callable[[Tensor], Tensor]]   # one fused step, or q, k, v steps
    o: Callable[[Tensor], Tensor]
    mlp: MLPStep
    ln_attn: Norm | None                    # pre-attention (post-LN OPT: after the residual)
    ln_mlp: Norm | None                     # pre-MLP
    ln_attn_out: Norm | None = None         # Gemma 2/3: on the attention output
    ln_mlp_out: Norm | None = None          # Gemma 2/3: on the MLP output
    q_norm: Norm | None = None              # Qwen3 / Gemma3: per head, before RoPE
    k_norm: Norm | None = None
    scale: float = 1.0
    window: int | None = None               # sliding window (keys at distance < window)
    softcap: float | None = None            # attention logit softcapping
    clip: float | None = None               # OLMo clip_qkv
    rope: int = 0                           # index into FlatModel.rope_cos/rope_sin (-1: none)


@dataclass
class FlatModel:
    """Everything the decode loop needs, independent of the HF module tree."""

    model_type: str
    d: int
    n_heads: int
    n_kv: int
    head_dim: int
    layers: list[LeanLayer]
    embed: Tensor | None                     # [vocab, d] token table; None: the tied lm_head's rows
    lm_head: Callable[[Tensor], Tensor]
    final_norm: Norm | None
    embed_scale: float = 1.0
    pos_table: Tensor | None = None          # learned positions [n, d]
    pos_offset: int = 0
    rope_cos: list[Tensor] = field(default_factory=list)   # [max_seq, rot/2] each
    rope_sin: list[Tensor] = field(default_factory=list)
    parallel: bool = False                   # GPT-NeoX parallel residual
    post_ln: bool = False                    # OPT-350m style post-LN
    residual_mult: float = 1.0
    logit_scale: float = 1.0
    final_softcap: float | None = None
    project_in: Callable[[Tensor], Tensor] | None = None
    project_out: Callable[[Tensor], Tensor] | None = None
    max_positions: int | None = None


def _attr(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def _heads(cfg) -> tuple[int, int, int, int]:
    d = _attr(cfg, "hidden_size", "n_embd")
    h = _attr(cfg, "num_attention_heads", "n_head")
    kv = _attr(cfg, "num_key_value_heads", default=h)
    hd = _attr(cfg, "head_dim", default=d // h)
    return d, h, kv, hd


def _rope_tables(rot: nn.Module, max_seq: int, layer_type: str | None = None):
    """cos/sin half tables ``[max_seq, rot/2]`` from the model's own rotary module."""
    pos = torch.arange(max_seq)[None]
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = rot(x, pos, layer_type) if layer_type else rot(x, pos)
    half = cos.shape[-1] // 2
    return cos[0, :, :half].float().contiguous(), sin[0, :, :half].float().contiguous()


def _bias_or_zeros(mod: nn.Module) -> Tensor:
    b = getattr(mod, "bias", None)
    return b.detach() if b is not None else torch.zeros(mod.weight.shape[0])


def _qkv_steps(i: int, mods: dict[str, nn.Module], linear: LinearFactory | None,
               default: LinearFactory, conv1d: bool = False,
               permute: Callable[[Tensor], Tensor] | None = None) -> tuple[list, Callable]:
    """Attention projection steps by the factory (per role) or fused dense by default."""
    w = lambda m: m.weight.detach().t() if conv1d else m.weight.detach()
    b = lambda m: None if getattr(m, "bias", None) is None else m.bias.detach()
    perm = permute or (lambda t: t)
    if "qkv" in mods:
        wq, bq = perm(w(mods["qkv"])), b(mods["qkv"])
        bq = None if bq is None else perm(bq)
        steps = [(linear or default)(i, "qkv", wq, bq)]
    elif linear is not None:
        steps = [linear(i, r, w(mods[r]), b(mods[r])) for r in ("q", "k", "v")]
    else:
        ms = [mods[r] for r in ("q", "k", "v")]
        wf = torch.cat([w(m) for m in ms])
        bf = None
        if any(getattr(m, "bias", None) is not None for m in ms):
            bf = torch.cat([_bias_or_zeros(m) for m in ms])
        steps = [default(i, "qkv", wf, bf)]
    o = (linear or default)(i, "o", w(mods["o"]), b(mods["o"]))
    return steps, o


def _window(cfg, i: int, quirks: frozenset[str]) -> int | None:
    types = getattr(cfg, "layer_types", None)
    sw = getattr(cfg, "sliding_window", None)
    if types is not None:
        return sw if types[i] == "sliding_attention" else None
    return sw if "sliding_window" in quirks else None


def _llama_like(model: nn.Module, mlps: list[MLPLayer], mlp_factory: MLPFactory,
                linear: LinearFactory | None, default: LinearFactory, max_seq: int) -> FlatModel:
    cfg, base = model.config, model.model
    q = architecture_of(model).quirks
    d, h, kv, hd = _heads(cfg)
    sandwich, mult = "sandwich_norms" in q, "multipliers" in q
    if "query_pre_attn_scalar" in q:
        scale = cfg.query_pre_attn_scalar ** -0.5
    elif mult:
        scale = cfg.attention_multiplier
    else:
        scale = hd ** -0.5
    types = getattr(cfg, "layer_types", None)
    per_type = "rope_per_layer_type" in q
    rope_keys = sorted(set(types)) if per_type else [None]
    tables = [_rope_tables(base.rotary_emb, max_seq, k) for k in rope_keys]
    layers = []
    for i, ml in enumerate(mlps):
        L, attn = ml.layer, ml.attn
        qkv, o = _qkv_steps(i, ml.attn_linears(), linear, default)
        layers.append(LeanLayer(
            qkv=qkv, o=o, mlp=mlp_factory(ml),
            ln_attn=norm_from(L.input_layernorm),
            ln_mlp=norm_from(L.pre_feedforward_layernorm if sandwich else L.post_attention_layernorm),
            ln_attn_out=norm_from(L.post_attention_layernorm) if sandwich else None,
            ln_mlp_out=norm_from(L.post_feedforward_layernorm) if sandwich else None,
            q_norm=norm_from(getattr(attn, "q_norm", None)),
            k_norm=norm_from(getattr(attn, "k_norm", None)),
            scale=scale, window=_window(cfg, i, q),
            softcap=getattr(cfg, "attn_logit_softcapping", None) if "attn_softcap" in q else None,
            clip=getattr(cfg, "clip_qkv", None) if "clip_qkv" in q else None,
            rope=rope_keys.index(types[i]) if per_type else 0))
    emb = base.embed_tokens
    es = emb.embed_scale.to(emb.weight.dtype).item() if hasattr(emb, "embed_scale") else 1.0
    if mult:
        es = cfg.embedding_multiplier
    return FlatModel(
        model_type=cfg.model_type, d=d, n_heads=h, n_kv=kv, head_dim=hd, layers=layers,
        embed=emb.weight.detach(), lm_head=None, final_norm=norm_from(base.norm),
        embed_scale=es, rope_cos=[t[0] for t in tables], rope_sin=[t[1] for t in tables],
        residual_mult=cfg.residual_multiplier if mult else 1.0,
        logit_scale=1.0 / cfg.logits_scaling if mult else 1.0,
        final_softcap=getattr(cfg, "final_logit_softcapping", None) if "final_softcap" in q else None)


def _gpt2(model, mlps, mlp_factory, linear, default, max_seq) -> FlatModel:
    cfg, base = model.config, model.transformer
    d, h, kv, hd = _heads(cfg)
    if getattr(cfg, "add_cross_attention", False):
        raise MoyuError("GPT-2 with cross-attention is not supported by the lean runtime")
    layers = []
    for i, ml in enumerate(mlps):
        scale = hd ** -0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(i + 1)
        qkv, o = _qkv_steps(i, ml.attn_linears(), linear, default, conv1d=True)
        layers.append(LeanLayer(qkv=qkv, o=o, mlp=mlp_factory(ml), ln_attn=norm_from(ml.layer.ln_1),
                                ln_mlp=norm_from(ml.layer.ln_2), scale=scale, rope=-1))
    return FlatModel(model_type="gpt2", d=d, n_heads=h, n_kv=h, head_dim=hd, layers=layers,
                    embed=base.wte.weight.detach(), lm_head=None, final_norm=norm_from(base.ln_f),
                    pos_table=base.wpe.weight.detach(), max_positions=base.wpe.weight.shape[0])


def _opt(model, mlps, mlp_factory, linear, default, max_seq) -> FlatModel:
    cfg, dec = model.config, model.model.decoder
    d, h, kv, hd = _heads(cfg)
    layers = []
    for i, ml in enumerate(mlps):
        qkv, o = _qkv_steps(i, ml.attn_linears(), linear, default)
        layers.append(LeanLayer(qkv=qkv, o=o, mlp=mlp_factory(ml),
                                ln_attn=norm_from(ml.layer.self_attn_layer_norm),
                                ln_mlp=norm_from(ml.layer.final_layer_norm), scale=hd ** -0.5, rope=-1))
    proj = lambda m: None if m is None else default(-1, "proj", m.weight.detach(), None)
    pos = dec.embed_positions
    return FlatModel(model_type="opt", d=d, n_heads=h, n_kv=h, head_dim=hd, layers=layers,
                    embed=dec.embed_tokens.weight.detach(), lm_head=None,
                    final_norm=norm_from(dec.final_layer_norm), pos_table=pos.weight.detach(),
                    pos_offset=pos.offset, post_ln=not cfg.do_layer_norm_before,
                    project_in=proj(dec.project_in), project_out=proj(dec.project_out),
                    max_positions=pos.weight.shape[0] - pos.offset)


def _neox(model, mlps, mlp_factory, linear, default, max_seq) -> FlatModel:
    cfg, base = model.config, model.gpt_neox
    d, h, kv, hd = _heads(cfg)

    def permute(t: Tensor) -> Tensor:  # rows [h, 3, hd] -> [3, h, hd]
        return t.reshape(h, 3, hd, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    cos, sin = _rope_tables(base.rotary_emb, max_seq)
    layers = []
    for i, ml in enumerate(mlps):
        qkv, o = _qkv_steps(i, ml.attn_linears(), linear, default, permute=permute)
        layers.append(LeanLayer(qkv=qkv, o=o, mlp=mlp_factory(ml),
                                ln_attn=norm_from(ml.layer.input_layernorm),
                                ln_mlp=norm_from(ml.layer.post_attention_layernorm), scale=hd ** -0.5))
    return FlatModel(model_type="gpt_neox", d=d, n_heads=h, n_kv=h, head_dim=hd, layers=layers,
                    embed=base.embed_in.weight.detach(), lm_head=None,
                    final_norm=norm_from(base.final_layer_norm), rope_cos=[cos], rope_sin=[sin],
                    parallel=cfg.use_parallel_residual)


def flatten(model: nn.Module, mlp_factory: MLPFactory, linear: LinearFactory | None,
               default: LinearFactory, max_seq: int) -> FlatModel:
    """The :class:`FlatModel` of an HF causal LM (the lm_head is attached by the caller)."""
    arch = architecture_of(model)  # one-line MoyuError for an unknown architecture
    fn = _CONVERTERS.get(arch.decoder)
    if fn is None:
        runs = ", ".join(t for t, a in ARCHITECTURES.items() if a.decoder in _CONVERTERS)
        raise MoyuError(f"the lean runtime does not support '{model.config.model_type}' (use HF "
                        f"generate): it runs {runs}")
    return fn(model, mlp_layers(model), mlp_factory, linear, default, max_seq)


# The converter of each decoder family; the architecture table (moyu.arch) names a row's family.
_CONVERTERS = {"llama": _llama_like, "gpt2": _gpt2, "opt": _opt, "neox": _neox}
