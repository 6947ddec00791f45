"""Bootstrap confidence intervals for evaluation metrics, from per-token arrays.

Scored tokens are not independent (neighbouring tokens share context), so the
bootstrap resamples *contiguous blocks* of scored tokens (moving-block style, with
non-overlapping blocks; default 128 tokens) with replacement, and recomputes every
metric on each resample. Metrics of the modified model that are measured against dense
(the perplexity ratio, the perplexity difference, KL, top-1 agreement) use the *same*
resampled blocks for both models, so the interval reflects only how the two differ:
dense against itself gives exactly 0 (ratio exactly 1).

Cheap: per-block sums are taken once, and each resample is a gather-and-sum over
blocks (numpy); no model forward is repeated.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .errors import MoyuError


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are drawn: block length in scored tokens, resamples, level, seed."""

    block: int = 128
    resamples: int = 2000
    level: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block < 1 or self.resamples < 1 or not 0 < self.level < 1:
            raise MoyuError("bootstrap needs block >= 1, resamples >= 1 and 0 < level < 1")

    def meta(self) -> dict[str, float | int]:
        """The settings, for a result's JSON."""
        return asdict(self)


def block_sums(values: np.ndarray, block: int) -> np.ndarray:
    """Sums of consecutive blocks of ``block`` entries (the last block may be shorter)."""
    v = np.asarray(values, dtype=np.float64)
    starts = np.arange(0, len(v), block)
    return np.add.reduceat(v, starts) if len(v) else np.zeros(0)


def _draws(n_blocks: int, boot: Bootstrap) -> np.ndarray:
    """``[resamples, n_blocks]`` block indices, drawn with replacement (fixed seed)."""
    rng = np.random.default_rng(boot.seed)
    return rng.integers(0, n_blocks, size=(boot.resamples, n_blocks))


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def intervals(nll: np.ndarray, nll_dense: np.ndarray | None = None, kl: np.ndarray | None = None,
              agree: np.ndarray | None = None, boot: Bootstrap = Bootstrap()) -> dict[str, list[float]]:
    """Percentile block-bootstrap intervals, keyed ``<metric>_ci`` as ``[low, high]``.

    ``nll``: per scored token, the negative log-likelihood of the evaluated model (dense
    when no modifier). With ``nll_dense`` (same tokens, dense model), also ``dense_ppl_ci``
    and the paired ``ppl_ratio_ci`` / ``ppl_diff_ci``; ``kl`` and ``agree`` (0/1 per token)
    give ``kl_ci`` and ``top1_agree_ci``. Every metric is recomputed on the same resampled
    blocks.
    """
    n = len(nll)
    if n == 0:
        raise MoyuError("no scored tokens to bootstrap: evaluate on a longer text")
    for name, arr in (("nll_dense", nll_dense), ("kl", kl), ("agree", agree)):
        if arr is not None and len(arr) != n:
            raise MoyuError(f"bootstrap: {name} has {len(arr)} tokens, nll has {n}")
    counts = block_sums(np.ones(n), boot.block)
    idx = _draws(len(counts), boot)
    tot = counts[idx].sum(1)

    def mean(values: np.ndarray) -> np.ndarray:
        return block_sums(values, boot.block)[idx].sum(1) / tot

    nll = np.asarray(nll, dtype=np.float64)
    m_nll = mean(nll)
    out = {"ppl_ci": _interval(np.exp(m_nll), boot.level)}
    if nll_dense is not None:
        d = np.asarray(nll_dense, dtype=np.float64)
        m_dense = mean(d)
        # the difference is summed per token first: identical arrays give exactly 0
        log_ratio = mean(nll - d)
        out["dense_ppl_ci"] = _interval(np.exp(m_dense), boot.level)
        out["ppl_ratio_ci"] = _interval(np.exp(log_ratio), boot.level)
        out["ppl_diff_ci"] = _interval(np.exp(m_nll) - np.exp(m_dense), boot.level)
    if kl is not None:
        out["kl_ci"] = _interval(mean(kl), boot.level)
    if agree is not None:
        out["top1_agree_ci"] = _interval(mean(agree), boot.level)
    return {k: [lo, hi] for k, (lo, hi) in out.items()}
