"""The main job, end to end on one model: diagnose, evaluate, sparsify and decode faster.

What ``make demo`` runs (``moyu demo``): the MOYU diagnosis, dense perplexity beside a
method's, and the same chat answer decoded by HF ``generate``, by moyu's dense runtime and
by its sparse runtime, with the speed of each.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable

DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."


def run_demo(model_name: str, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 64,
             tokens: int = 2048 + 257, method: str = "sketch-reuse", sparsity: float = 0.5,
             out: str = "moyu-demo", weights: str = "fp32", corpus: str = "prose",
             echo: Callable[[str], None] = print) -> dict:
    """Run the demo on ``model_name``, reporting each stage through ``echo``.

    ``corpus`` picks the built-in text (``prose`` or ``code``). Returns the figures it printed
    (perplexities, achieved sparsity, tokens/s per decoder).
    Bad arguments are refused before the model loads.
    """
    import torch

    from . import data
    from .analysis import analyze
    from .evaluate import DenseReference, Windows, evaluate
    from .fakequant import Both, QuantizedWeights
    from .kernels import weight_format
    from .generate import chat_ids, generate
    from .methods import calibrate, calibration_ids, check_sparsity, sparsify
    from .models import load
    from .report import check_out, write_report
    from .runtime import check_decodable, lean_model

    check_sparsity(sparsity)
    check_decodable(method, sparsity)
    check_out(out)
    t0 = time.perf_counter()
    model, tok = load(model_name, dtype=torch.float32)
    echo(f"== moyu demo: {model_name} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f} M "
         f"parameters, {model.config.model_type}), loaded in {time.perf_counter() - t0:.1f} s")

    echo("\n-- 1. diagnose: does this model over-activate? (moyu analyze)")
    rep = analyze(model, tok)
    for c in rep.claims:
        echo(f"  [{c['verdict']}] {c['claim']}\n      {c['measured']}")
    path = write_report([rep], out)
    echo(f"  full report: {path / 'report.html'}")

    echo("\n-- 2. quality: dense vs dynamic activation on held-out text (moyu eval)")
    ids = data.tokens(tok, "eval", tokens, corpus=corpus)
    ref = DenseReference()
    res = evaluate(model, ids, Windows(), reference=ref, progress=True)
    echo(f"  dense perplexity: {res.ppl:.3f} ({res.tokens} scored tokens, {res.seconds:.1f} s)")
    # at a quantized --weights, calibrate and evaluate on the same rounding that decode runs
    sim = None if weight_format(weights).name == "fp32" else QuantizedWeights(model, weights)
    with sim or contextlib.nullcontext():
        prof = calibrate(model, calibration_ids(tok, 4096, corpus=corpus, method=method), method=method,
                         sparsity=sparsity, progress=True)
    modifier = sparsify(model, prof) if sim is None else Both(sim, sparsify(model, prof))
    sp = evaluate(model, ids, Windows(), modifier=modifier, reference=ref, progress=True)
    label = method if sim is None else f"{method} on {sim.fmt} weights"
    echo(f"  {label} at {sparsity:.0%} target: achieved sparsity {sp.extra['sparsity']:.3f}, "
         f"perplexity {sp.ppl:.3f} vs dense {sp.dense_ppl:.3f} ({100 * (sp.ppl / sp.dense_ppl - 1):+.1f} %), "
         f"KL {sp.kl:.4f}, top-1 agreement {sp.top1_agree:.3f}")

    echo(f"\n-- 3. speed: greedy decode at batch 1 of the answer to: {prompt!r}")
    gen = generate(model, tok, prompt, max_new_tokens)
    prompt_ids = chat_ids(tok, prompt).reshape(-1)
    runs = [("HF generate, dense", gen.text, gen.tokens_per_s)]
    for name, pr in (("moyu dense", None), (f"moyu {method} {sparsity:.0%}", prof)):
        lean = lean_model(model, pr, weights, max_seq=prompt_ids.shape[0] + max_new_tokens + 8)
        lean.generate(prompt_ids, 8)                       # warm-up
        lean.reset()
        toks, timing = lean.generate(prompt_ids, max_new_tokens, eos_token_id=tok.eos_token_id)
        runs.append((name, tok.decode(toks, skip_special_tokens=True).strip(), timing.tok_s))
        del lean
    for name, text, rate in runs:
        echo(f"  [{name}: {rate:.1f} tok/s]\n  {text}\n")
    echo(f"  moyu dense is {runs[1][2] / runs[0][2]:.2f}x HF generate; {method} is "
         f"{runs[2][2] / runs[1][2]:.2f}x moyu dense and {runs[2][2] / runs[0][2]:.2f}x HF "
         "(one run each; `moyu bench` gives medians of alternating runs)")
    echo(f"\ndone in {time.perf_counter() - t0:.0f} s")
    return {"dense_ppl": res.ppl, "ppl": sp.ppl, "sparsity": sp.extra["sparsity"],
            "tok_s": {name: rate for name, _text, rate in runs}}
