"""Perplexity, and dense-vs-modified comparison (KL, top-1 agreement), on one protocol.

The protocol (shared by every method, dense included): the token stream is cut into
windows of ``prompt + scored`` input tokens that advance by ``scored``. In each window
the first ``prompt`` positions run dense (the prefill of generation); the ``scored``
positions after them run with the modification on, and each of their next-token
predictions is scored. So every scored token sees between ``prompt + 1`` and
``prompt + scored`` tokens of context, and per-token and per-sequence methods are
compared on exactly the same predictions. Defaults: prompt 256, scored 256.

BOS: a model whose tokenizer starts every text with a BOS token (Gemma) relies on it
(it is the attention sink), so every window starts with that BOS, as the tokenizer would
start a text: the BOS is one more dense position before the prompt and is never scored.
:func:`moyu.data.bos_id` is the rule; :func:`moyu.models.load` records its answer on the
model (``model.moyu_bos``) and ``Windows(bos="auto")`` (the default) reads it there.

Every window runs as generation does: a prefill of the dense positions that returns a KV
cache, then the scored positions in one forward on that cache. A modifier whose prompt is
the dense model's and that does not look at it (``dense_prompt`` true, ``observes_prompt``
false: token-level sparsifiers) continues a copy of the dense prefill's cache instead of
recomputing it, which halves its cost per window once the dense reference is stored.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MoyuError
from .stats import Bootstrap, intervals


@dataclass(frozen=True)
class Windows:
    """Evaluation windows: ``prompt`` dense positions, then ``scored`` scored positions."""

    prompt: int = 256
    scored: int = 256
    bos: int | None | str = "auto"   # a token id, None (no BOS), or "auto": the model's own

    @property
    def lead(self) -> int:
        """Dense positions at the start of a window: the BOS (when one is set) and the prompt."""
        return self.prompt + (1 if isinstance(self.bos, int) else 0)

    def resolved(self, model: nn.Module) -> "Windows":
        """These windows with ``bos="auto"`` replaced by the model's BOS (``model.moyu_bos``) or None."""
        if self.bos != "auto":
            return self
        return replace(self, bos=getattr(model, "moyu_bos", None))

    def window(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Input ids of the window at ``start``: [BOS], then ``prompt + scored`` tokens of text."""
        chunk = ids[start: start + self.prompt + self.scored]
        if not isinstance(self.bos, int):
            return chunk
        return torch.cat([chunk.new_tensor([self.bos]), chunk])

    def targets(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Next-token targets of the window's scored positions (the BOS shifts none of them)."""
        return ids[start + self.prompt + 1: start + self.prompt + self.scored + 1]

    def starts(self, n_tokens: int) -> list[int]:
        """Window start offsets over a stream of ``n_tokens`` (each window needs one target past it)."""
        span = self.prompt + self.scored + 1
        if self.prompt < 1 or self.scored < 1:
            raise MoyuError("window prompt and scored lengths must be >= 1")
        if n_tokens < span:
            raise MoyuError(f"text too short: {n_tokens} tokens, one window needs {span} "
                            f"(prompt {self.prompt} + scored {self.scored} + 1); pass a longer "
                            "text or smaller --prompt-len/--scored-len")
        return list(range(0, n_tokens - span + 1, self.scored))


class Modifier(Protocol):
    """What the harness needs from a sparsifier: hooks on enter/exit plus two calls."""

    def __enter__(self) -> Any: ...
    def __exit__(self, *exc: Any) -> Any: ...
    def begin(self, prompt_len: int) -> None:
        """Called before each window's prefill: positions ``< prompt_len`` must run dense."""
    def resume(self) -> None:
        """Called before the scored forward, which continues the prefill's KV cache: every
        position of it runs modified."""
    def measured(self) -> dict[str, float]:
        """Achieved sparsity (and any other counters) on the scored positions so far."""


@dataclass
class EvalResult:
    """Everything one evaluation measured; ``to_dict`` is what ``--json`` prints."""

    tokens: int
    ppl: float
    seconds: float
    windows: Windows
    dense_ppl: float | None = None
    kl: float | None = None
    top1_agree: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    ci: dict[str, Any] = field(default_factory=dict)
    per_token: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-ready dict (intervals as ``<metric>_ci: [low, high]``; no per-token arrays)."""
        d = {k: v for k, v in asdict(self).items() if k not in ("extra", "ci", "per_token", "windows")}
        d["prompt_len"], d["scored_len"] = self.windows.prompt, self.windows.scored
        d["bos"] = isinstance(self.windows.bos, int)
        if self.dense_ppl is not None:
            d["ppl_ratio"] = self.ppl / self.dense_ppl
        d.update(self.extra)
        d.update(self.ci)

        def r(v: Any) -> Any:
            return round(v, 6) if isinstance(v, float) else [r(x) for x in v] if isinstance(v, list) else v
        return {k: r(v) for k, v in d.items() if v is not None}


def _prefill(model: nn.Module, window: torch.Tensor, w: Windows) -> Any:
    """KV cache of the window's dense positions (the BOS and the prompt)."""
    return model(window[None, : w.lead], logits_to_keep=1, use_cache=True).cache


def _continue(model: nn.Module, window: torch.Tensor, w: Windows, cache: Any) -> torch.Tensor:
    """Logits of the window's scored positions, run on ``cache`` (which this extends)."""
    out = model(window[None, w.lead:], cache=cache, use_cache=True)
    return out.logits[0].float()


def _cache_bytes(cache: Any) -> int:
    """Bytes of the keys and values a KV cache holds (HF caches: one entry per layer)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))


class DenseReference:
    """Dense logits per window, and the KV cache of its prefill, computed once and reused
    across a sweep.

    Held only while they fit ``max_bytes`` (logits first, then the cache); otherwise
    recomputed per call.
    """

    def __init__(self, max_bytes: int = 2 << 30):
        self.max_bytes = max_bytes
        self._store: dict[tuple, tuple[torch.Tensor, torch.Tensor, Any]] = {}
        self._bytes = 0

    def get(self, model: nn.Module, ids: torch.Tensor, start: int, w: Windows) -> torch.Tensor:
        """Dense scored logits of the window at ``start``.

        Keyed by the model object and the window's token ids themselves (compared on a
        hit), so another text or model never receives stale logits.
        """
        return self.get_with_cache(model, ids, start, w)[0]

    def get_with_cache(self, model: nn.Module, ids: torch.Tensor, start: int, w: Windows,
                       want_cache: bool = True) -> tuple[torch.Tensor, Any]:
        """Dense scored logits of the window at ``start`` and, with ``want_cache``, a private
        copy of its dense prefill's KV cache (None when not wanted or not kept)."""
        window = w.window(ids, start)
        key = (id(model), w.prompt, w.scored, w.bos, hash(tuple(window[:16].tolist())))
        hit = self._store.get(key)
        if hit is not None and torch.equal(hit[0], window):
            return hit[1], (copy.deepcopy(hit[2]) if want_cache and hit[2] is not None else None)
        cache = _prefill(model, window, w)
        may_store = key not in self._store and self._bytes < self.max_bytes
        kept = copy.deepcopy(cache) if (want_cache or may_store) else None
        logits = _continue(model, window, w, cache)
        nbytes = logits.numel() * logits.element_size()
        if may_store and self._bytes + nbytes <= self.max_bytes:
            cbytes = _cache_bytes(kept)
            stored = kept if self._bytes + nbytes + cbytes <= self.max_bytes else None
            self._store[key] = (window.clone(), logits, stored)
            self._bytes += nbytes + (cbytes if stored is not None else 0)
            if stored is not None and want_cache:
                kept = copy.deepcopy(kept)
        return logits, (kept if want_cache else None)


def evaluate(model: nn.Module, ids: torch.Tensor, windows: Windows = Windows(),
             modifier: Modifier | None = None, reference: DenseReference | None = None,
             max_windows: int | None = None, progress: bool = False,
             bootstrap: Bootstrap | None = Bootstrap()) -> EvalResult:
    """Perplexity of ``model`` on ``ids``; with ``modifier``, also dense ppl, KL and top-1 agreement.

    ``ppl`` is the modified model's perplexity when a modifier is given, else dense.
    ``kl`` is the mean over scored tokens of KL(p_dense || p_modified) in nats.
    With ``bootstrap`` (the default), the result carries block-bootstrap intervals of
    every metric (:mod:`moyu.stats`; paired with dense for the ratio, KL and top-1) and
    ``ci`` settings; ``per_token`` holds the arrays they were drawn from.
    """
    from tqdm import tqdm

    if ids.dim() != 1:
        raise MoyuError("evaluate expects a 1-D tensor of token ids")
    if modifier is not None and not callable(getattr(modifier, "resume", None)):
        raise MoyuError(f"{type(modifier).__name__} has no resume(): a modifier must say how the "
                        "scored positions continue the prefill's KV cache (see Modifier)")
    windows = windows.resolved(model)
    starts = windows.starts(len(ids))[:max_windows]
    ref = reference or DenseReference(max_bytes=0)
    shares_prompt = (modifier is not None and getattr(modifier, "dense_prompt", False)
                     and not getattr(modifier, "observes_prompt", True))
    tok_dense: list[torch.Tensor] = []
    tok_mod: list[torch.Tensor] = []
    tok_kl: list[torch.Tensor] = []
    tok_agree: list[torch.Tensor] = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in tqdm(starts, desc="eval", disable=not progress, leave=False):
            window = windows.window(ids, s)
            target = windows.targets(ids, s)
            dense, cache = ref.get_with_cache(model, ids, s, windows, want_cache=shares_prompt)
            logp_d = F.log_softmax(dense, -1)
            tok_dense.append(-logp_d.gather(1, target[:, None])[:, 0].double())
            if modifier is None:
                continue
            if cache is None:   # its own prefill (not shared, or the cache was not kept)
                with modifier:
                    modifier.begin(windows.lead)
                    cache = _prefill(model, window, windows)
            else:   # the dense prefill is this modifier's own: continue a copy of it
                modifier.begin(0)
            with modifier:
                modifier.resume()
                other = _continue(model, window, windows, cache)
            logp_o = F.log_softmax(other, -1)
            tok_mod.append(-logp_o.gather(1, target[:, None])[:, 0].double())
            tok_kl.append((logp_d.exp() * (logp_d - logp_o)).sum(-1).double())
            tok_agree.append((dense.argmax(-1) == other.argmax(-1)).double())
    seconds = time.perf_counter() - t0
    arrays = {"nll_dense": tok_dense, "nll": tok_mod, "kl": tok_kl, "agree": tok_agree}
    per_token = {k: torch.cat(v).numpy() for k, v in arrays.items() if v}
    n = len(per_token["nll_dense"])
    dense_ppl = math.exp(float(per_token["nll_dense"].sum()) / n)
    if modifier is None:
        ci = {} if bootstrap is None else {**intervals(per_token["nll_dense"], boot=bootstrap),
                                           "ci": bootstrap.meta()}
        return EvalResult(tokens=n, ppl=dense_ppl, seconds=seconds, windows=windows, ci=ci,
                          per_token=per_token)
    ci = {} if bootstrap is None else {
        **intervals(per_token["nll"], per_token["nll_dense"], per_token["kl"], per_token["agree"], bootstrap),
        "ci": bootstrap.meta()}
    return EvalResult(tokens=n, ppl=math.exp(float(per_token["nll"].sum()) / n), seconds=seconds,
                      windows=windows, dense_ppl=dense_ppl, kl=float(per_token["kl"].sum()) / n,
                      top1_agree=float(per_token["agree"].sum()) / n, extra=dict(modifier.measured()),
                      ci=ci, per_token=per_token)
