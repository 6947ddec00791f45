"""Text in, text out on the lean batch-1 runtime: what `moyu generate`, `chat` and `serve` share.

An :class:`Engine` owns a tokenizer and one :class:`~moyu.runtime.LeanModel`. Its
:meth:`Engine.stream` prefills a prompt and decodes token by token, yielding text pieces
that never split a UTF-8 character, stopping at an end-of-sequence token, a stop sequence,
``max_tokens`` or when a cancellation check says so (checked between tokens). Greedy by
default; sampling draws exactly as :meth:`LeanModel.generate` does for the same seed.

The runtime holds one KV cache, so an engine serves one stream at a time: a second
stream started while one runs raises :class:`EngineBusy` instead of sharing the cache.
:func:`build_engine` is the one place a runtime is constructed from a model + profile.
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from .errors import MoyuError
from .runtime.lean import LeanModel

# Prompt tokens decoded before the new ones, so a piece keeps the spacing it has in context
# (SentencePiece drops a leading space when decoding a sequence that starts with it).
_CONTEXT_TOKENS = 5


class PromptTooLong(MoyuError):
    """The prompt alone does not fit in the engine's context window."""


class EngineBusy(MoyuError):
    """Another stream is running on the engine's single KV cache."""


@dataclass
class GenerationParams:
    """How to continue a prompt. ``temperature`` 0 (the default) is greedy decoding."""

    max_tokens: int | None = None          # None: until the context window is full
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None                # None with temperature > 0: a fresh random seed
    stop: Sequence[str] = ()

    def check(self) -> None:
        """One-line :class:`MoyuError` on an out-of-range value."""
        if self.max_tokens is not None and self.max_tokens < 1:
            raise MoyuError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 2:
            raise MoyuError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MoyuError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise MoyuError("stop sequences must be non-empty strings")

    @property
    def greedy(self) -> bool:
        """True when decoding takes the most likely token."""
        return self.temperature <= 0


@dataclass
class Completion:
    """The outcome of one stream: text, token counts, why it ended and how long it took."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)   # new tokens, an ending eos included
    prompt_tokens: int = 0
    finish_reason: str = "length"                     # "stop", "length" or "cancelled"
    prefill_s: float = 0.0                            # prompt -> first token (time to first token)
    decode_s: float = 0.0                             # the remaining tokens
    prompt_reused: int = 0                            # prompt tokens taken from the last prefill

    @property
    def completion_tokens(self) -> int:
        """New tokens decoded (an ending eos counts, as in the runtime's own generate)."""
        return len(self.tokens)

    @property
    def tok_s(self) -> float:
        """New tokens per second, prefill included."""
        return len(self.tokens) / max(self.prefill_s + self.decode_s, 1e-9)

    @property
    def decode_tok_s(self) -> float:
        """Decode tokens per second (the first token comes from prefill)."""
        return max(len(self.tokens) - 1, 0) / max(self.decode_s, 1e-9)


class Detokenizer:
    """Incremental decoding: text pieces for a growing token list, never a broken character.

    A piece is released only once the tokens decoded so far end on a complete character
    (a byte-level BPE spreads one emoji over several tokens); the context tokens before
    the window keep word-initial spaces.
    """

    def __init__(self, tok, context: Sequence[int] = ()):
        self.tok = tok
        self.ids = list(context[-_CONTEXT_TOKENS:])
        self.prefix = 0              # window start
        self.read = len(self.ids)    # tokens already turned into text

    def _text(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        """Append one token; the new text it completes ('' while a character is unfinished)."""
        self.ids.append(token)
        before = self._text(self.ids[self.prefix:self.read])
        after = self._text(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        """Whatever is still held at the end (an unfinished character is shown as U+FFFD)."""
        before = self._text(self.ids[self.prefix:self.read])
        after = self._text(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):] if after.startswith(before) else ""


class StopMatcher:
    """Holds back text that might begin a stop sequence; finds the first one completed."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """``(text safe to emit, stopped)``; after a stop, the stop string and all after it are dropped."""
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = 0
        for s in self.stops:   # longest tail of buf that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """The held text, at the end of a stream that did not stop on a stop sequence."""
        out, self.held = self.held, ""
        return out


class Stream:
    """Iterate for text pieces as they are decoded; :attr:`completion` is filled in as it goes.

    Closing the iterator early (``close()``, or a ``break`` then garbage collection) ends the
    stream with ``finish_reason`` ``"cancelled"`` and frees the engine.
    """

    def __init__(self, engine: "Engine", ids: list[int], params: GenerationParams, limit: int,
                 cancel: Callable[[], bool] | None):
        self.completion = Completion(prompt_tokens=len(ids))
        self._it = engine._run(ids, params, limit, cancel, self.completion)

    def __iter__(self) -> Iterator[str]:
        return self._it

    def __next__(self) -> str:
        return next(self._it)

    def close(self) -> None:
        """Stop decoding now and free the engine."""
        self._it.close()

    def run(self) -> Completion:
        """Decode to the end; the :class:`Completion`."""
        for _ in self._it:
            pass
        return self.completion


class Engine:
    """A tokenizer and a batch-1 runtime, serving one stream at a time.

    Args:
        runtime: a :class:`~moyu.runtime.LeanModel` (anything with ``prefill``,
            ``decode_step`` and ``max_seq``).
        tok: the model's Hugging Face tokenizer.
        name: the model name shown to users (``/v1/models``).
        eos_token_ids: tokens that end a reply.
        method: the dynamic-activation method running, None when dense.
    """

    def __init__(self, runtime, tok, name: str, eos_token_ids: Sequence[int] = (),
                 method: str | None = None):
        self.runtime = runtime
        self.tok = tok
        self.name = name
        self.eos = set(eos_token_ids)
        self.method = method
        self._lock = threading.Lock()

    @property
    def max_seq(self) -> int:
        """Context window: prompt + new tokens."""
        return self.runtime.max_seq

    @property
    def busy(self) -> bool:
        """True while a stream runs."""
        return self._lock.locked()

    # ------------------------------------------------------------- prompts
    def encode(self, text: str) -> list[int]:
        """Token ids of a plain-text prompt (with the tokenizer's usual special tokens)."""
        return list(self.tok(text).input_ids)

    def chat_ids(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of a conversation ready for the assistant's turn.

        ``messages`` are ``{"role", "content"}`` dicts. With a chat template the tokenizer
        renders them (as :func:`moyu.generate.chat_ids` does for one user turn); without one
        the contents are joined by blank lines.
        """
        if not messages:
            raise MoyuError("a conversation needs at least one message")
        if getattr(self.tok, "chat_template", None):
            try:
                out = self.tok.apply_chat_template(list(messages), add_generation_prompt=True,
                                                   return_dict=True)
            except Exception as e:   # jinja errors: roles the template refuses, and the like
                raise MoyuError(f"the model's chat template rejected the messages: {e}") from None
            return list(out["input_ids"])
        return self.encode("\n\n".join(m["content"] for m in messages))

    def check(self, ids: Sequence[int], params: GenerationParams) -> int:
        """Validate a request before it runs; the number of new tokens it may produce.

        Raises :class:`PromptTooLong` if the prompt fills the window and :class:`MoyuError`
        if ``max_tokens`` reaches beyond it or a parameter is out of range.
        """
        params.check()
        n = len(ids)
        if n == 0:
            raise MoyuError("the prompt is empty")
        room = self.max_seq - n
        if room < 1:
            raise PromptTooLong(f"the prompt has {n} tokens but the context window is "
                                f"{self.max_seq}: shorten it (or start the engine with a larger context)")
        if params.max_tokens is not None and params.max_tokens > room:
            raise MoyuError(f"max_tokens {params.max_tokens} + the prompt's {n} tokens exceed the "
                            f"context window of {self.max_seq}: ask for at most {room}")
        return room if params.max_tokens is None else params.max_tokens

    # ------------------------------------------------------------- decoding
    def stream(self, ids: Sequence[int], params: GenerationParams | None = None,
               cancel: Callable[[], bool] | None = None) -> Stream:
        """A :class:`Stream` continuing ``ids``; ``cancel()`` is asked between tokens."""
        params = params or GenerationParams()
        ids = [int(i) for i in ids]
        return Stream(self, ids, params, self.check(ids, params), cancel)

    def complete(self, ids: Sequence[int], params: GenerationParams | None = None,
                 cancel: Callable[[], bool] | None = None) -> Completion:
        """Decode to the end; the :class:`Completion`."""
        return self.stream(ids, params, cancel).run()

    def _run(self, ids: list[int], params: GenerationParams, limit: int, cancel,
             out: Completion) -> Iterator[str]:
        if not self._lock.acquire(blocking=False):
            raise EngineBusy("the engine is decoding another request: one stream at a time")
        try:
            seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2 ** 63)
            gen = None if params.greedy else torch.Generator().manual_seed(seed)
            detok, stops = Detokenizer(self.tok, ids), StopMatcher(params.stop)
            out.finish_reason = "cancelled"
            t0 = time.perf_counter()
            prompt = torch.tensor(ids, dtype=torch.long)
            # a conversation's next turn repeats the earlier turns: their keys and values are
            # still in the cache from the last prefill, so only the new tokens are computed
            reuse = getattr(self.runtime, "reusable_prefix", lambda _ids: 0)(prompt)
            logits = (self.runtime.prefill(prompt, reuse=reuse) if reuse
                      else self.runtime.prefill(prompt))
            out.prompt_reused = reuse
            # the lean runtime reuses one logits buffer: each step's logits are used up by pick first
            step = (partial(self.runtime.decode_step, reuse_logits=True) if isinstance(self.runtime, LeanModel)
                    else self.runtime.decode_step)
            t1 = time.perf_counter()
            out.prefill_s = t1 - t0
            while True:
                tok = LeanModel.pick(logits, params.greedy, params.temperature, params.top_p, gen)
                out.tokens.append(tok)
                out.decode_s = time.perf_counter() - t1   # kept current for readers mid-stream
                if tok in self.eos:
                    out.finish_reason = "stop"
                    break
                piece, stopped = stops.feed(detok.add(tok))
                if piece:
                    out.text += piece
                    yield piece
                if stopped:
                    out.finish_reason = "stop"
                    return
                if len(out.tokens) >= limit:
                    out.finish_reason = "length"
                    break
                if cancel is not None and cancel():
                    out.finish_reason = "cancelled"
                    return
                logits = step(tok)
            piece, stopped = stops.feed(detok.flush())
            piece += "" if stopped else stops.flush()
            if piece:
                out.text += piece
                yield piece
        finally:
            self._lock.release()

    # ------------------------------------------------------------- reporting
    def sparsity(self) -> float | None:
        """Mean share of MLP neurons (or weights, for input methods) skipped so far; None when dense."""
        if self.method is None:
            return None
        shares = [getattr(L.mlp, "kept_share", 1.0) for L in self.runtime.layers]
        return 1 - sum(shares) / len(shares)

    def describe(self) -> dict:
        """Name, method and context window."""
        return {"model": self.name, "method": self.method, "context": self.max_seq}


def _eos_ids(model: nn.Module, tok) -> list[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    cfg = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(cfg if isinstance(cfg, (list, tuple)) else [cfg] if cfg is not None else [])
    return sorted(ids)


def build_engine(model: nn.Module, tok, profile=None, weights: "str | torch.dtype" = "fp32",
                 max_seq: int = 2048, name: str | None = None) -> Engine:
    """Convert ``model`` (dense, or running ``profile``'s method) into an :class:`Engine`
    whose runtime holds its weights in the format ``weights`` (fp32, bf16, int8, int4).

    The HF model may be dropped afterwards: the engine keeps only the packed runtime.
    """
    from .runtime import lean_model
    if max_seq < 2:
        raise MoyuError(f"the context window must be >= 2 tokens, got {max_seq}")
    runtime = lean_model(model, profile, weights, max_seq)
    return Engine(runtime, tok, name or getattr(model, "moyu_name", "model"), _eos_ids(model, tok),
                  method=profile.method if profile is not None else None)
