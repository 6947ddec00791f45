"""Stream statistics of MLP activations and linear inputs through forward hooks.

Nothing here keeps activations: each forward adds into fixed-size accumulators
(log-spaced histograms of magnitudes, sums, counts, per-channel moments), so capturing
100k tokens costs the same memory as 1k. :func:`capture_raw` is the one exception: it
returns the raw tensors of a span you choose, for analysis.

Streams, per decoder layer:

* ``act``  - the MLP activation ``a`` (what enters the down projection), per neuron;
* ``gate`` - ``act(gate(x))`` for gated MLPs (what CATS thresholds), per neuron;
* ``in:<role>`` - the input of each linear (``mlp`` = gate/up input, ``down`` = ``a``,
  ``attn`` = q/k/v input, ``o`` = attention-output input), per input channel.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch import nn

from .arch import MLPLayer, mlp_layers

# Magnitudes are binned on a log10 scale, 100 bins per decade from 1e-8 to 1e4.
LOG_MIN, LOG_MAX, BINS_PER_DECADE = -8.0, 4.0, 100
N_BINS = int((LOG_MAX - LOG_MIN) * BINS_PER_DECADE)


@dataclass
class StreamStats:
    """Fixed-size running statistics of one stream of ``[tokens, channels]`` values."""

    channels: int
    hist: torch.Tensor = field(init=False)        # counts of |v| in log-spaced bins, all channels
    count: int = 0                                 # tokens seen
    sum_abs: torch.Tensor = field(init=False)      # per channel sum |v|
    sum_sq: torch.Tensor = field(init=False)       # per channel sum v^2
    active: torch.Tensor = field(init=False)       # per channel count of |v| > 1e-3 * token max

    def __post_init__(self) -> None:
        self.hist = torch.zeros(N_BINS + 2, dtype=torch.float64)
        self.sum_abs = torch.zeros(self.channels, dtype=torch.float64)
        self.sum_sq = torch.zeros(self.channels, dtype=torch.float64)
        self.active = torch.zeros(self.channels, dtype=torch.float64)

    def update(self, v: torch.Tensor) -> None:
        """Add a ``[tokens, channels]`` batch."""
        v = v.detach().reshape(-1, self.channels).float()
        if v.numel() == 0:
            return
        a = v.abs()
        self.hist += log_histogram(a).double()
        self.count += v.shape[0]
        self.sum_abs += a.sum(0).double()
        self.sum_sq += (v * v).sum(0).double()
        thresh = 1e-3 * a.amax(dim=1, keepdim=True)
        self.active += (a > thresh).sum(0).double()

    def quantile(self, q: float) -> float:
        """Approximate q-quantile of ``|v|`` over all channels and tokens (bin resolution 2.3 %)."""
        return hist_quantile(self.hist, q)

    @property
    def mean_abs(self) -> torch.Tensor:
        """Per-channel mean of ``|v|``."""
        return self.sum_abs / max(self.count, 1)

    @property
    def rms(self) -> torch.Tensor:
        """Per-channel root mean square."""
        return (self.sum_sq / max(self.count, 1)).sqrt()

    @property
    def active_rate(self) -> torch.Tensor:
        """Per-channel share of tokens where ``|v|`` exceeds 1e-3 of that token's max."""
        return self.active / max(self.count, 1)

    def nbytes(self) -> int:
        """Memory held by the accumulators."""
        return sum(t.numel() * t.element_size() for t in (self.hist, self.sum_abs, self.sum_sq, self.active))


def log_histogram(a: torch.Tensor) -> torch.Tensor:
    """Counts of non-negative values in the shared log-spaced bins (first = zeros/underflow)."""
    logs = torch.log10(a.reshape(-1).clamp_min(1e-30))
    idx = ((logs - LOG_MIN) * BINS_PER_DECADE).floor().clamp(-1, N_BINS).long() + 1
    return torch.bincount(idx, minlength=N_BINS + 2)


def bin_edge(i: int) -> float:
    """Lower edge (a magnitude) of histogram bin ``i`` of :func:`log_histogram`."""
    if i <= 0:
        return 0.0
    return 10 ** (LOG_MIN + (i - 1) / BINS_PER_DECADE)


def hist_quantile(hist: torch.Tensor, q: float) -> float:
    """Quantile from a :func:`log_histogram`, interpolating geometrically inside the bin."""
    total = float(hist.sum())
    if total == 0:
        return 0.0
    target = q * total
    cum = torch.cumsum(hist, 0)
    i = int(torch.searchsorted(cum, torch.tensor(target, dtype=cum.dtype)).clamp(max=len(hist) - 1))
    before = float(cum[i - 1]) if i > 0 else 0.0
    frac = (target - before) / max(float(hist[i]), 1e-12)
    lo, hi = bin_edge(i), bin_edge(i + 1)
    if lo == 0.0:
        return hi * frac
    return lo * math.exp(frac * math.log(hi / lo))


class Capture:
    """Forward hooks that stream :class:`StreamStats` per layer; use as a context manager.

    ``streams`` picks what to collect: any of ``"act"``, ``"gate"``, ``"inputs"``.
    ``positions`` (a slice over the sequence axis) restricts statistics to part of each
    sequence, e.g. the generated part of a prompt+continuation window.
    """

    def __init__(self, model: nn.Module, streams: Iterable[str] = ("act",),
                 positions: slice | None = None):
        self.model = model
        self.streams = set(streams)
        unknown = self.streams - {"act", "gate", "inputs"}
        if unknown:
            raise ValueError(f"unknown capture streams {sorted(unknown)}")
        self.positions = positions or slice(None)
        self.layers: list[MLPLayer] = mlp_layers(model)
        self.stats: list[dict[str, StreamStats]] = [{} for _ in self.layers]
        self._handles: list = []

    def _add(self, layer: int, name: str, v: torch.Tensor) -> None:
        v = v[:, self.positions] if v.dim() == 3 else v
        st = self.stats[layer].get(name)
        if st is None:
            st = self.stats[layer][name] = StreamStats(v.shape[-1])
        st.update(v)

    def __enter__(self) -> "Capture":
        taps = {"act": [("act", "act")], "gate": [("gate", "gate")],
                "inputs": [("act", "in:down"), ("x", "in:mlp"), ("attn_in", "in:attn"), ("o_in", "in:o")]}
        for ml in self.layers:
            for want in sorted(self.streams):
                for stream, name in taps[want]:
                    if stream == "gate" and not ml.gated:
                        continue
                    if stream == "gate":
                        fn = lambda g, ml=ml, name=name: self._add(ml.index, name, ml.act(g))
                    else:
                        fn = lambda t, i=ml.index, name=name: self._add(i, name, t)
                    self._handles.append(ml.tap(stream, fn))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def nbytes(self) -> int:
        """Memory held by all accumulators (independent of tokens seen)."""
        return sum(s.nbytes() for layer in self.stats for s in layer.values())


def run_batches(model: nn.Module, ids: torch.Tensor, window: int, progress: bool = False) -> None:
    """Forward ``ids`` (1-D) through ``model`` in consecutive windows, without gradients."""
    from tqdm import tqdm

    starts = range(0, max(len(ids) - 1, 1), window)
    with torch.inference_mode():
        for s in tqdm(starts, disable=not progress, desc="capture", leave=False):
            chunk = ids[s: s + window]
            if len(chunk) > 1:
                model(chunk[None], logits_to_keep=1)


def stream_stats(model: nn.Module, ids: torch.Tensor, streams: Iterable[str] = ("act",),
            window: int = 512, progress: bool = False) -> Capture:
    """Stream statistics of ``ids`` through ``model``; returns the finished :class:`Capture`."""
    with Capture(model, streams) as cap:
        run_batches(model, ids, window, progress)
    return cap


@contextmanager
def capture_raw(model: nn.Module, layers: Iterable[int] | None = None,
                what: tuple[str, ...] = ("act",)) -> Iterator[dict[str, dict[int, list[torch.Tensor]]]]:
    """Keep the raw tensors of chosen layers for the forwards run inside the block.

    Yields ``{stream: {layer: [tensor per forward]}}`` with streams from ``act`` (the MLP
    activation ``a``), ``x`` (the MLP input) and ``gate`` (``act(gate(x))``). Memory grows
    with tokens: use it for analysis spans only.
    """
    mls = mlp_layers(model)
    chosen = set(range(len(mls)) if layers is None else layers)
    out: dict[str, dict[int, list[torch.Tensor]]] = {w: {i: [] for i in chosen} for w in what}
    handles = []
    for ml in mls:
        if ml.index not in chosen:
            continue
        for w in what:
            if w == "gate" and not ml.gated:
                continue
            conv = (lambda t, ml=ml: ml.act(t)) if w == "gate" else (lambda t: t)
            handles.append(ml.tap(w, lambda t, w=w, i=ml.index, conv=conv:
                                  out[w][i].append(conv(t).detach().float().clone())))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
