"""Semantic-irrelevant activation inertia: do the first tokens' neurons keep firing later?

For natural sentences and for uniform random-token sequences of the same length, per
layer, with ratio ``k = inertia_k``:

* the "first activations" set: GRIFFIN's statistic over the first ``n`` tokens, ``Z`` =
  rows of ``|a|`` normalised to unit L2, ``s_i = ||Z[:, i]||_2``, set = top-k of ``s``;
* for every later token, its own active set = top-k of ``|a|``; ``overlap`` = share of
  the token's set inside the first-activations set (chance = k), by distance from the
  end of the first span (``distance_bins``), and averaged (``overlap_natural`` /
  ``overlap_random``);
* ``cross_sequence``: the same overlap with the first-activations set of a *different*
  sequence of the same kind (is the set specific to the sequence, or generic?);
* always-on neurons: share of tokens each neuron is in the top-k; ``always_on_jaccard``
  compares the ``top 5 %`` most-often-on neurons of natural vs random input, and
  ``always_on_90`` counts neurons on for > 90 % of tokens in each kind (Jaccard null if
  both sets are empty).

The same numbers are measured a second time with the set chosen from a ``prompt_n``-token
prompt (default 256, the prompt length the sequence methods select from), reported under
``from_prompt``: the first 16 tokens are what the seed paper's figure uses, the long prompt
is what GRIFFIN and TDA actually see.

``semantic_irrelevant`` is true for a layer when ``overlap_random >= overlap_natural -
inertia_tolerance``: random text shows the inertia as strongly as natural text.
"""
from __future__ import annotations

import torch
from torch import nn

from .common import AnalyzeConfig, jaccard, kcount, layers_of, run_acts, topk_mask

N_BINS = 8


def griffin_scores(a: torch.Tensor) -> torch.Tensor:
    """GRIFFIN's statistic for ``a [..., n, d_ff]``: column norms of the row-normalised ``|a|``."""
    z = a.abs()
    z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return z.norm(dim=-2)


def _kind_stats(model: nn.Module, seqs: list[torch.Tensor], n: int, k_ratio: float, bos: torch.Tensor,
                tick) -> list[dict]:
    """Per layer: overlap of later tokens' top-k with the first-``n`` set, by distance too.

    Activations become masks batch by batch, so a long prompt on a wide model does not hold
    every layer's float activations at once.
    """
    layers = layers_of(model)
    ids = torch.stack([torch.cat([bos, s]) for s in seqs])
    first: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    later: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    on: dict[int, torch.Tensor] = {}
    for b in range(0, len(ids), 3):                       # small batches keep memory low
        raw = run_acts(model, ids[b: b + 3])["act"]
        for i, a in raw.items():
            a = a[:, len(bos):]
            k = kcount(k_ratio, a.shape[-1])
            first[i].append(topk_mask(griffin_scores(a[:, :n]), k))   # [s, d_ff]
            later[i].append(topk_mask(a[:, n:].abs(), k))             # [s, T-n, d_ff]
            rate = topk_mask(a.abs(), k).float().sum((0, 1))
            on[i] = rate if i not in on else on[i] + rate
        del raw
        tick()
    out = []
    for i, ml in enumerate(layers):
        k = kcount(k_ratio, ml.d_ff)
        f, lt = torch.cat(first.pop(i)), torch.cat(later.pop(i))
        ov = (lt & f[:, None]).sum(-1).float() / k                   # [S, T-n]
        cross = (lt & f.roll(1, dims=0)[:, None]).sum(-1).float() / k
        bins = torch.linspace(0, ov.shape[1], N_BINS + 1).long()
        by_dist = [float(ov[:, bins[j]: bins[j + 1]].mean()) for j in range(N_BINS)]
        out.append({"overlap": float(ov.mean()), "cross_sequence": float(cross.mean()),
                    "by_distance": by_dist,
                    "distance_centres": [float((bins[j] + bins[j + 1]) / 2 + 1) for j in range(N_BINS)],
                    "on_rate": on[i] / (ids.shape[0] * (ids.shape[1] - len(bos)))})
    return out


def layer_mean(rows: list[dict]) -> dict:
    """Layer means of the float numbers of ``rows``. A layer with no always-on neuron in either
    kind has no ``always_on_90_jaccard`` (None): that mean is over the layers that have one."""
    keys = [k for k, v in rows[0].items() if isinstance(v, float) or k == "always_on_90_jaccard"]
    vals = {k: [r[k] for r in rows if r[k] is not None] for k in keys}
    return {k: (sum(v) / len(v) if v else None) for k, v in vals.items()}


def inertia(model: nn.Module, natural: list[torch.Tensor], random: list[torch.Tensor],
            cfg: AnalyzeConfig, bos: torch.Tensor, tick=lambda: None,
            prompt_natural: list[torch.Tensor] = (), prompt_random: list[torch.Tensor] = ()) -> dict:
    """Per-layer inertia numbers for natural vs random sequences (see module doc).

    With ``prompt_natural``/``prompt_random`` (sequences of ``cfg.prompt_n`` prompt tokens
    plus later ones) the same numbers are measured again with the set chosen from the whole
    prompt, as the sequence methods (GRIFFIN, TDA) choose it, under ``from_prompt``.
    """
    res = _inertia_rows(model, natural, random, cfg.first_n, cfg, bos, tick)
    res.update(sequences=len(natural), length=cfg.inertia_len)
    if prompt_natural:
        res["from_prompt"] = _inertia_rows(model, list(prompt_natural), list(prompt_random),
                                           cfg.prompt_n, cfg, bos, tick)
        res["from_prompt"].update(sequences=len(prompt_natural), length=len(prompt_natural[0]))
    return res


def _inertia_rows(model: nn.Module, natural: list[torch.Tensor], random: list[torch.Tensor], n: int,
                  cfg: AnalyzeConfig, bos: torch.Tensor, tick) -> dict:
    nat = _kind_stats(model, natural, n, cfg.inertia_k, bos, tick)
    rnd = _kind_stats(model, random, n, cfg.inertia_k, bos, tick)
    rows = []
    for a, b in zip(nat, rnd):
        d_ff = a["on_rate"].numel()
        m = kcount(0.05, d_ff)
        top_a, top_b = topk_mask(a["on_rate"], m), topk_mask(b["on_rate"], m)
        on_a, on_b = a["on_rate"] > 0.9, b["on_rate"] > 0.9
        union = int((on_a | on_b).sum())
        rows.append({
            "overlap_natural": a["overlap"], "overlap_random": b["overlap"],
            "cross_sequence_natural": a["cross_sequence"], "cross_sequence_random": b["cross_sequence"],
            "chance": kcount(cfg.inertia_k, d_ff) / d_ff,
            "by_distance_natural": a["by_distance"], "by_distance_random": b["by_distance"],
            "distance": a["distance_centres"],
            "always_on_jaccard": float(jaccard(top_a, top_b)),
            "always_on_90_natural": int(on_a.sum()), "always_on_90_random": int(on_b.sum()),
            "always_on_90_jaccard": (int((on_a & on_b).sum()) / union) if union else None,
            "semantic_irrelevant": bool(b["overlap"] >= a["overlap"] - cfg.inertia_tolerance),
        })
    mean = layer_mean(rows)
    mean["layers_semantic_irrelevant"] = sum(r["semantic_irrelevant"] for r in rows)
    mean["by_distance_natural"] = [sum(r["by_distance_natural"][j] for r in rows) / len(rows) for j in range(N_BINS)]
    mean["by_distance_random"] = [sum(r["by_distance_random"][j] for r in rows) / len(rows) for j in range(N_BINS)]
    mean["distance"] = rows[0]["distance"]
    return {"first_n": n, "k": cfg.inertia_k, "layers": rows, "mean": mean}
