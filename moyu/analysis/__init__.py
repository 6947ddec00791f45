"""MOYU diagnostics: measured evidence for the seed paper's claims on one model.

:func:`analyze` runs four analyses and returns a :class:`Report`;
:func:`moyu.report.write_report` turns one or more reports into ``report.json``, PNG
figures and a self-contained ``report.html``. The JSON keys are documented in
``docs/analyze.md``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm import tqdm

from ..errors import MoyuError
from .common import (AnalyzeConfig, Spans, bos_prefix, calib_needed, eval_needed, layers_of, make_spans,
                     prompt_seq_len, steady_allocator)
from .consistency import parallel_vs_sequential
from .history import history_uncertainty, predictor_recall
from .inertia import inertia
from .overactivation import overactivation

__all__ = ["AnalyzeConfig", "Report", "analyze", "claims"]


@dataclass
class Report:
    """Everything :func:`analyze` measured on one model (plain-JSON values via :meth:`to_dict`)."""

    model: str
    model_type: str
    gated: bool
    activation: str
    n_layers: int
    d_ff: int
    hidden: int
    config: dict
    overactivation: dict
    history: dict
    predictor: dict
    inertia: dict
    consistency: dict
    seconds: dict = field(default_factory=dict)
    claims: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """The report as JSON-ready data."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        """Rebuild a report from :meth:`to_dict` output (e.g. another run's ``report.json``)."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _act_name(model: nn.Module) -> str:
    cfg = model.config
    for key in ("hidden_act", "hidden_activation", "activation_function"):
        v = getattr(cfg, key, None)
        if isinstance(v, str):
            return v
    return type(layers_of(model)[0].act).__name__


def _vocab(model: nn.Module, tok) -> tuple[int, set[int]]:
    vocab = int(model.config.vocab_size)
    avoid: set[int] = set()
    if tok is not None:
        vocab = min(vocab, len(tok))
        avoid = {int(i) for i in getattr(tok, "all_special_ids", []) if i is not None}
    return vocab, avoid


def analyze(model: nn.Module, tok=None, config: AnalyzeConfig | None = None, *,
            eval_ids: torch.Tensor | None = None, calib_ids: torch.Tensor | None = None,
            progress: bool = True) -> Report:
    """Measure over-activation, history uncertainty, inertia and parallel/sequential agreement.

    Text comes from the built-in corpus through ``tok`` unless ``eval_ids`` / ``calib_ids``
    (1-D token ids) are given (the tests pass random ids to tiny models).
    """
    steady_allocator()   # keeps the resident size flat while activations stream through
    cfg = config or AnalyzeConfig()
    layers = layers_of(model)
    cfg.validate(layers[0].d_ff)
    if (eval_ids is None or calib_ids is None) and tok is None:
        raise MoyuError("analyze needs a tokenizer or both eval_ids and calib_ids")
    bos = bos_prefix(model, tok)
    cfg = fit_context(cfg, model, len(bos))
    from .. import data
    if eval_ids is None:
        eval_ids = data.tokens(tok, "eval", eval_needed(cfg), corpus=cfg.corpus)
    if calib_ids is None:
        calib_ids = data.tokens(tok, "calib", calib_needed(cfg), corpus=cfg.corpus)
    vocab, avoid = _vocab(model, tok)
    sp: Spans = make_spans(cfg, eval_ids, calib_ids, vocab, bos, avoid)

    total = (math.ceil(cfg.tokens / cfg.window) + cfg.probes
             + math.ceil(cfg.predictor_tokens / cfg.window) + math.ceil(cfg.predictor_eval / cfg.window)
             + (4 if cfg.prompt_n else 2) * math.ceil(cfg.inertia_seqs / 3) + 1)
    bar = tqdm(total=total, desc="moyu analyze", disable=not progress, unit="step")
    seconds: dict[str, float] = {}

    def stage(name: str, fn):
        bar.set_postfix_str(name)
        t0 = time.perf_counter()
        res = fn()
        seconds[name] = round(time.perf_counter() - t0, 2)
        return res

    tick = lambda: bar.update(1)   # noqa: E731
    torch.manual_seed(cfg.seed)
    try:
        over = stage("overactivation", lambda: overactivation(model, sp.stream, cfg, bos, tick))
        hist = stage("history", lambda: history_uncertainty(
            model, sp.probes, sp.natural_histories, sp.random_histories, cfg, bos, tick))
        pred = stage("predictor", lambda: predictor_recall(model, sp.pred_train, sp.pred_eval, cfg, bos, tick))
        iner = stage("inertia", lambda: inertia(model, sp.inertia_natural, sp.inertia_random, cfg, bos, tick,
                                                sp.prompt_natural, sp.prompt_random))
        cons = stage("consistency", lambda: parallel_vs_sequential(model, sp.consistency, bos))
        tick()
    finally:
        bar.close()
    ml = layers[0]
    rep = Report(model=getattr(model, "moyu_name", type(model).__name__),
                 model_type=model.config.model_type, gated=ml.gated, activation=_act_name(model),
                 n_layers=len(layers), d_ff=ml.d_ff, hidden=int(ml.w_down.shape[0]),
                 config=cfg.to_dict(), overactivation=over, history=hist, predictor=pred,
                 inertia=iner, consistency=cons, seconds=seconds)
    rep.claims = claims(rep)
    return rep


def _from_prompt(ine: dict) -> str:
    fp = ine.get("from_prompt")
    if not fp:
        return ""
    m = fp["mean"]
    return (f"; chosen from a {fp['first_n']}-token prompt (as GRIFFIN/TDA choose): "
            f"{m['overlap_natural']:.1%} natural vs {m['overlap_random']:.1%} random")


def fit_context(cfg: AnalyzeConfig, model: nn.Module, n_bos: int) -> AnalyzeConfig:
    """``cfg`` with the long-prompt inertia run shortened to the model's context window (or
    skipped when not even ``first_n`` + 1 prompt tokens fit): the report's
    ``inertia.from_prompt.first_n`` says what was used."""
    ctx = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if not ctx or not cfg.prompt_n or prompt_seq_len(cfg) + n_bos <= ctx:
        return cfg
    fit = ctx - n_bos - cfg.inertia_len + cfg.first_n
    return replace(cfg, prompt_n=fit if fit > cfg.first_n else 0)


def _verdict(ok: bool, partly: bool = False) -> str:
    return "supported" if ok else ("partly" if partly else "not supported")


def claims(rep: Report) -> list[dict]:
    """The seed paper's claims, one line each, with what this report measured and a verdict.

    Verdict rules (design choices, stated in each ``rule``) compare measured numbers with
    measured references (iid Gaussian, random sets, chance), never with constants from a paper.
    """
    o, h, p, i, c = (rep.overactivation["mean"], rep.history["mean"], rep.predictor["mean"],
                     rep.inertia["mean"], rep.consistency)
    k = "0.3" if "0.3" in h else next(iter(h))
    g_ratio = o["share_90"] / max(o["gaussian_share_90"], 1e-12)
    n_layers = rep.n_layers
    out = [
        {"id": "moyu", "claim": "MOYU: per token, a small share of MLP neurons carries almost all of the MLP output",
         "measured": (f"{o['share_90']:.1%} of neurons carry 90 % of the output mass (iid Gaussian: "
                      f"{o['gaussian_share_90']:.1%}); at CETT 0.2 a token needs only "
                      f"{1 - o['sparsity_at_cett_0.2']:.1%} of neurons ({o['sparsity_at_cett_0.2']:.1%} sparsity)"),
         "rule": "supported if share_90 < 0.75 x Gaussian, partly if < 0.95 x",
         "verdict": _verdict(g_ratio < 0.75, g_ratio < 0.95), "figure": "overactivation.png"},
        {"id": "natural_sparsity", "claim": "Pitfalls: non-ReLU (SiLU/GELU) MLPs are not naturally sparse",
         "measured": f"only {o['natural_sparsity']:.2%} of activations are below 1e-3 of the token's max",
         "rule": "supported if natural sparsity < 10 %",
         "verdict": _verdict(o["natural_sparsity"] < 0.1), "figure": "activation_hist.png"},
        {"id": "history", "claim": "History-related uncertainty: the same token activates different neurons after different histories",
         "measured": (f"top-{float(k):.0%} sets of the same probe token: Jaccard {h[k]['cross_natural']:.3f} "
                      f"across natural histories ({h[k]['cross_mixed']:.3f} natural vs random-token "
                      f"histories) vs {h[k]['same_history']:.3f} for the same history and "
                      f"{h[k]['unrelated']:.3f} for unrelated tokens"),
         "rule": "supported if the natural-vs-natural Jaccard < 0.9 while same-history = 1",
         "verdict": _verdict(h[k]["cross_natural"] < 0.9 and h[k]["same_history"] == 1.0),
         "figure": "history.png"},
        {"id": "predictor", "claim": "A predictor that sees only the current hidden state (Deja Vu) misses active neurons",
         "measured": (f"rank-{rep.predictor['rank']} predictor recovers {p[k]['recall']:.1%} of the true top-"
                      f"{float(k):.0%} on held-out text (ceiling 100 %, chance {p[k]['chance']:.0%})"),
         "rule": "supported if held-out recall < 90 %",
         "verdict": _verdict(p[k]["recall"] < 0.9), "figure": "history.png"},
        {"id": "inertia", "claim": "Semantic-irrelevant inertia: neurons chosen by the first tokens keep firing, whatever the text means",
         "measured": (f"first-{rep.inertia['first_n']} set covers {i['overlap_natural']:.1%} of later tokens' "
                      f"top-{rep.inertia['k']:.0%} (natural) vs {i['overlap_random']:.1%} (random tokens), "
                      f"chance {i['chance']:.0%}; {i['layers_semantic_irrelevant']}/{n_layers} layers "
                      "semantic-irrelevant" + _from_prompt(rep.inertia)),
         "rule": "supported if overlap > chance + 0.1 and random >= natural - tolerance in >= half the layers",
         "verdict": _verdict(i["overlap_natural"] > i["chance"] + 0.1 and i["layers_semantic_irrelevant"] * 2 >= n_layers,
                             i["overlap_natural"] > i["chance"] + 0.1),
         "figure": "inertia.png"},
        {"id": "consistency", "claim": "Sanity: one parallel pass and token-by-token decoding with the KV cache agree",
         "measured": (f"max |a| difference {c['max_abs_diff']:.2e} (relative {c['max_rel_diff']:.2e}); "
                      f"top-30 % sets Jaccard >= {c['min_topk_jaccard']:.4f}"),
         "rule": "holds if the relative difference < 1e-3",
         "verdict": "holds" if c["max_rel_diff"] < 1e-3 else "fails", "figure": "consistency.png"},
    ]
    return out
