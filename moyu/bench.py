"""Decode speed, side by side in one run: HF ``generate``, moyu dense, moyu sparse (and llama.cpp).

Variants are timed alternately, round after round, so a noisy machine slows all of them
alike; the report gives medians and the ratios of medians. Each variant also gets its
*roofline*: the weight bytes it must read per decoded token divided by the machine's
measured memory bandwidth (a STREAM-style copy, timed between the rounds), and the share
of that limit it reaches.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


def memory_bandwidth(mb: int = 256, repeats: int = 5, kind: str = "copy") -> float:
    """Bytes/s of a large tensor stream, best of ``repeats``.

    ``kind="copy"``: a STREAM-style copy, read + write counted. ``kind="read"``: a sum
    over the tensor, the access pattern of a GEMV (weights only read); on this project's
    machine it reached 83-99 % of the copy figure.
    """
    if kind not in ("copy", "read"):
        raise ValueError(f"unknown bandwidth kind '{kind}': use 'copy' or 'read'")
    src = torch.ones(mb * (1 << 20) // 4)
    dst = torch.empty_like(src) if kind == "copy" else None
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        if dst is not None:
            dst.copy_(src)
        else:
            src.sum()
        best = min(best, time.perf_counter() - t0)
    return (2 if kind == "copy" else 1) * src.nbytes / best


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (or the platform string)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD flags of this CPU that decide the kernels' code paths (AVX, FMA, AVX-512, AMX ...)."""
    from .kernels._build import _cpu_flags
    return sorted(f for f in _cpu_flags() if f.startswith(("avx", "fma", "f16c", "amx")))


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    from .kernels import backend_name, quant_isa
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name(),
            "cpu_flags": " ".join(cpu_flags()), "cores": os.cpu_count(), "kernel_backend": backend_name(),
            "quant_isa": quant_isa(), "python": platform.python_version()}


@dataclass
class Variant:
    """One way of generating: ``run()`` returns (new tokens, seconds incl. prefill, decode-only seconds)."""

    name: str
    run: Callable[[], tuple[int, float, float | None]]
    bytes_per_token: Callable[[], float]
    memory: Callable[[], int]   # bytes held after the runs (sequence methods' slices included)
    tok_s: list[float] = field(default_factory=list)
    decode_tok_s: list[float] = field(default_factory=list)

    def summary(self, bandwidth: float, read_bandwidth: float) -> dict[str, Any]:
        """Medians, roofline (copy bandwidth) and the share reached, also of the read-only roofline."""
        med = statistics.median(self.tok_s)
        dec = statistics.median(self.decode_tok_s) if self.decode_tok_s else None
        roof = bandwidth / self.bytes_per_token()
        return {"tok_s": round(med, 2), "decode_tok_s": None if dec is None else round(dec, 2),
                "runs": [round(v, 2) for v in self.tok_s],
                "bytes_per_token": int(self.bytes_per_token()), "roofline_tok_s": round(roof, 2),
                "roofline_share": round((dec or med) / roof, 3),
                "read_roofline_share": round((dec or med) * self.bytes_per_token() / read_bandwidth, 3),
                "memory_bytes": int(self.memory())}


def _hf_variant(model: nn.Module, ids: torch.Tensor, new: int, tok) -> Variant:
    def run():
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids[None], attention_mask=torch.ones_like(ids[None]), do_sample=False,
                                 max_new_tokens=new, min_new_tokens=new, pad_token_id=tok.pad_token_id)
        return out.shape[1] - ids.shape[0], time.perf_counter() - t0, None
    params = sum(p.nbytes for p in model.parameters())
    return Variant("hf_dense", run, lambda: params, lambda: params)


def _metered(lean) -> list:
    """The runtime's steps that report their own bytes read per token (sparse ones)."""
    parts = []
    for L in lean.layers:
        parts += [p for p in (L.mlp, *L.qkv, L.o) if hasattr(p, "bytes_per_token")]
    return parts


def _lean_variant(name: str, lean, ids: torch.Tensor, new: int) -> Variant:
    def run():
        lean.reset()
        toks, t = lean.generate(ids, new)
        return len(toks), t.prefill_s + t.decode_s, t.decode_s / max(len(toks) - 1, 1)
    parts = _metered(lean)
    static = lean.nbytes - sum(p.nbytes for p in parts)
    return Variant(name, run, lambda: static + sum(p.bytes_per_token() for p in parts),
                   lambda: lean.nbytes + lean.cache_nbytes)


def _llamacpp_variant(gguf: str, ids: torch.Tensor, new: int, threads: int) -> Variant | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from llama_cpp import Llama
    llm = Llama(model_path=gguf, n_threads=threads, n_ctx=ids.shape[0] + new + 8, verbose=False)
    size = os.path.getsize(gguf)

    def run():
        t0 = time.perf_counter()
        llm.reset()
        n, t1 = 0, None
        for _ in llm.generate([int(i) for i in ids], temp=0.0):
            n += 1
            if n == 1:   # the prompt's forward and the first token: the rest is decode
                t1 = time.perf_counter()
            if n >= new:
                break
        t2 = time.perf_counter()
        return n, t2 - t0, (t2 - t1) / max(n - 1, 1) if t1 is not None else None
    return Variant("llamacpp", run, lambda: size, lambda: size)


def gguf_quant_type(path: str) -> str:
    """The block type holding most of a GGUF file's bytes (e.g. ``Q4_1``): the peer's format."""
    from collections import Counter

    from gguf import GGUFReader
    weight = Counter()
    for t in GGUFReader(path).tensors:
        weight[t.tensor_type.name] += int(t.n_bytes)
    return weight.most_common(1)[0][0] if weight else "?"


def bench(model: nn.Module, tok, profile=None, prompt_ids: torch.Tensor | None = None,
          new_tokens: int = 128, runs: int = 5, weights: "str | torch.dtype" = "fp32",
          gguf: str | None = None, include_hf: bool = True, progress: bool = True) -> dict[str, Any]:
    """Time HF dense, moyu dense and (with ``profile``) moyu sparse decode alternately.

    Returns medians, ratios (``speedup_vs_dense`` = moyu sparse / moyu dense,
    ``speedup_vs_hf`` = moyu sparse / HF dense), roofline shares, memory, environment.
    """
    from tqdm import tqdm

    from .kernels import weight_format
    from .runtime import lean_model

    fmt = weight_format(weights)
    ids = prompt_ids.reshape(-1)
    max_seq = ids.shape[0] + new_tokens + 8
    dense = lean_model(model, None, fmt, max_seq)
    variants = []
    if include_hf:
        variants.append(_hf_variant(model, ids, new_tokens, tok))
    variants.append(_lean_variant("moyu_dense", dense, ids, new_tokens))
    sparse = None
    if profile is not None:
        sparse = lean_model(model, profile, fmt, max_seq)
        variants.append(_lean_variant("moyu_sparse", sparse, ids, new_tokens))
    if gguf:
        peer = _llamacpp_variant(gguf, ids, new_tokens, torch.get_num_threads())
        if peer is not None:
            variants.append(peer)
    # The bandwidth of a shared machine drifts (single copies measured 25-56 GB/s here within minutes),
    # so it is measured once per round, between the variants, and the median is used:
    # each variant's roofline share then relates its median speed to the typical bandwidth.
    bws, reads = [memory_bandwidth(repeats=3)], [memory_bandwidth(repeats=3, kind="read")]
    for v in variants:       # warm-up: caches, kernel build, allocator
        v.run()
    for _ in tqdm(range(runs), desc="bench", disable=not progress, leave=False):
        for v in variants:
            n, secs, per_tok = v.run()
            v.tok_s.append(n / secs)
            if per_tok is not None:
                v.decode_tok_s.append(1.0 / per_tok)
        bws.append(memory_bandwidth(repeats=3))
        reads.append(memory_bandwidth(repeats=3, kind="read"))
    bw, read_bw = statistics.median(bws), statistics.median(reads)
    out: dict[str, Any] = {"prompt_tokens": int(ids.shape[0]), "new_tokens": new_tokens, "runs": runs,
                           "weights": fmt.name,
                           "bandwidth_gb_s": round(bw / 1e9, 2),
                           "bandwidth_runs_gb_s": [round(b / 1e9, 1) for b in bws],
                           "read_bandwidth_gb_s": round(read_bw / 1e9, 2), "environment": environment()}
    for v in variants:
        out[v.name] = v.summary(bw, read_bw)
    if sparse is not None:
        s, d = out["moyu_sparse"]["tok_s"], out["moyu_dense"]["tok_s"]
        out["speedup_vs_dense"] = round(s / d, 3)
        if include_hf:
            out["speedup_vs_hf"] = round(s / out["hf_dense"]["tok_s"], 3)
        # neuron methods: share of MLP neurons not computed; TEAL/WINA: share of MLP weights not read
        out["sparsity"] = round(1 - statistics.mean(L.mlp.kept_share for L in sparse.layers), 4)
        out["slice_seconds"] = round(sum(getattr(L.mlp, "slice_seconds", 0.0) for L in sparse.layers), 4)
        out["memory_ratio"] = round(out["moyu_sparse"]["memory_bytes"] / out["moyu_dense"]["memory_bytes"], 3)
    if "llamacpp" in out:   # the peer on the same GGUF, timed in the same rounds
        out["llamacpp_tok_s"] = out["llamacpp"]["tok_s"]
        out["llamacpp_quant"] = gguf_quant_type(gguf)
        out["dense_vs_llamacpp"] = round(out["moyu_dense"]["tok_s"] / out["llamacpp"]["tok_s"], 3)
        if sparse is not None:
            out["speedup_vs_llamacpp"] = round(out["moyu_sparse"]["tok_s"] / out["llamacpp"]["tok_s"], 3)
        # the same ratios without the prompt's forward (decode only; prefill is measured apart)
        peer_dec = out["llamacpp"]["decode_tok_s"]
        for key, name in (("decode_dense_vs_llamacpp", "moyu_dense"), ("decode_speedup_vs_llamacpp", "moyu_sparse")):
            if name in out and peer_dec and out[name]["decode_tok_s"]:
                out[key] = round(out[name]["decode_tok_s"] / peer_dec, 3)
    if include_hf:
        out["dense_vs_hf"] = round(out["moyu_dense"]["tok_s"] / out["hf_dense"]["tok_s"], 3)
    return out


class _Timed:
    """A callable that adds its wall time to ``acc[key]`` (other attributes pass through)."""

    def __init__(self, fn: Callable, acc: dict[str, float], key: str):
        self._fn, self._acc, self._key = fn, acc, key

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self._fn(*args, **kwargs)
        finally:
            self._acc[self._key] += time.perf_counter() - t0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fn, name)


def decode_split(lean, ids: torch.Tensor, new: int) -> dict[str, dict[str, float]]:
    """Where a decoded token's time goes, measured inside a real greedy generation.

    Parts: ``mlp`` (each layer's MLP step, selection included), ``attn_linears`` (q/k/v/o),
    ``attn_core`` (RoPE, cache write, scores, softmax, weighted sum), ``head`` (final norm +
    lm_head), ``rest`` (embedding, norms, residuals, the Python loop). Per part: ``ms`` per
    token, weight ``bytes`` read per token (from the steps' own meters) and the achieved
    ``gb_s``. The timers wrap the calls (tens of nanoseconds each); prefill is excluded.
    It times the per-op loop: the fused one (:mod:`moyu.runtime.fused`) has no seams to
    time (``benchmarks/fused_decode.py`` compares the two).
    """
    from .runtime import lean as lean_mod

    fused, lean.fused = lean.fused, False
    acc = {k: 0.0 for k in ("mlp", "attn_linears", "attn_core", "head")}
    saved_layers = []
    for L in lean.layers:
        saved_layers.append((L, L.qkv, L.o, L.mlp.__dict__.get("decode")))
        L.qkv = [_Timed(f, acc, "attn_linears") for f in L.qkv]
        L.o = _Timed(L.o, acc, "attn_linears")
        L.mlp.decode = _Timed(L.mlp.decode, acc, "mlp")
    head, core, embed = lean.flat.lm_head, lean_mod.attn_decode, lean.flat.embed
    if embed is None:   # a tied table: the embedding lookup keeps the unwrapped head
        lean.flat.embed = head
    lean.flat.lm_head = _Timed(head, acc, "head")
    lean_mod.attn_decode = _Timed(core, acc, "attn_core")
    try:
        lean.reset()
        lean.prefill(ids)
        for k in acc:
            acc[k] = 0.0
        token = int(ids[-1])
        t0 = time.perf_counter()
        for _ in range(new):
            token = int(lean.decode_step(token).argmax())
        total = time.perf_counter() - t0
    finally:
        lean.fused = fused
        lean.flat.lm_head, lean_mod.attn_decode, lean.flat.embed = head, core, embed
        for L, qkv, o, dec in saved_layers:
            L.qkv, L.o = qkv, o
            if dec is None:
                del L.mlp.decode
            else:
                L.mlp.decode = dec
    mlp_bytes = sum(L.mlp.bytes_per_token() if hasattr(L.mlp, "bytes_per_token") else L.mlp.nbytes
                    for L in lean.layers)
    lin_bytes = sum(f.bytes_per_token() if hasattr(f, "bytes_per_token") else f.nbytes
                    for L in lean.layers for f in (*L.qkv, L.o))
    nbytes = {"mlp": mlp_bytes, "attn_linears": lin_bytes, "attn_core": 0.0,
              "head": float(head.nbytes), "rest": 0.0}
    acc["rest"] = total - sum(acc.values())
    out = {}
    for k, sec in acc.items():
        ms = 1e3 * sec / new
        out[k] = {"ms": ms, "bytes": nbytes[k], "gb_s": nbytes[k] / (ms * 1e6) if ms > 0 else 0.0}
    out["total"] = {"ms": 1e3 * total / new, "bytes": sum(nbytes.values()),
                    "gb_s": sum(nbytes.values()) / (total / new) / 1e9}
    return out
