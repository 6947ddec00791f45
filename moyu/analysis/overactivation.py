"""Over-activation (MOYU): how few neurons carry each token's MLP output.

Streams the eval text through forward hooks on every down projection and keeps only
fixed-size accumulators per layer, so memory does not grow with the number of tokens.
Contribution score of neuron i for a token: ``c_i = |a_i| * ||W_down[:, i]||_2``
(an upper bound of ``||n_i||`` that is exact, since ``n_i = a_i W_down[:, i]``).

Per layer:

* ``share_50/90/99``: mean over tokens of the share of neurons, taken by descending
  ``c_i``, whose ``c`` sums to 50/90/99 % of the token's total ``sum_i c_i``;
* ``natural_sparsity``: mean share of neurons with ``|a_i| < 1e-3 * max_j |a_j|``;
* heavy hitters: share of neurons "active" for more than ``hh_rate`` of the tokens, with
  two definitions of active: in the token's top-``hh_keep`` kept set by ``c``
  (``heavy_hitters_topk``) or ``|a_i| >= 1e-3 * max |a|`` (``heavy_hitters_thresh``);
* CETT curve, exact per token on a subsample: keep the top ``k`` neurons by ``c``; the
  dropped part ``sum_{i not kept} n_i`` is one masked matmul per grid point, and
  ``CETT(k) = ||dropped|| / ||h||`` with ``h = a W_down^T`` (down bias excluded: it is
  always computed). ``sparsity_at_cett`` interpolates, per token, the largest sparsity
  whose CETT stays at or below 0.1 / 0.2 / 0.3, then averages over tokens.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..capture import N_BINS, log_histogram
from .common import AnalyzeConfig, kcount, layers_of

CETT_LEVELS = (0.1, 0.2, 0.3)
MASS_LEVELS = (0.5, 0.9, 0.99)


class _LayerAcc:
    def __init__(self, d_ff: int, wn: torch.Tensor, w_down: torch.Tensor, cfg: AnalyzeConfig):
        self.d_ff, self.wn, self.w_down, self.cfg = d_ff, wn, w_down, cfg
        self.hist = torch.zeros(N_BINS + 2, dtype=torch.float64)
        self.count = 0
        self.share = torch.zeros(len(MASS_LEVELS), dtype=torch.float64)
        self.natural = 0.0
        self.on_topk = torch.zeros(d_ff, dtype=torch.float64)
        self.on_thresh = torch.zeros(d_ff, dtype=torch.float64)
        self.block = -(-d_ff // cfg.cett_grid)                        # neurons per grid step
        self.grid = (torch.arange(cfg.cett_grid + 1) * self.block).clamp(max=d_ff).float() / d_ff
        self.cett_sum = torch.zeros(len(self.grid), dtype=torch.float64)
        self.cett_n = 0
        self.need_keep: list[torch.Tensor] = []   # [tokens, len(CETT_LEVELS)], at most cett_tokens rows
        self.max_abs = 0.0

    def update(self, a: torch.Tensor, cett_rows: torch.Tensor) -> None:
        a = a.reshape(-1, self.d_ff).float()
        absa = a.abs()
        self.max_abs = max(self.max_abs, float(absa.max()))
        self.hist += log_histogram(absa).double()
        self.count += a.shape[0]
        c = absa * self.wn
        srt = c.sort(dim=-1, descending=True).values
        cs = srt.cumsum(-1)
        total = cs[:, -1:].clamp_min(1e-30)
        for j, q in enumerate(MASS_LEVELS):
            need = (cs < q * total).sum(-1) + 1
            self.share[j] += (need.clamp(max=self.d_ff).double() / self.d_ff).sum()
        tmax = absa.amax(-1, keepdim=True)
        self.natural += float((absa < 1e-3 * tmax).double().mean(-1).sum())
        self.on_thresh += (absa >= 1e-3 * tmax).double().sum(0)
        kth = srt[:, kcount(self.cfg.hh_keep, self.d_ff) - 1: kcount(self.cfg.hh_keep, self.d_ff)]
        self.on_topk += (c >= kth).double().sum(0)
        room = self.cfg.cett_tokens - self.cett_n
        if room > 0 and len(cett_rows):
            self._cett(a[cett_rows[:room]], c[cett_rows[:room]])

    def _cett(self, a: torch.Tensor, c: torch.Tensor) -> None:
        # Per token, neurons in descending-c order cut into G equal blocks; block sums of the
        # n_i vectors (one batched matmul, no [tokens, d_ff, d] product) and their prefix
        # sums give the kept part at every grid point; dropped = h - kept.
        G, B = self.cfg.cett_grid, self.block
        wt = self.w_down.T                                             # [d_ff, d]
        pad = G * B - self.d_ff
        idx = c.argsort(dim=-1, descending=True)
        cett = torch.empty(a.shape[0], G + 1)
        for s in range(0, a.shape[0], 8):
            ii = idx[s: s + 8]
            m = ii.shape[0]
            av = torch.nn.functional.pad(a[s: s + 8].gather(-1, ii), (0, pad))
            wv = torch.nn.functional.pad(wt[ii], (0, 0, 0, pad))       # [m, G*B, d]
            blocks = torch.bmm(av.view(m * G, 1, B), wv.view(m * G, B, -1)).view(m, G, -1)
            kept = torch.cat([torch.zeros_like(blocks[:, :1]), blocks.cumsum(1)], 1)  # [m, G+1, d]
            h = kept[:, -1:]
            cett[s: s + 8] = (h - kept).norm(dim=-1) / h.norm(dim=-1).clamp_min(1e-30)
        self.cett_sum += cett.double().sum(0)
        self.cett_n += a.shape[0]
        self.need_keep.append(torch.stack([_keep_for(cett, self.grid, t) for t in CETT_LEVELS], -1))

    def result(self) -> dict:
        n = max(self.count, 1)
        on_topk, on_thr = self.on_topk / n, self.on_thresh / n
        curve = (self.cett_sum / max(self.cett_n, 1)).tolist()
        need = torch.cat(self.need_keep) if self.need_keep else torch.ones(1, len(CETT_LEVELS))
        return {
            "tokens": self.count,
            "share_50": float(self.share[0] / n),
            "share_90": float(self.share[1] / n),
            "share_99": float(self.share[2] / n),
            "natural_sparsity": self.natural / n,
            "heavy_hitters_topk": float((on_topk > self.cfg.hh_rate).double().mean()),
            "heavy_hitters_thresh": float((on_thr > self.cfg.hh_rate).double().mean()),
            "max_abs_act": self.max_abs,
            "cett_tokens": self.cett_n,
            "cett_curve": {"sparsity": [1 - float(g) for g in self.grid], "cett": curve},
            **{f"sparsity_at_cett_{t}": float(1 - need[:, j].mean()) for j, t in enumerate(CETT_LEVELS)},
            "hist": self.hist.tolist(),
        }


def _keep_for(cett: torch.Tensor, grid: torch.Tensor, target: float) -> torch.Tensor:
    """Per token, the smallest keep ratio with CETT <= target (linear between grid points)."""
    ok = cett <= target                                   # monotone in keep ratio up to noise
    first = torch.where(ok.any(-1), ok.float().argmax(-1), torch.full((cett.shape[0],), len(grid) - 1))
    prev = (first - 1).clamp_min(0)
    c_hi, c_lo = cett.gather(-1, prev[:, None])[:, 0], cett.gather(-1, first[:, None])[:, 0]
    g_hi, g_lo = grid[prev], grid[first]
    frac = ((c_hi - target) / (c_hi - c_lo).clamp_min(1e-12)).clamp(0, 1)
    return torch.where(first > 0, g_hi + frac * (g_lo - g_hi), g_lo)


def gaussian_reference(d_ff: int, wn: torch.Tensor, n: int = 256, seed: int = 0) -> dict[str, float]:
    """``share_50/90/99`` for iid Gaussian activations with this layer's ``||W_down[:, i]||``."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(n, d_ff, generator=g).abs() * wn
    cs = c.sort(dim=-1, descending=True).values.cumsum(-1)
    total = cs[:, -1:]
    return {f"share_{round(q * 100)}": float(((cs < q * total).sum(-1) + 1).double().mean() / d_ff)
            for q in MASS_LEVELS}


def overactivation(model: nn.Module, stream: torch.Tensor, cfg: AnalyzeConfig,
                   bos: torch.Tensor, tick=lambda: None) -> dict:
    """Stream ``stream`` (1-D eval ids) in windows; per-layer over-activation statistics."""
    layers = layers_of(model)
    wns = [ml.down_norms() for ml in layers]
    accs = [_LayerAcc(ml.d_ff, wn, ml.w_down.detach().float(), cfg) for ml, wn in zip(layers, wns)]
    nb = len(bos)
    n_windows = math.ceil(len(stream) / cfg.window)
    per_window = math.ceil(cfg.cett_tokens / n_windows)
    state = {"rows": torch.empty(0, dtype=torch.long)}

    def hook(a, acc):
        acc.update(a[0, nb:], state["rows"])             # drop the BOS position (attention sink)

    handles = [ml.tap("act", lambda a, acc=acc: hook(a, acc)) for ml, acc in zip(layers, accs)]
    try:
        with torch.inference_mode():
            for s in range(0, len(stream), cfg.window):
                chunk = stream[s: s + cfg.window]
                if len(chunk) < 2:
                    continue
                step = max(1, (len(chunk) - 1) // per_window)
                state["rows"] = torch.arange(1, len(chunk), step)[:per_window]
                model(torch.cat([bos, chunk])[None], logits_to_keep=1)
                tick()
    finally:
        for h in handles:
            h.remove()
    per_layer = [acc.result() for acc in accs]
    ref = [gaussian_reference(ml.d_ff, wn, seed=cfg.seed + i) for i, (ml, wn) in enumerate(zip(layers, wns))]
    for r, g in zip(per_layer, ref):
        r["gaussian_share_90"] = g["share_90"]
    return {"layers": per_layer, "mean": _means(per_layer)}


def _means(per_layer: list[dict]) -> dict:
    keys = [k for k, v in per_layer[0].items() if isinstance(v, float)]
    return {k: sum(r[k] for r in per_layer) / len(per_layer) for k in keys}
