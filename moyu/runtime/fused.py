"""One C++ call per decoded token for pre-norm decoders with block-quantized linears.

The per-op decode loop (:meth:`LeanModel._layer`) costs ~70 us per layer on top of its
kernels: Python, argument conversion and small tensor allocations around ~6 calls. For the
layer layout most models share (RMSNorm before attention and MLP, one fused qkv, RoPE or
none, o, residuals; Llama, Qwen2, Mistral, SmolLM ...; Gemma 2/3's output and q/k norms
too) with int8/int4 weights, a
:class:`~moyu.kernels.quant_ops` ``Plan`` runs every layer of a token in one call, on the
very kernels the per-op path calls. Anything else (other norms or quirks, a method without
a fused MLP, float weights, the PyTorch fallback) keeps the per-op loop, and :func:`why_not` says why.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .convert import FlatModel, LeanLayer, Norm
from .steps import DenseLinear


@dataclass(frozen=True)
class FusedMLP:
    """What a fused decode loop needs to run an MLP step: its quantized weights and rule."""

    packed: object            # moyu.kernels.quant.QuantMLP
    mode: str                 # a rule of moyu.kernels.quant_ops.MODES: "all", "gate" or "act"
    tau: float = 0.0
    down_norm: Tensor | None = None


def _quant_linear(step) -> bool:
    return type(step) is DenseLinear and step.q is not None


def _rms(norm: Norm | None) -> bool:
    return norm is not None and norm.kind == "rms" and norm.weight is not None


def why_not(flat: FlatModel, quantized: bool) -> str | None:
    """Why ``flat`` cannot run fused (one short reason), or None when it can."""
    from ..kernels.quant_ops import quant_backend_name
    if not quantized:
        return "float weights (the fused loop runs block-quantized linears)"
    if quant_backend_name() != "cpp":
        return "the C++ quantized kernels are not in use"
    if flat.post_ln or flat.parallel or flat.residual_mult != 1.0:
        return "post-LN, parallel or scaled residual blocks"
    for i, L in enumerate(flat.layers):
        reason = _layer_reason(L)
        if reason:
            return f"layer {i}: {reason}"
    return None


def _layer_reason(L: LeanLayer) -> str | None:
    if not (_rms(L.ln_attn) and _rms(L.ln_mlp)):
        return "norms other than RMSNorm with a weight"
    optional = (L.ln_attn_out, L.ln_mlp_out, L.q_norm, L.k_norm)
    if any(n is not None and not _rms(n) for n in optional) or (L.q_norm is None) != (L.k_norm is None):
        return "output or q/k norms other than RMSNorm with a weight"
    if L.q_norm is not None and L.q_norm.eps != L.k_norm.eps:
        return "q and k norms with different epsilons"
    if L.clip is not None:
        return "qkv clipping"
    if len(L.qkv) != 1 or not _quant_linear(L.qkv[0]) or not _quant_linear(L.o):
        return "attention projections that are not plain quantized linears"
    fused = getattr(L.mlp, "fused", None)
    if fused is None or fused() is None:
        return f"its MLP step ({type(L.mlp).__name__}) has no fused form"
    return None


def ends_args(flat: FlatModel) -> tuple | None:
    """Arguments of ``Plan.set_ends`` (embedding table, final RMSNorm, lm_head), or None when
    a token's ends stay in Python: other norms, input/output projections, position tables,
    or a head or table that is not a plain quantized matrix."""
    head = flat.lm_head
    table = head if flat.embed is None else flat.embed
    if not (_quant_linear(head) and _quant_linear(table) and _rms(flat.final_norm)):
        return None
    if flat.project_in is not None or flat.project_out is not None or flat.pos_table is not None:
        return None
    fe, ce, qe, de, me = table.q.args()
    fh, _, qh, dh, mh = head.q.args()
    return (fe, ce, qe, de, me, float(flat.embed_scale), flat.final_norm.weight, float(flat.final_norm.eps),
            fh, qh, dh, mh, head.bias)


def _norm_args(norm: Norm | None) -> tuple:
    return (None, 0.0) if norm is None else (norm.weight, norm.eps)


def build_plan(flat: FlatModel, caches: list[tuple[Tensor, Tensor]]):
    """A C++ ``Plan`` over every layer of ``flat`` writing into ``caches``; only for a model
    :func:`why_not` accepts."""
    from ..kernels import quant_ops
    plan = quant_ops._backend().Plan(flat.d, flat.n_heads, flat.n_kv, flat.head_dim)
    for L, (kc, vc) in zip(flat.layers, caches):
        f = L.mlp.fused()
        q = f.packed
        fi, _, qi, di, mi = q.w_in.args()
        fd, _, qd, dd, md = q.w_down_t.args()
        qkv, o = L.qkv[0], L.o
        _, _, qs1, d1, m1 = qkv.q.args()
        _, _, qs2, d2, m2 = o.q.args()
        cos = sin = None
        if L.rope >= 0:
            cos, sin = flat.rope_cos[L.rope].contiguous(), flat.rope_sin[L.rope].contiguous()
        plan.add_layer(L.ln_attn.weight, L.ln_attn.eps, L.ln_mlp.weight, L.ln_mlp.eps,
                       qkv.q.fmt_id, qs1, d1, m1, qkv.bias, o.q.fmt_id, qs2, d2, m2, o.bias,
                       fi, qi, di, mi, fd, qd, dd, md, q.b_in, q.b_down, q.act_id,
                       quant_ops.MODES[f.mode], float(f.tau), f.down_norm, kc, vc, cos, sin,
                       int(L.window or 0), float(L.scale), float(L.softcap or 0.0),
                       *_norm_args(L.ln_attn_out), *_norm_args(L.ln_mlp_out),
                       *((L.q_norm.weight, L.k_norm.weight, L.q_norm.eps) if L.q_norm is not None else (None, None, 0.0)))
    return plan
