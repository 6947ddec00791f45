"""Memory-lean GGUF loading: one tensor at a time into a per-dtype safetensors cache.

transformers dequantises a whole GGUF into a state dict and then builds the model from
it, so a first load holds two full fp32 copies of the weights (14 GB for a 1.7 B-parameter
model). Here the model skeleton is built without storage (parameters on the ``meta``
device), each GGUF tensor is dequantised, converted by transformers' own per-architecture
tensor processor, cast to the cache dtype and appended to a safetensors file, so the
conversion never holds more than the largest tensor. A load then opens the file of the
requested dtype with transformers, whose parameters are views of the memory-mapped file
(no copy: the resident size grows as the weights are first used, as file pages the kernel
can share between processes and drop under pressure). A ``bfloat16`` load reads a bfloat16
file and never materialises fp32 (converting an fp32 file on load measured 6 GB peak for
the 0.5 B model).

A cache entry (``$MOYU_CACHE/models/<sha256[:16]>``) is a Hugging Face folder of the
float32 weights plus ``moyu.json``; other dtypes get a sibling folder inside it
(``bfloat16/``), each created under a temporary name and renamed into place.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .atomic import atomic_path
from .errors import MoyuError

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
GB = 1e9


class UnsupportedLayout(Exception):
    """The streaming converter cannot map this GGUF; the caller falls back to transformers."""


def dtype_folder(entry: Path, dtype: torch.dtype) -> Path:
    """The Hugging Face folder of a cache entry holding its weights in ``dtype``."""
    if dtype not in SAFETENSORS_DTYPES:
        raise MoyuError(f"dtype {dtype} is not supported: use float32 or bfloat16")
    return entry if dtype == torch.float32 else entry / str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- memory estimate

def mem_available() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` in bytes, or None where there is none."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(parameters: int, dtype: torch.dtype, what: str) -> int:
    """Refuse, before loading, a model whose weights in ``dtype`` exceed ``MemAvailable``.

    Returns the estimate in bytes (the weights in ``dtype``: one copy is all a lean load holds).
    """
    need = parameters * torch.empty((), dtype=dtype).element_size()
    avail = mem_available()
    if avail is not None and need > avail:
        name = str(dtype).removeprefix("torch.")
        hint = "free memory or use a machine with more RAM"
        half = parameters * 2
        if dtype == torch.float32 and half <= avail:
            hint = f"use --dtype bfloat16 (about {half / GB:.1f} GB) or free memory"
        raise MoyuError(f"not enough memory to load {what} in {name}: its {parameters / 1e9:.2f} B "
                        f"parameters need about {need / GB:.1f} GB and {avail / GB:.1f} GB is available "
                        f"(MemAvailable): {hint}")
    return need


# ---------------------------------------------------------------- skeleton without storage

def empty_model(config) -> nn.Module:
    """The causal LM for ``config`` with parameters on ``meta`` (buffers such as RoPE tables are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config)


# ---------------------------------------------------------------- GGUF -> safetensors

def _plan(config, model: nn.Module, reader) -> tuple[list[tuple[object, str, tuple[int, ...]]], object]:
    """``[(gguf tensor, HF name, HF shape)]`` for every tensor the model takes, and the processor."""
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map)

    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    processor_cls = TENSOR_PROCESSORS.get(arch, TensorProcessor)
    if processor_cls.__name__ not in ("TensorProcessor", "LlamaTensorProcessor",
                                      "Gemma2TensorProcessor", "NemotronTensorProcessor"):
        raise UnsupportedLayout(arch)  # processors that rename, split or store tensors aside
    # the processors read head counts under transformers' config names
    processor = processor_cls(config=config.to_dict())
    mapping = get_gguf_hf_weights_map(model, processor)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plan = []
    for t in reader.tensors:
        name = mapping.get(t.name)
        if name is None:
            continue
        if name not in shapes:
            raise UnsupportedLayout(name)
        plan.append((t, name, shapes[name]))
    return plan, processor


CHUNK_WEIGHTS = 1 << 24   # a large matrix is dequantised 16 M weights (64 MB in fp32) at a time


def _row_chunks(t, shape: tuple[int, ...]):
    """The GGUF tensor's data in blocks of whole rows (one block where rows must stay together).

    Dequantising an embedding in one go holds several temporaries of its full size (GBs for
    a 150k vocabulary); row blocks bound that. Llama's q/k rows are permuted across each
    head by the tensor processor, so those tensors (small) stay whole.
    """
    data = t.data
    whole = (len(shape) != 2 or data.ndim != 2 or data.shape[0] != shape[0]
             or ".attn_q." in t.name or ".attn_k." in t.name)
    if whole:
        yield data
        return
    step = max(1, CHUNK_WEIGHTS // max(1, shape[1]))
    for i in range(0, shape[0], step):
        yield data[i:i + step]


def write_weights(gguf: Path, config, target: Path, dtype: torch.dtype, progress: bool = False) -> int:
    """Dequantise ``gguf`` tensor by tensor into the safetensors file ``target`` (atomically).

    Returns the number of parameters written. Raises :class:`UnsupportedLayout` (leaving
    no file) when the GGUF does not map one-to-one onto the model's parameters.
    """
    from gguf import GGUFReader, dequantize
    from tqdm import tqdm

    reader = GGUFReader(str(gguf))
    model = empty_model(config)
    plan, processor = _plan(config, model, reader)
    del model
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, offset = {}, 0
    for _, name, shape in plan:
        n = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            parsed = {"tensors": {}}
            for t, name, shape in tqdm(plan, desc="dequantising", unit="tensor", disable=not progress):
                rows = 0
                for chunk in _row_chunks(t, shape):
                    w = processor.process(weights=dequantize(chunk, t.tensor_type), name=t.name,
                                          tensor_key_mapping={}, parsed_parameters=parsed).weights
                    w = np.ascontiguousarray(w)
                    x = torch.from_numpy(w if w.flags.writeable else w.copy())  # F32: file views
                    if tuple(x.shape[1:]) != shape[1:]:
                        raise UnsupportedLayout(f"{name}: {tuple(x.shape)} vs {shape}")
                    rows += x.shape[0] if x.dim() else 1
                    x = x.to(dtype).contiguous()
                    out.write(memoryview(x.view(torch.uint8).numpy()))
                    del w, x
                if rows != (shape[0] if shape else 1):
                    raise UnsupportedLayout(f"{name}: {rows} rows, expected {shape}")
    count = sum(int(np.prod(s)) for _, _, s in plan)
    del plan, processor, reader
    release_freed_memory()
    return count


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``), so the memory the
    conversion used does not stay resident under the weights loaded next."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # no glibc: nothing to trim
        pass
