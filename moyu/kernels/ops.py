"""Public kernel entry points; each dispatches to the C++ extension or the fallback.

The backend is resolved once, on the first call (building the extension if needed).
Per-call Python work is one attribute lookup and one call, so batch-1 decode pays
microseconds, not tens of microseconds, of overhead.
"""
from __future__ import annotations

import threading
from types import ModuleType

from torch import Tensor

from . import _torch_impl
from ._build import load_backend
from .packing import PackedLinear, PackedMLP

_MODES = {"gate": 1, "act": 2}
_impl: ModuleType | None = None
_name: str | None = None
_resolve_lock = threading.Lock()


def _backend() -> ModuleType:
    global _impl, _name
    with _resolve_lock:  # one build and at most one warning, even from several threads
        if _impl is None:
            ext = load_backend()
            _impl, _name = (ext, "cpp") if ext is not None else (_torch_impl, "torch")
    return _impl


def backend_name() -> str:
    """``"cpp"`` when the compiled extension is in use, ``"torch"`` for the fallback."""
    _backend()
    return _name  # type: ignore[return-value]


def sparse_mlp(x: Tensor, packed: PackedMLP, idx: Tensor | None = None,
               out: Tensor | None = None) -> Tensor:
    """MLP output using only neurons ``idx``; reads only those neurons' weights.

    ``y = sum_{i in idx} a_i * W_down[:, i] (+ b_down)`` with ``a_i = act(g_i.x + bg_i) *
    (u_i.x + bu_i)`` (gated) or ``act(u_i.x + bu_i)`` (plain).

    Args:
        x: ``[d]`` or ``[n, d]`` (rows share ``idx``); computed in float32.
        packed: weights from :func:`pack_mlp`.
        idx: int64/int32 neuron ids in any order (duplicates count twice); None = all
            neurons (the dense path); empty = bias only.
        out: optional contiguous float32 output of x's shape, reused to avoid allocation.

    Returns:
        float32 tensor of x's shape.
    """
    impl = _impl or _backend()
    return impl.sparse_mlp(x, packed.w_in, packed.w_down_t, packed.b_in, packed.b_down, idx,
                           packed.act_id, out)


def sparse_mlp_threshold(x: Tensor, packed: PackedMLP, tau: float, mode: str = "gate",
                         out: Tensor | None = None) -> tuple[Tensor, int]:
    """CATS-style fused MLP: decide the kept set from a threshold inside the kernel.

    ``mode="gate"`` (gated MLPs) reads every gate row, keeps neurons with
    ``|act(g_i.x + bg_i)| > tau`` and reads up rows and down columns only for those.
    ``mode="act"`` thresholds the full activation ``|a_i|`` (all gate/up rows are read,
    only down columns are skipped). For plain MLPs both modes threshold
    ``|act(u_i.x + bu_i)|``.

    Returns:
        ``(y, n_kept)``; for a batch ``x`` each row applies its own mask and ``n_kept``
        counts neurons kept by at least one row (exact for up to 8 rows).
    """
    if mode not in _MODES:
        raise ValueError(f"unknown threshold mode '{mode}': expected 'gate' or 'act'")
    impl = _impl or _backend()
    return impl.sparse_mlp_threshold(x, packed.w_in, packed.w_down_t, packed.b_in,
                                     packed.b_down, packed.act_id, float(tau), _MODES[mode], out)


def input_sparse_linear(x: Tensor, packed: PackedLinear, idx: Tensor | None = None,
                        tau: float | None = None, out: Tensor | None = None) -> Tensor:
    """Input-sparse linear (TEAL / WINA): ``y = sum_{j in J} x_j * W[:, j] (+ b)``.

    ``J`` is ``idx`` if given, else ``{j : |x_j| > tau}`` (decided inside the kernel; for
    a batch each row masks its own inputs), else every input channel. Only the columns
    in ``J`` are read.

    Args:
        x: ``[in]`` or ``[n, in]``; computed in float32.
        packed: weights from :func:`pack_linear`.
        idx: int64/int32 input channel ids (any order).
        tau: magnitude threshold, used when ``idx`` is None.
        out: optional contiguous float32 output ``[out]`` / ``[n, out]``.
    """
    impl = _impl or _backend()
    return impl.input_sparse_linear(x, packed.wt, packed.b, idx,
                                    None if tau is None else float(tau), out)


def rows_matvec(x: Tensor, w: Tensor, bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """``y = W x (+ b)`` for one position ``x [in]`` over a row-major ``w [out, in]`` (float32
    or bfloat16, contiguous): one dot product per output. For the lm_head of a large
    vocabulary, where :func:`input_sparse_linear`'s ``W^T`` form keeps rewriting an output
    too large for the cache."""
    impl = _impl or _backend()
    return impl.rows_matvec(x, w, bias, out)


def sketch_act(x: Tensor, codes: Tensor, scales: Tensor, bias: Tensor | None, act_id: int) -> Tensor:
    """Activations of every neuron estimated from an int8 sketch of ``w_in``: ``[n, d_ff]``.

    ``codes`` is int8 ``[d_ff, r, d]`` (the :class:`PackedMLP` ``w_in`` layout), ``scales``
    and ``bias`` float32 ``[d_ff, r]``: ``pre = (codes . x) * scale + bias``, then
    ``a~ = act(pre_gate) * pre_up`` (gated) or ``act(pre)``. The decode kernel
    :func:`sketch_mlp` computes the same numbers bit for bit, so evaluation and decode
    select the same neurons.
    """
    impl = _impl or _backend()
    return impl.sketch_act(x, codes, scales, bias, act_id)


def sketch_mlp(x: Tensor, codes: Tensor, scales: Tensor, sk_bias: Tensor | None, down_norm: Tensor,
               tau: float, packed: PackedMLP, reuse: bool = False,
               out: Tensor | None = None) -> tuple[Tensor, int]:
    """Sketch-selected sparse MLP for decode: keeps neurons with ``|a~_i| * down_norm_i > tau``.

    Reads the int8 sketch of every neuron, then only the kept neurons' weights: their
    gate/up rows and down columns (``reuse=False``: exact activations), or only their down
    columns (``reuse=True``: ``a~`` itself is used). Returns ``(y, n_kept)``.
    """
    impl = _impl or _backend()
    return impl.sketch_mlp(x, codes, scales, sk_bias, down_norm, float(tau), packed.w_in,
                           packed.w_down_t, packed.b_in, packed.b_down, packed.act_id, bool(reuse), out)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """RMSNorm over the last dimension of float32 ``x`` (a plain loop: no dispatch cost)."""
    impl = _impl or _backend()
    return impl.rms_norm(x, weight, float(eps))


def attn_decode(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int,
                lo: int, cos: Tensor | None, sin: Tensor | None, scale: float,
                softcap: float = 0.0) -> Tensor:
    """Causal attention of one new position, with the KV-cache write and RoPE fused in.

    Args:
        q: ``[H * hd]``; k, v: ``[Hkv * hd]`` (float32, contiguous; not modified).
        k_cache, v_cache: the layer's ``[Hkv, S, hd]`` cache; row ``pos`` receives the
            rotated ``k`` and ``v``.
        pos: position of the new token; ``lo``: first cached position attended to
            (sliding windows), ``0 <= lo <= pos``.
        cos, sin: ``[half]`` RoPE tables at ``pos`` (rotate-half over the first
            ``2 * half`` dims of each head), or None for no rotation.
        scale: multiplies ``q``; ``softcap`` > 0 caps scores as ``c * tanh(s / c)``.

    Returns:
        ``[H * hd]`` float32; head ``h`` attends with kv head ``h // (H / Hkv)``.
    """
    impl = _impl or _backend()
    return impl.attn_decode(q, k, v, k_cache, v_cache, int(pos), int(lo), cos, sin,
                            float(scale), float(softcap))
