"""Parallel vs sequential: one forward pass and token-by-token decoding with the KV cache
must give the same MLP activations up to float tolerance (a check of the capture path and
of the claim that sequence-level statistics can be gathered in one prefill pass)."""
from __future__ import annotations

import torch
from torch import nn

from ..capture import capture_raw
from .common import jaccard, kcount, layers_of, topk_mask


def parallel_vs_sequential(model: nn.Module, seqs: list[torch.Tensor], bos: torch.Tensor,
                           k_ratio: float = 0.3) -> dict:
    """Max |a_parallel - a_sequential| per layer (absolute and relative to max |a|), and top-k agreement."""
    layers = layers_of(model)
    ids = torch.stack([torch.cat([bos, s]) for s in seqs])
    with capture_raw(model, None, ("act",)) as raw, torch.inference_mode():
        model(ids, use_cache=False)
    par = {i: v[0] for i, v in raw["act"].items()}
    with capture_raw(model, None, ("act",)) as raw, torch.inference_mode():
        cache = None
        for t in range(ids.shape[1]):
            out = model(ids[:, t: t + 1], cache=cache, use_cache=True, logits_to_keep=1)
            cache = out.cache
    seq = {i: torch.cat(v, dim=1) for i, v in raw["act"].items()}
    rows = []
    for i, ml in enumerate(layers):
        d = (par[i] - seq[i]).abs()
        k = kcount(k_ratio, ml.d_ff)
        rows.append({"max_abs_diff": float(d.max()),
                     "max_rel_diff": float(d.max() / par[i].abs().max().clamp_min(1e-30)),
                     "topk_jaccard": float(jaccard(topk_mask(par[i].abs(), k),
                                                   topk_mask(seq[i].abs(), k)).mean())})
    return {"tokens": int(ids.numel()), "layers": rows,
            "max_abs_diff": max(r["max_abs_diff"] for r in rows),
            "max_rel_diff": max(r["max_rel_diff"] for r in rows),
            "min_topk_jaccard": min(r["topk_jaccard"] for r in rows)}
