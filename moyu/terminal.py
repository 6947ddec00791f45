"""`moyu generate` and `moyu chat`: an :class:`~moyu.engine.Engine` at the terminal.

Text goes to stdout as it is decoded; figures (tokens/s, sparsity) go to stderr so that
``moyu generate ... > answer.txt`` keeps only the answer.
"""
from __future__ import annotations

import json
import signal
import sys
from contextlib import contextmanager
from typing import Iterator, TextIO

from .engine import Completion, Engine, GenerationParams
from .errors import MoyuError

HELP = "/reset clears the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops a reply"


def read_prompt(path: str) -> str:
    """The prompt in a text file; one-line error if missing, unreadable or empty."""
    from .data import read_text_file
    try:
        return read_text_file(path)
    except MoyuError as e:
        raise MoyuError(str(e).replace("--text", "--prompt-file")) from None


def stats_line(c: Completion, engine: Engine) -> str:
    """One line of figures about a finished completion."""
    s = engine.sparsity()
    return (f"[{c.completion_tokens} tokens ({c.finish_reason}), {c.tok_s:.1f} tok/s "
            f"({c.decode_tok_s:.1f} decode), prompt {c.prompt_tokens} tokens in {c.prefill_s:.2f} s, "
            + (f"{engine.method} sparsity {s:.3f}]" if s is not None else "dense]"))


def generate(engine: Engine, prompt: str, params: GenerationParams, chat: bool = False,
             as_json: bool = False, out: TextIO | None = None, err: TextIO | None = None) -> Completion:
    """Continue ``prompt`` (as a user turn with ``chat``), streaming the text to ``out``
    (default: the current ``sys.stdout``; figures to ``err``, default ``sys.stderr``).

    With ``as_json`` nothing is streamed: one JSON object (text, counts, speeds, sparsity)
    is printed at the end instead.
    """
    out, err = out or sys.stdout, err or sys.stderr
    if not prompt:
        raise MoyuError("the prompt is empty: pass --prompt TEXT or --prompt-file FILE")
    ids = engine.chat_ids([{"role": "user", "content": prompt}]) if chat else engine.encode(prompt)
    stream = engine.stream(ids, params)
    for piece in stream:
        if not as_json:
            out.write(piece)
            out.flush()
    c = stream.completion
    if as_json:
        s = engine.sparsity()
        out.write(json.dumps({**engine.describe(), "text": c.text, "finish_reason": c.finish_reason,
                              "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                              "tokens": c.tokens, "tok_s": round(c.tok_s, 2),
                              "decode_tok_s": round(c.decode_tok_s, 2), "prefill_s": round(c.prefill_s, 4),
                              "sparsity": None if s is None else round(s, 4)}) + "\n")
    else:
        out.write("\n")
        err.write(stats_line(c, engine) + "\n")
    return c


@contextmanager
def _ctrl_c_flag() -> Iterator[dict]:
    """While active, Ctrl-C sets ``flag["hit"]`` instead of raising KeyboardInterrupt."""
    flag = {"hit": False}

    def on_int(signum, frame):
        flag["hit"] = True
    try:
        old = signal.signal(signal.SIGINT, on_int)
    except ValueError:            # not the main thread: no signal handling, Ctrl-C as usual
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, old)


def fit_history(engine: Engine, history: list[dict], reserve: int) -> tuple[list[dict], list[int]]:
    """Drop the oldest turns (a leading system message stays) until the conversation plus
    ``reserve`` new tokens fits the context window; the kept messages and their token ids."""
    msgs = list(history)
    while True:
        ids = engine.chat_ids(msgs)
        if len(ids) + reserve <= engine.max_seq:
            return msgs, ids
        first = 1 if msgs[0]["role"] == "system" else 0
        if len(msgs) - first <= 1:    # only the newest user message is left and it does not fit
            raise MoyuError(f"this message takes {len(ids)} tokens; with {reserve} for the reply it "
                            f"does not fit the {engine.max_seq}-token context: shorten it")
        # drop the oldest exchange: a user message and the reply that followed it
        del msgs[first:first + (2 if len(msgs) - first > 2 else 1)]


def _read_line(inp: TextIO, out: TextIO) -> str:
    """One line typed after the prompt ('' at end of input); line editing on a terminal."""
    if inp is sys.stdin and out is sys.stdout and inp.isatty():
        try:
            import readline  # noqa: F401  (gives input() editing and history)
        except ImportError:
            pass
        try:
            return input(">>> ") + "\n"
        except EOFError:
            return ""
    out.write(">>> ")
    out.flush()
    return inp.readline()


def chat(engine: Engine, params: GenerationParams, system: str | None = None,
         inp: TextIO | None = None, out: TextIO | None = None, err: TextIO | None = None,
         show_stats: bool = True) -> list[dict]:
    """An interactive chat until ``/exit`` or end of input; the final history.

    The whole conversation is the prompt of each reply, trimmed from the oldest turn when it
    outgrows the context window (``params.max_tokens`` is kept free for the reply). Ctrl-C
    during a reply stops it (the partial reply stays in the history); at the prompt it
    clears the line. ``inp``/``out``/``err`` default to the current ``sys`` streams.
    """
    inp, out, err = inp or sys.stdin, out or sys.stdout, err or sys.stderr
    reserve = params.max_tokens or max(engine.max_seq // 4, 1)
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    out.write(f"moyu chat: {engine.name} ({engine.method or 'dense'}, context {engine.max_seq}). {HELP}\n")
    out.flush()
    while True:
        try:
            line = _read_line(inp, out)
        except KeyboardInterrupt:
            out.write("\n")
            continue
        if not line:                  # end of input
            out.write("\n")
            return history
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return history
        if text == "/reset":
            history = list(base)
            out.write("(conversation cleared)\n")
            continue
        if text.startswith("/") and " " not in text:
            out.write(f"unknown command {text}: {HELP}\n")
            continue
        try:
            msgs, ids = fit_history(engine, history + [{"role": "user", "content": text}], reserve)
        except MoyuError as e:
            err.write(f"moyu: {e}\n")
            continue
        if len(msgs) < len(history) + 1:
            err.write(f"(the oldest {len(history) + 1 - len(msgs)} message(s) no longer fit the context "
                      "and were dropped)\n")
        with _ctrl_c_flag() as flag:
            stream = engine.stream(ids, GenerationParams(max_tokens=min(reserve, engine.max_seq - len(ids)),
                                                         temperature=params.temperature, top_p=params.top_p,
                                                         seed=params.seed, stop=params.stop),
                                   cancel=lambda: flag["hit"])
            for piece in stream:
                out.write(piece)
                out.flush()
        c = stream.completion
        out.write("\n")
        if c.finish_reason == "cancelled":
            err.write("(reply stopped)\n")
        elif show_stats:
            err.write(stats_line(c, engine) + "\n")
        err.flush()
        history = msgs + [{"role": "assistant", "content": c.text}]
