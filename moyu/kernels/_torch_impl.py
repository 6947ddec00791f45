"""Pure-PyTorch fallback with the C++ extension's signatures and semantics.

Measured choices (batch 1, weights streamed from DRAM): gathering the kept rows with
``index_select`` and one ``F.linear`` for the gate/up projections; ``F.embedding_bag``
with ``per_sample_weights`` for the down sum (2-3x faster than gather + matmul, and it
never materialises the gathered rows). bf16 weights are used natively (``x`` and the
activations are rounded to bf16 for those products; bf16 ``F.linear`` is ~6x faster
than converting the weights to fp32 per call), so bf16 results are bf16-accurate.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .packing import ACTIVATION_FNS as _ACT_FNS

_GATE_MODE = 1  # threshold mode ids as in ops._MODES; anything else thresholds |a_i|


def _rows(x: Tensor, width: int) -> Tensor:
    if x.dim() not in (1, 2) or x.shape[-1] != width:
        raise ValueError(f"x must be [{width}] or [n, {width}], got {list(x.shape)}")
    return x.reshape(-1, width).float()


def _finish(y: Tensor, x: Tensor, out: Tensor | None) -> Tensor:
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    if out is None:
        return y
    return out.copy_(y)


def _in_proj(x2: Tensor, w: Tensor) -> Tensor:
    """x2 [n, d] times rows w [m, d] -> [n, m] float32."""
    if w.dtype == torch.float32:
        return F.linear(x2, w)
    return F.linear(x2.to(w.dtype), w).float()


def _down(a: Tensor, w_dt: Tensor, idx: Tensor | None) -> Tensor:
    """sum_j a[:, j] * w_dt[idx[j]] (idx None: all rows) for a [n, k] -> [n, d] float32."""
    n, k = a.shape
    if k == 0:
        return a.new_zeros(n, w_dt.shape[1])
    if idx is None:
        if w_dt.dtype == torch.float32:
            return a @ w_dt
        idx = torch.arange(k)
    bags = idx.expand(n, k)
    return F.embedding_bag(bags, w_dt, per_sample_weights=a.to(w_dt.dtype), mode="sum").float()


def _index(idx: Tensor, d_ff: int) -> Tensor:
    idx = idx.long().reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= d_ff):
        raise IndexError(f"index out of range [0, {d_ff})")
    return idx


def _activations(h: Tensor, b_in: Tensor | None, act: int) -> Tensor:
    """h [n, k, r] pre-activations -> a [n, k]."""
    if b_in is not None:
        h = h + b_in
    a = _ACT_FNS[act](h[..., 0])
    return a * h[..., 1] if h.shape[-1] == 2 else a


def sparse_mlp(x: Tensor, w_in: Tensor, w_dt: Tensor, b_in: Tensor | None,
               b_down: Tensor | None, idx: Tensor | None, act: int,
               out: Tensor | None = None) -> Tensor:
    """Fallback of the C++ ``sparse_mlp`` (see :func:`moyu.kernels.sparse_mlp`)."""
    d_ff, r, d = w_in.shape
    x2 = _rows(x, d)
    sel = None if idx is None else _index(idx, d_ff)
    if sel is None:
        wi, bi = w_in.reshape(d_ff * r, d), b_in
    else:
        wi = w_in.index_select(0, sel).reshape(-1, d)
        bi = None if b_in is None else b_in.index_select(0, sel)
    a = _activations(_in_proj(x2, wi).reshape(x2.shape[0], -1, r), bi, act)
    y = _down(a, w_dt, sel)
    if b_down is not None:
        y = y + b_down
    return _finish(y, x, out)


def sparse_mlp_threshold(x: Tensor, w_in: Tensor, w_dt: Tensor, b_in: Tensor | None,
                         b_down: Tensor | None, act: int, tau: float, mode: int,
                         out: Tensor | None = None) -> tuple[Tensor, int]:
    """Fallback of the C++ ``sparse_mlp_threshold``; returns (y, neurons kept)."""
    d_ff, r, d = w_in.shape
    x2 = _rows(x, d)
    if r == 2 and mode == _GATE_MODE:
        g = _in_proj(x2, w_in[:, 0])
        if b_in is not None:
            g = g + b_in[:, 0]
        ga = _ACT_FNS[act](g)
        mask = ga.abs() > tau
        keep = mask.any(0).nonzero().squeeze(1)
        u = _in_proj(x2, w_in[:, 1].index_select(0, keep))
        if b_in is not None:
            u = u + b_in[keep, 1]
        a = ga[:, keep] * u
    else:
        a_all = _activations(_in_proj(x2, w_in.reshape(d_ff * r, d)).reshape(-1, d_ff, r),
                             b_in, act)
        mask = a_all.abs() > tau
        keep = mask.any(0).nonzero().squeeze(1)
        a = a_all[:, keep]
    a = a * mask[:, keep]
    y = _down(a, w_dt, keep)
    if b_down is not None:
        y = y + b_down
    return _finish(y, x, out), int(keep.numel())


def rows_matvec(x: Tensor, w: Tensor, b: Tensor | None, out: Tensor | None = None) -> Tensor:
    """Fallback of the C++ ``rows_matvec``."""
    y = F.linear(x.float(), w.float(), b)
    if out is not None:
        out.copy_(y)
        return out
    return y


def input_sparse_linear(x: Tensor, wt: Tensor, b: Tensor | None, idx: Tensor | None,
                        tau: float | None, out: Tensor | None = None) -> Tensor:
    """Fallback of the C++ ``input_sparse_linear`` (see the public wrapper)."""
    d_in, d_out = wt.shape
    x2 = _rows(x, d_in)
    if idx is None and tau is None:
        y = _down(x2, wt, None)
    else:
        if idx is not None:
            sel = _index(idx, d_in)
            coef = x2[:, sel]
        else:
            mask = x2.abs() > tau
            sel = mask.any(0).nonzero().squeeze(1)
            coef = (x2 * mask)[:, sel]
        y = _down(coef, wt, sel)
    if b is not None:
        y = y + b
    return _finish(y, x, out)


def sketch_act(x: Tensor, codes: Tensor, scales: Tensor, bias: Tensor | None, act: int) -> Tensor:
    """Fallback of the C++ ``sketch_act``: int8-sketch activations ``a~`` ``[n, d_ff]``."""
    d_ff, r, d = codes.shape
    x2 = _rows(x, d)
    pre = F.linear(x2, codes.reshape(d_ff * r, d).float()) * scales.reshape(-1)
    if bias is not None:
        pre = pre + bias.reshape(-1)
    return _activations(pre.reshape(-1, d_ff, r), None, act)


def sketch_mlp(x: Tensor, codes: Tensor, scales: Tensor, sk_bias: Tensor | None, down_norm: Tensor,
               tau: float, w_in: Tensor, w_dt: Tensor, b_in: Tensor | None, b_down: Tensor | None,
               act: int, reuse: bool, out: Tensor | None = None) -> tuple[Tensor, int]:
    """Fallback of the C++ ``sketch_mlp``; returns (y, most neurons kept by one row)."""
    d = w_in.shape[2]
    x2 = _rows(x, d)
    ys, kept = [], 0
    for row in x2:
        a = sketch_act(row, codes, scales, sk_bias, act)[0]
        keep = ((a.abs() * down_norm) > tau).nonzero().squeeze(1)
        kept = max(kept, int(keep.numel()))
        if reuse:
            y = _down(a[keep][None], w_dt, keep)[0]
            ys.append(y if b_down is None else y + b_down)
        else:
            ys.append(sparse_mlp(row, w_in, w_dt, b_in, b_down, keep, act))
    return _finish(torch.stack(ys), x, out), kept


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """Fallback of the C++ ``rms_norm``."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rope_(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    """Rotary embedding in place on ``x [..., hd]`` (rotate-half pairing, first ``2*len(cos)`` dims)."""
    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half:2 * half]
    t = x1 * sin
    x1.mul_(cos).addcmul_(x2, sin, value=-1.0)
    x2.mul_(cos).add_(t)


@contextlib.contextmanager
def one_thread(when: bool = True) -> Iterator[None]:
    """Run the block on one intra-op thread (when ``when``), restoring the count after.

    Attention at decode (and short-prompt prefill) sizes is microseconds of work per op,
    but bmm and softmax still enter an OpenMP region; with 2 threads on a busy 2-core
    machine each region can wait milliseconds for a descheduled thread (measured 48 ms vs
    29 us per layer). set_num_threads costs ~0.3 us.
    """
    threads = torch.get_num_threads()
    if not when or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def attn_decode(q: Tensor, k: Tensor, v: Tensor, kc: Tensor, vc: Tensor, pos: int, lo: int,
                cos: Tensor | None, sin: Tensor | None, scale: float, softcap: float) -> Tensor:
    """One decode position of attention (RoPE, cache write, softmax(q.K) V) with ATen ops."""
    n_kv, length, hd = kc.shape
    if not 0 <= lo <= pos < length:
        raise ValueError(f"attn_decode: need 0 <= lo <= pos < cache length, got lo={lo} pos={pos} S={length}")
    heads = q.numel() // hd
    q, k = q.reshape(heads, hd).clone(), k.reshape(n_kv, hd).clone()
    if cos is not None:
        rope_(q, cos, sin)
        rope_(k, cos, sin)
    kc[:, pos] = k
    vc[:, pos] = v.reshape(n_kv, hd)
    with one_thread():
        scores = torch.bmm((q * scale).view(n_kv, heads // n_kv, hd), kc[:, lo:pos + 1].transpose(1, 2))
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        out = torch.bmm(torch.softmax(scores, dim=-1), vc[:, lo:pos + 1])
    return out.reshape(heads * hd)
