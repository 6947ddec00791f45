"""Pure-PyTorch fallback of quant_kernels.cpp: same signatures, same semantics.

The activation row is quantized exactly as the C++ code does it (same fp32 operations,
round-half-even), block integer dot products are exact (products and sums of small
integers in fp32 are exact below 2^24), and only the final fp32 sums over blocks may
round differently. Rows are processed in chunks so no full fp32 copy of a large matrix
(an lm_head) is materialised.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_ACT_FNS = (F.silu, F.gelu, lambda t: F.gelu(t, approximate="tanh"), F.relu)
_BLK = 32
_CHUNK = 4096  # weight rows per step
_GATE_MODE, _ACT_MODE = 1, 2


def quantize_act(x: Tensor, nb: int) -> tuple[Tensor, Tensor]:
    """Rows of x -> (int8 codes [n, nb*32], fp32 scales [n, nb]), as the kernels do it."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    n, cols = x2.shape
    if nb * _BLK < cols:
        raise ValueError(f"quantize_act: {nb} blocks cannot hold {cols} columns")
    blk = F.pad(x2, (0, nb * _BLK - cols)).view(n, nb, _BLK)
    amax = blk.abs().amax(-1)
    dx = amax / 127
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0).div(amax), torch.zeros_like(amax))
    q = (blk * inv.unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8)
    return q.reshape(n, nb * _BLK), dx


def _codes(fmt: int, qs: Tensor, nb: int) -> Tensor:
    """float32 [rows, nb, 32] codes."""
    rows = qs.shape[0]
    if fmt == 0:
        return qs.view(rows, nb, _BLK).float()
    packed = qs.view(rows, nb, _BLK // 2)
    return torch.cat((packed & 0x0F, packed >> 4), dim=-1).float()


def _dots(x: Tensor, fmt: int, qs: Tensor, d: Tensor, m: Tensor | None, ids: Tensor | None) -> Tensor:
    """W[ids] . x for every row of x [n, cols] -> [n, k] float32."""
    nb = d.shape[1]
    xq, dx = quantize_act(x, nb)
    xf = xq.view(-1, nb, _BLK).float()
    sx = dx * xf.sum(-1)
    total = qs.shape[0] if ids is None else ids.numel()
    outs = []
    for lo in range(0, total, _CHUNK):
        sel = slice(lo, min(total, lo + _CHUNK))
        rows = sel if ids is None else ids[sel]
        w = _codes(fmt, qs[rows], nb)
        isum = torch.einsum("rbk,nbk->nrb", w, xf)  # exact integers
        y = (isum * (d[rows].float().unsqueeze(0) * dx.unsqueeze(1))).sum(-1)
        if m is not None:
            y = y + (m[rows].float().unsqueeze(0) * sx.unsqueeze(1)).sum(-1)
        outs.append(y)
    return torch.cat(outs, dim=1) if outs else x.new_zeros(x.shape[0], 0)


def _combine(a: Tensor, fmt: int, cols: int, qs: Tensor, d: Tensor, m: Tensor | None,
             ids: Tensor) -> Tensor:
    """sum_p a[:, p] * dequant(W[ids[p]]) for a [n, k] -> [n, cols]."""
    nb = d.shape[1]
    y = a.new_zeros(a.shape[0], nb * _BLK)
    for lo in range(0, ids.numel(), _CHUNK):
        rows = ids[lo:lo + _CHUNK]
        w = _codes(fmt, qs[rows], nb) * d[rows].float().unsqueeze(-1)
        if m is not None:
            w = w + m[rows].float().unsqueeze(-1)
        y = y + a[:, lo:lo + _CHUNK] @ w.reshape(rows.numel(), -1)
    return y[:, :cols]


def _rows(x: Tensor, width: int, what: str) -> Tensor:
    if x.dim() not in (1, 2) or x.shape[-1] != width:
        raise ValueError(f"{what}: input must be [{width}] or [n, {width}], got {list(x.shape)}")
    return x.reshape(-1, width).float()


def _finish(y: Tensor, x: Tensor, out: Tensor | None) -> Tensor:
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y if out is None else out.copy_(y)


def _index(idx: Tensor, limit: int) -> Tensor:
    idx = idx.reshape(-1).long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= limit):
        raise IndexError(f"index out of range [0, {limit})")
    return idx


def q_matvec(x: Tensor, fmt: int, cols: int, qs: Tensor, d: Tensor, m: Tensor | None,
             rows: Tensor | None, bias: Tensor | None, out: Tensor | None) -> Tensor:
    """y[., j] = W[rows[j]] . x (+ bias[rows[j]])."""
    x2 = _rows(x, cols, "q_matvec")
    ids = None if rows is None else _index(rows, qs.shape[0])
    y = _dots(x2, fmt, qs, d, m, ids)
    if bias is not None:
        y = y + (bias if ids is None else bias[ids])
    return _finish(y, x, out)


def q_axpy(a: Tensor, fmt: int, cols: int, qs: Tensor, d: Tensor, m: Tensor | None,
           rows: Tensor | None, tau: float | None, bias: Tensor | None, out: Tensor | None) -> Tensor:
    """y = sum_{r in rows} a[r] * dequant(W[r]) (+ bias); tau picks rows with |a[r]| > tau."""
    n_rows = qs.shape[0]
    a2 = _rows(a, n_rows, "q_axpy")
    if rows is not None:
        ids = _index(rows, n_rows)
        coef = a2[:, ids]
    else:
        ids = torch.arange(n_rows)
        coef = a2 if tau is None else torch.where(a2.abs() > tau, a2, torch.zeros_like(a2))
    y = _combine(coef, fmt, cols, qs, d, m, ids)
    if bias is not None:
        y = y + bias
    return _finish(y, a, out)


def _neuron_coefs(x2: Tensor, fmt: int, qs: Tensor, d: Tensor, m: Tensor | None, r: int,
                  b_in: Tensor | None, act: int, ids: Tensor | None, gate_only: bool) -> tuple[Tensor, Tensor]:
    """(activation (or act(gate)) [n, k], act(gate) [n, k]) of neurons ids."""
    d_ff = qs.shape[0] // r
    neu = torch.arange(d_ff) if ids is None else ids
    act_fn = _ACT_FNS[act]
    b = None if b_in is None else b_in.reshape(d_ff, r)
    first = _dots(x2, fmt, qs, d, m, neu * r)
    if b is not None:
        first = first + b[neu, 0]
    g = act_fn(first)
    if r == 1 or gate_only:
        return g, g
    up = _dots(x2, fmt, qs, d, m, neu * r + 1)
    if b is not None:
        up = up + b[neu, 1]
    return g * up, g


def q_mlp(x: Tensor, fmt_in: int, qs_in: Tensor, d_in: Tensor, m_in: Tensor | None,
          fmt_dt: int, qs_dt: Tensor, d_dt: Tensor, m_dt: Tensor | None, b_in: Tensor | None,
          b_down: Tensor | None, idx: Tensor | None, act: int, mode: int, tau: float,
          down_norm: Tensor | None, out: Tensor | None) -> tuple[Tensor, int]:
    """Fused quantized MLP; returns (y, kept neurons summed over the rows of x)."""
    d = x.shape[-1]
    d_ff = qs_dt.shape[0]
    r = qs_in.shape[0] // d_ff
    if idx is not None and mode != 0:
        raise ValueError("q_mlp: idx and a threshold mode are exclusive")
    x2 = _rows(x, d, "q_mlp")
    ids = torch.arange(d_ff) if idx is None else _index(idx, d_ff)
    coef, gate = _neuron_coefs(x2, fmt_in, qs_in, d_in, m_in, r, b_in, act, ids, False)
    if mode == _GATE_MODE:
        keep = gate.abs() > tau
    elif mode == _ACT_MODE:
        score = coef.abs() if down_norm is None else coef.abs() * down_norm[ids]
        keep = score > tau
    else:
        keep = torch.ones_like(coef, dtype=torch.bool)
    coef = torch.where(keep, coef, torch.zeros_like(coef))
    y = _combine(coef, fmt_dt, d, qs_dt, d_dt, m_dt, ids)
    if b_down is not None:
        y = y + b_down
    return _finish(y, x, out), int(keep.sum())


def q_mlp_act(x: Tensor, fmt_in: int, qs_in: Tensor, d_in: Tensor, m_in: Tensor | None, r: int,
              b_in: Tensor | None, act: int, gate_only: bool) -> Tensor:
    """Activations (gate_only: act(gate)) of every neuron: [n, d_ff]."""
    x2 = _rows(x, x.shape[-1], "q_mlp_act")
    return _neuron_coefs(x2, fmt_in, qs_in, d_in, m_in, r, b_in, act, None, gate_only)[0]
