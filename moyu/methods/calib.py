"""Calibration data: per-layer samples of what the hooks see, on the evaluation protocol.

Calibration runs the dense model over windows of calibration text (same prompt /
scored layout as evaluation) and keeps, per layer, a fixed-size random sample of
positions: memory is ``layers x samples x d_ff`` whatever the text length.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..arch import mlp_layers
from ..errors import MoyuError
from ..evaluate import Windows

MIN_CALIB_WINDOWS = 2


@dataclass
class CalibSamples:
    """Per layer: sampled scored positions (``a``, ``g``, ``u``, ``x``) and prompt activations."""

    a: list[list[torch.Tensor]] = field(default_factory=list)        # [n, d_ff] chunks
    g: list[list[torch.Tensor]] = field(default_factory=list)
    u: list[list[torch.Tensor]] = field(default_factory=list)
    x: list[list[torch.Tensor]] = field(default_factory=list)        # [n, d] chunks
    xa: list[list[torch.Tensor]] = field(default_factory=list)       # attention input [n, d]
    xo: list[list[torch.Tensor]] = field(default_factory=list)       # o-projection input
    prompts: list[list[torch.Tensor]] = field(default_factory=list)  # per window: [P, d_ff] or its summary

    def cat(self, name: str, layer: int) -> torch.Tensor:
        """All samples of stream ``name`` for ``layer`` as one tensor."""
        return torch.cat(getattr(self, name)[layer], 0)


def calib_starts(n_tokens: int, windows: Windows, max_windows: int) -> list[int]:
    """Window starts for calibration; one-line error if the text is too short."""
    try:
        starts = windows.starts(n_tokens)
    except MoyuError:
        starts = []
    if len(starts) < MIN_CALIB_WINDOWS:
        need = (MIN_CALIB_WINDOWS - 1) * windows.scored + windows.prompt + windows.scored + 1
        raise MoyuError(f"too little calibration text: {n_tokens} tokens, need at least {need} "
                        f"({MIN_CALIB_WINDOWS} windows); pass more text or smaller windows")
    return starts[:max_windows]


def collect(model: nn.Module, ids: torch.Tensor, windows: Windows, streams: set[str],
            per_window: int = 64, max_windows: int = 16,
            prompts: "bool | Callable[[torch.Tensor], torch.Tensor]" = False,
            seed: int = 0, progress: bool = False, during: Any = None) -> CalibSamples:
    """Run the dense model over calibration windows and sample what ``streams`` name.

    ``streams`` are any of ``a`` (MLP activation), ``g`` (gate pre-activation), ``u`` (up
    output), ``x`` (MLP input), ``xa`` (attention input) and ``xo`` (input of the attention
    output projection), sampled at ``per_window`` random scored positions per
    window. With ``prompts=True`` the full prompt activations ``a[:P]`` of every window are
    kept too (for sequence-level methods); a callable instead of ``True`` keeps only what it
    returns for each window's ``[P, d_ff]`` prompt activations (a method's statistics, far
    smaller than the activations on wide models). ``during``: a context manager (a sparsifier)
    entered after the sampling hooks, so the samples are what each module receives from
    the sparsified layers before it, before its own rule acts.
    """
    from tqdm import tqdm

    layers = mlp_layers(model)
    windows = windows.resolved(model)
    starts = calib_starts(len(ids), windows, max_windows)
    out = CalibSamples(*[[[] for _ in layers] for _ in range(7)])
    gen = torch.Generator().manual_seed(seed)
    pos: torch.Tensor = torch.empty(0, dtype=torch.long)
    p = windows.lead   # dense positions (BOS + prompt): prompt statistics include the BOS

    def keep(store: list, t: torch.Tensor) -> None:
        t = t if t.dim() == 3 else t[None]   # OPT flattens batch and time: [T, F]
        store.append(t[0, p:][pos].detach().float().clone())

    names = {"a": "act", "g": "gate", "u": "up", "x": "x", "xa": "attn_in", "xo": "o_in"}
    handles = []
    for ml in layers:
        i = ml.index
        for name in sorted(streams):
            if name == "g" and not ml.gated:
                continue
            handles.append(ml.tap(names[name], lambda t, store=getattr(out, name)[i]: keep(store, t)))
        if prompts:
            def prompt_act(a, i=i):
                a3 = a if a.dim() == 3 else a[None]
                a_p = a3[0, :p].detach().float()
                out.prompts[i].append(prompts(a_p) if callable(prompts) else a_p.clone())
            handles.append(ml.tap("act", prompt_act))
    try:
        with torch.inference_mode(), (during or contextlib.nullcontext()):
            for s in tqdm(starts, desc="calibrate", disable=not progress, leave=False):
                n = min(per_window, windows.scored)
                pos = torch.randperm(windows.scored, generator=gen)[:n]
                model(windows.window(ids, s)[None], logits_to_keep=1, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out


def block_inputs(model: nn.Module, ids: torch.Tensor, windows: Windows, n_windows: int
                 ) -> list[list[tuple[tuple, dict]]]:
    """Per decoder layer, the positional and keyword arguments of its call on each of the
    first ``n_windows`` calibration windows (dense model), to replay the layer alone."""
    layers = mlp_layers(model)
    windows = windows.resolved(model)
    starts = calib_starts(len(ids), windows, n_windows)
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in layers]

    def grab(i):
        def pre(_m, args, kwargs):
            keep = (lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v)
            calls[i].append((tuple(keep(a) for a in args), {k: keep(v) for k, v in kwargs.items()}))
        return pre

    handles = [ml.layer.register_forward_pre_hook(grab(ml.index), with_kwargs=True) for ml in layers]
    try:
        with torch.inference_mode():
            for s in starts:
                model(windows.window(ids, s)[None], logits_to_keep=1, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return calls


def quantile(values: torch.Tensor, q: float) -> float:
    """Exact q-quantile of a tensor of any size (sorts; torch.quantile caps the input size)."""
    flat = values.reshape(-1).float()
    if flat.numel() == 0:
        return 0.0
    k = min(max(int(round(q * (flat.numel() - 1))), 0), flat.numel() - 1)
    return float(torch.kthvalue(flat, k + 1).values)
