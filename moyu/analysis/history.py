"""History-related activation uncertainty, and how well the current hidden state predicts the set.

Probe spans run after K different histories (half natural text from the calibration
split, half uniform random tokens). For every probe token and layer the active set is the
top-k by contribution ``c_i = |a_i| * ||W_down[:, i]||``. Reported per layer and k:

* ``cross_history``: mean Jaccard of the same probe token's sets over all pairs of
  histories (``cross_natural``: natural-natural pairs, the number the claim is about;
  ``cross_random``: random-random; ``cross_mixed``: natural-random);
* ``same_history``: Jaccard between two separate forward passes with the same history
  (a sanity check: it must be 1);
* ``unrelated``: Jaccard between different probe tokens after the same history (floor);
  ``random_sets``: the expectation for two random k-sets, ``r / (2 - r)``.

Predictor: per layer a :func:`moyu.predictor.fit_lowrank` map from the MLP input ``x``
to ``c``, fitted on calibration tokens; ``predictor_recall`` is the share of the true
top-k it recovers on held-out eval tokens (ceiling 1, chance = k ratio).
"""
from __future__ import annotations

import itertools

import torch
from torch import nn

from ..predictor import fit_lowrank, topk_recall
from .common import AnalyzeConfig, jaccard, kcount, layers_of, run_acts, topk_mask


def _probe_acts(model: nn.Module, hists: list[torch.Tensor], probe: torch.Tensor, bos: torch.Tensor
                ) -> dict[int, torch.Tensor]:
    """Activations ``[len(hists), L, d_ff]`` of the probe after each history (one batched forward)."""
    ids = torch.stack([torch.cat([bos, h, probe]) for h in hists])
    acts = run_acts(model, ids)["act"]
    return {i: a[:, -len(probe):] for i, a in acts.items()}


def history_uncertainty(model: nn.Module, probes: list[torch.Tensor], natural: list[torch.Tensor],
                        random: list[torch.Tensor], cfg: AnalyzeConfig, bos: torch.Tensor,
                        tick=lambda: None) -> dict:
    """Per-layer overlaps of probe-token active sets across histories (see module doc)."""
    layers = layers_of(model)
    wns = [ml.down_norms() for ml in layers]
    hists = natural + random
    kinds = ["natural"] * len(natural) + ["random"] * len(random)
    # scores[layer] -> [K, P*L, d_ff]
    # History 0 runs alone, twice (the same-history check compares two separate passes);
    # the others run as one batch per probe.
    first, rest, again = [], [], []
    for p in probes:
        first.append(_probe_acts(model, hists[:1], p, bos))
        again.append(_probe_acts(model, hists[:1], p, bos))
        rest.append(_probe_acts(model, hists[1:], p, bos))
        tick()
    per_layer = {i: torch.cat([torch.cat([f[i], r[i]]) for f, r in zip(first, rest)], dim=1)
                 for i in first[0]}                                    # [K, P*L, d_ff]
    repeat = {i: torch.cat([a[i][0] for a in again]) for i in again[0]}
    out = []
    for li, (ml, wn) in enumerate(zip(layers, wns)):
        S = per_layer[li].abs() * wn                                  # [K, T, d_ff]
        R = repeat[li].abs() * wn
        row = {}
        for r in cfg.ks:
            k = kcount(r, ml.d_ff)
            M = topk_mask(S, k)
            pairs = list(itertools.combinations(range(len(hists)), 2))
            js = {p: float(jaccard(M[p[0]], M[p[1]]).mean()) for p in pairs}
            same_kind = lambda kind: [v for (a, b), v in js.items() if kinds[a] == kinds[b] == kind]
            T = M.shape[1]
            shift = max(1, T // 2)
            unrel = jaccard(M[:, : T - shift], M[:, shift:]).mean()
            row[str(r)] = {
                "cross_history": sum(js.values()) / len(js),
                "cross_natural": _mean(same_kind("natural")),
                "cross_random": _mean(same_kind("random")),
                "cross_mixed": _mean([v for (a, b), v in js.items() if kinds[a] != kinds[b]]),
                "same_history": float(jaccard(M[0], topk_mask(R, k)).mean()),
                "unrelated": float(unrel),
                "random_sets": r / (2 - r),
            }
        out.append(row)
    return {"layers": out, "mean": _layer_mean(out)}


def predictor_recall(model: nn.Module, train: torch.Tensor, held_out: torch.Tensor,
                     cfg: AnalyzeConfig, bos: torch.Tensor, tick=lambda: None) -> dict:
    """Fit a rank-``cfg.rank`` predictor x -> c per layer on ``train``; top-k recall on ``held_out``."""
    layers = layers_of(model)
    wns = [ml.down_norms() for ml in layers]

    def collect(ids: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        xs: dict[int, list] = {i: [] for i in range(len(layers))}
        cs: dict[int, list] = {i: [] for i in range(len(layers))}
        nb = len(bos)
        for s in range(0, len(ids), cfg.window):
            chunk = ids[s: s + cfg.window]
            raw = run_acts(model, torch.cat([bos, chunk])[None], ("act", "x"))
            for i in xs:
                xs[i].append(raw["x"][i][0, nb:])
                cs[i].append(raw["act"][i][0, nb:].abs() * wns[i])
            tick()
        return {i: torch.cat(v) for i, v in xs.items()}, {i: torch.cat(v) for i, v in cs.items()}

    Xtr, Ctr = collect(train)
    Xev, Cev = collect(held_out)
    out = []
    for i, ml in enumerate(layers):
        pred = fit_lowrank(Xtr[i], Ctr[i], cfg.rank, steps=cfg.predictor_steps, seed=cfg.seed)
        P = pred.scores(Xev[i])
        out.append({str(r): {"recall": topk_recall(P, Cev[i], kcount(r, ml.d_ff)),
                             "train_recall": topk_recall(pred.scores(Xtr[i]), Ctr[i], kcount(r, ml.d_ff)),
                             "chance": kcount(r, ml.d_ff) / ml.d_ff}
                    for r in cfg.ks})
    return {"rank": cfg.rank, "train_tokens": int(len(train)), "eval_tokens": int(len(held_out)),
            "layers": out, "mean": _layer_mean(out)}


def _mean(v: list[float]) -> float | None:
    return sum(v) / len(v) if v else None


def _layer_mean(rows: list[dict]) -> dict:
    out = {}
    for r in rows[0]:
        out[r] = {key: _mean([row[r][key] for row in rows if row[r][key] is not None])
                  for key in rows[0][r]}
    return out
