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
        n = 0
        for _ in llm.generate([int(i) for i in ids], temp=0.0):
            n += 1
            if n >= new:
                break
        return n, time.perf_counter() - t0, None
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
    if include_hf:
        out["dense_vs_hf"] = round(out["moyu_dense"]["tok_s"] / out["hf_dense"]["tok_s"], 3)
    return out
