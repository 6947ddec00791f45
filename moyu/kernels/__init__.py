"""Batch-1 sparse MLP and input-sparse linear kernels for CPU decode.

Decode is memory-bandwidth bound, so these kernels win by never reading the weights of
skipped neurons (or input channels). Pack the weights once (:func:`pack_mlp`,
:func:`pack_linear`), then call :func:`sparse_mlp`, :func:`sparse_mlp_threshold` or
:func:`input_sparse_linear` per token. A C++ extension (AVX2/FMA, ``at::parallel_for``)
is built on first use into ``$MOYU_CACHE/kernels``; without a compiler a PyTorch fallback
with the same semantics is used (``MOYU_KERNELS=torch|cpp`` forces either).
"""
from .formats import FORMATS, WeightFormat, weight_format
from .ops import (attn_decode, backend_name, input_sparse_linear, rms_norm, sketch_act, sketch_mlp,
                  sparse_mlp, sparse_mlp_threshold)
from ._torch_impl import one_thread, rope_
from .packing import (ACTIVATION_FNS, ACTIVATIONS, PackedLinear, PackedMLP, activation_id,
                      activation_kind, pack_linear, pack_mlp)

__all__ = [
    "ACTIVATIONS", "ACTIVATION_FNS", "FORMATS", "PackedLinear", "PackedMLP", "WeightFormat",
    "activation_id", "activation_kind", "attn_decode", "backend_name", "input_sparse_linear",
    "one_thread", "pack_linear", "pack_mlp", "rms_norm", "rope_", "sketch_act", "sketch_mlp", "sparse_mlp",
    "sparse_mlp_threshold", "weight_format",
]
