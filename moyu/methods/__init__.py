"""Dynamic-activation methods behind one interface, and the two verbs that use them.

``calibrate(model, tok, method=..., sparsity=...)`` returns a :class:`~moyu.profile.Profile`;
``sparsify(model, profile)`` returns a reversible context manager that applies it.

One module per method (its rule classes, its options dataclass, its :class:`Method`),
each registering itself with :func:`register` when imported below.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..errors import MoyuError
from ..evaluate import Windows
from ..profile import Profile
from .base import Sparsifier, check_sparsity
from .method import METHODS, Method, get_method, register

# Registration order is the order `moyu methods` lists them in.
from . import dense, oracle, cats, teal, griffin, tda, cett, relu, static, dejavu, moe, sketch  # noqa: E402,F401,I001


def calibration_ids(tok, tokens: int = 8192, text_file: str | None = None,
                    corpus: str = "prose", method: str | None = None) -> torch.Tensor:
    """Calibration token ids: the ``calib`` split of a built-in corpus (disjoint from ``eval``) or a file.

    Sampled as ``method`` wants it (:attr:`Method.calib_sample`): the text's head by
    default, pieces spread over all of it for methods whose parameters are per-prompt
    statistics (TDA).
    """
    from .. import data
    sample = get_method(method).calib_sample if method else "head"
    return data.tokens(tok, "calib", tokens, text_file=text_file, corpus=corpus, sample=sample)


def calibration_source(tok, tokens: int = 8192, text_file: str | None = None,
                       corpus: str = "prose") -> Callable[[str], torch.Tensor]:
    """``method name -> calibration ids`` for a sweep: each sample kind is read once."""
    cache: dict[str, torch.Tensor] = {}

    def ids_for(method: str) -> torch.Tensor:
        kind = get_method(method).calib_sample
        if kind not in cache:
            cache[kind] = calibration_ids(tok, tokens, text_file, corpus, method)
        return cache[kind]
    return ids_for


def calibrate(model: nn.Module, tok_or_ids: Any = None, method: str = "tda",
              sparsity: float | None = 0.5, cett: float | None = None,
              windows: Windows = Windows(), tokens: int = 8192, progress: bool = False,
              **params: Any) -> Profile:
    """Calibrate ``method`` on ``model`` for a target sparsity (or a CETT budget).

    ``tok_or_ids`` is a tokenizer (the built-in calibration split is used) or a 1-D
    tensor of token ids. Returns a :class:`Profile` to save or to pass to :func:`sparsify`.
    """
    m = get_method(method)
    m.check(model)
    if cett is not None and not 0.0 <= cett < 1.0:
        raise MoyuError(f"CETT budget {cett} is outside [0, 1): pass e.g. 0.2")
    if isinstance(tok_or_ids, torch.Tensor):
        ids = tok_or_ids
    elif tok_or_ids is not None:
        ids = calibration_ids(tok_or_ids, tokens, method=method)
    else:
        ids = None
    if cett is None:
        target = {"sparsity": check_sparsity(0.0 if sparsity is None else sparsity)}
    elif m.name == "cett":
        target = {"cett": float(cett)}
    else:
        target = {"cett": float(cett), "sparsity": budget_sparsity(model, ids, cett, windows, progress)}
    return m.calibrate(model, ids, target, windows=windows, progress=progress, **params)


def budget_sparsity(model: nn.Module, ids: torch.Tensor | None, cett: float,
                    windows: Windows = Windows(), progress: bool = False) -> float:
    """The average sparsity a CETT budget allows on the calibration text.

    Every other method calibrates to a sparsity, so a budget ``--cett B`` reaches them as
    the sparsity the ``cett`` method (per layer: drop neurons while the dropped part's CETT
    stays <= B) achieves on the same text; both numbers are kept in the profile's target.
    """
    if ids is None:
        raise MoyuError("a CETT budget needs calibration text: pass a tokenizer or token ids")
    ref = METHODS["cett"].calibrate(model, ids, {"cett": float(cett)}, windows=windows, progress=progress)
    return check_sparsity(min(ref.calib["sparsity"], 0.99))


def sparsify(model: nn.Module, profile: Profile) -> Sparsifier:
    """A reversible context manager applying ``profile`` to ``model`` (checked to match)."""
    return get_method(profile.method).build(model, profile)


__all__ = ["METHODS", "Method", "Sparsifier", "calibrate", "calibration_ids", "calibration_source",
           "sparsify", "get_method", "register"]
