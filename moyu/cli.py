"""The ``moyu`` command line: parses arguments and calls the public API, nothing more.

Every command turns a :class:`moyu.MoyuError` into one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable

from .errors import MoyuError

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Handler, str]] = {}


def command(name: str, help: str):
    """Register ``fn(args) -> int`` as subcommand ``name``; ``fn.configure(parser)`` adds options."""
    def wrap(fn: Handler) -> Handler:
        _COMMANDS[name] = (getattr(fn, "configure", lambda p: None), fn, help)
        return fn
    return wrap


def options(configure: Callable[[argparse.ArgumentParser], None]):
    """Attach an argument-adding function to a command handler."""
    def wrap(fn: Handler) -> Handler:
        fn.configure = configure
        return fn
    return wrap


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model`` and ``--dtype``, shared by every command that loads a model."""
    from .models import DEFAULT_MODEL
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"built-in name, .gguf file, HF folder or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def add_text_args(p: argparse.ArgumentParser, default_tokens: int = 4096) -> None:
    """Text source and window options shared by evaluation commands."""
    p.add_argument("--text", metavar="FILE", help="plain-text file (default: built-in eval corpus)")
    p.add_argument("--dataset", help="Hugging Face dataset name[:config[:split]] (needs internet)")
    p.add_argument("--tokens", type=int, default=default_tokens, help="tokens of text to use")
    p.add_argument("--prompt-len", type=int, default=256, help="dense prompt positions per window")
    p.add_argument("--scored-len", type=int, default=256, help="scored positions per window")


def load_model(args: argparse.Namespace):
    """Load the model named by ``--model``/``--dtype``."""
    import torch
    from .models import load
    return load(args.model, dtype=getattr(torch, args.dtype), verbose=not getattr(args, "json", False))


def eval_tokens(args: argparse.Namespace, tok):
    """Token ids of the text chosen by ``--text``/``--dataset`` (default: eval corpus)."""
    from . import data
    if args.tokens is not None and args.tokens < 2:
        raise MoyuError(f"--tokens must be >= 2, got {args.tokens}")
    return data.tokens(tok, "eval", args.tokens, text_file=args.text, dataset=args.dataset)


def windows_from(args: argparse.Namespace):
    """The evaluation :class:`~moyu.evaluate.Windows` from the command-line options."""
    from .evaluate import Windows
    return Windows(prompt=args.prompt_len, scored=args.scored_len)


def _configure_models(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


@command("models", "list the built-in models, whether each is installed, and its size")
@options(_configure_models)
def cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models
    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        size = f"{r['size_bytes'] / 1e6:.0f} MB" if r["size_bytes"] else "-"
        state = "installed" if r["installed"] else f"not installed ({r['install']})"
        print(f"{r['name']:<14} {size:>8}  {state}\n{'':<14} {r['description']}")
    return 0


def _configure_eval(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_text_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


@command("eval", "perplexity (and, with a method, KL / top-1 agreement vs dense)")
@options(_configure_eval)
def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate
    model, tok = load_model(args)
    ids = eval_tokens(args, tok)
    res = evaluate(model, ids, windows_from(args), progress=not args.json)
    out = {"model": args.model, **res.to_dict()}
    print(json.dumps(out) if args.json else
          f"{args.model}: perplexity {out['ppl']:.3f} over {out['tokens']} tokens ({out['seconds']:.1f} s)")
    return 0


def _configure_demo(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--prompt", default="Explain in two sentences why the sky is blue.")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--tokens", type=int, default=2048, help="eval-corpus tokens for perplexity")


@command("demo", "the main job: generate, evaluate, summarise (what `make demo` runs)")
@options(_configure_demo)
def cmd_demo(args: argparse.Namespace) -> int:
    from . import data
    from .evaluate import Windows, evaluate
    from .generate import generate

    t0 = time.perf_counter()
    model, tok = load_model(args)
    print(f"== moyu demo: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f} M "
          f"parameters, {model.config.model_type}), loaded in {time.perf_counter() - t0:.1f} s")
    gen = generate(model, tok, args.prompt, args.max_new_tokens)
    print(f"\n> {args.prompt}\n{gen.text}\n({gen.new_tokens} tokens, {gen.tokens_per_s:.1f} tok/s "
          "with HF generate)")
    ids = data.tokens(tok, "eval", args.tokens)
    res = evaluate(model, ids, Windows(), progress=True)
    print(f"\ndense perplexity on the eval corpus: {res.ppl:.3f} ({res.tokens} scored tokens, "
          f"{res.seconds:.1f} s)")
    print(f"\ndone in {time.perf_counter() - t0:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    from . import __version__
    parser = argparse.ArgumentParser(prog="moyu", description="Diagnose and exploit massive "
                                     "over-activation (dynamic activation) in LLMs.")
    parser.add_argument("--version", action="version", version=f"moyu {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (configure, _fn, help_) in _COMMANDS.items():
        configure(sub.add_parser(name, help=help_, description=help_))
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``moyu`` console script."""
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return _COMMANDS[args.command][1](args)
    except MoyuError as e:
        print(f"moyu: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moyu: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
