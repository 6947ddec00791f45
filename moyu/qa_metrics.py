"""Exact match and token F1 of a generated answer, the SQuAD v1.1 way.

Both compare normalised strings: lowercase, punctuation removed, the articles a / an /
the removed, whitespace collapsed (the official SQuAD evaluation script's
``normalize_answer``, which CoQA's official scorer shares). F1 is the harmonic mean of
token precision and recall over the normalised tokens (bags of words).
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(gold: str, pred: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(gold) == normalize_answer(pred))


def f1(gold: str, pred: str) -> float:
    """Token F1 of the normalised strings (both empty: 1.0; one empty: 0.0)."""
    g, p = normalize_answer(gold).split(), normalize_answer(pred).split()
    if not g or not p:
        return float(g == p)
    common = sum((Counter(g) & Counter(p)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def best_of(golds: Sequence[str], pred: str) -> dict[str, float]:
    """SQuAD: the best exact match and the best F1 over the gold answers."""
    if not golds:
        raise ValueError("no gold answers")
    return {"em": max(exact_match(g, pred) for g in golds), "f1": max(f1(g, pred) for g in golds)}


def leave_one_out(golds: Sequence[str], pred: str) -> dict[str, float]:
    """CoQA's official scoring: with n > 1 gold answers, the mean over the n ways of
    leaving one out of the best score against the other n - 1 (with one gold: that one)."""
    if len(golds) < 2:
        return best_of(golds, pred)
    rows = [best_of(list(golds[:i]) + list(golds[i + 1:]), pred) for i in range(len(golds))]
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("em", "f1")}
