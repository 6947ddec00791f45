"""Batch-1 sparse MLP and input-sparse linear kernels for CPU decode.

Decode is memory-bandwidth bound, so these kernels win by never reading the weights of
skipped neurons (or input channels). Pack the weights once (:func:`pack_mlp`,
:func:`pack_linear`), then call :func:`sparse_mlp`, :func:`sparse_mlp_threshold` or
:func:`input_sparse_linear` per token. A C++ extension (AVX2/FMA, ``at::parallel_for``)
is built on first use into ``$MOYU_CACHE/kernels``; without a compiler a PyTorch fallback
with the same semantics is used (``MOYU_KERNELS=torch|cpp`` forces either).

Quantized weights (int8 = GGUF Q8_0 blocks, int4 = GGUF Q4_1 blocks): :mod:`.quant`
(:class:`QuantMatrix`, :class:`QuantMLP`, :func:`quantize`, :func:`quantize_mlp`,
:func:`from_gguf`) and the integer kernels of :mod:`.quant_ops` (:func:`q_matvec`,
:func:`q_axpy`, :func:`q_mlp`, :func:`q_mlp_threshold`, :func:`q_sketch_mlp`,
:func:`q_mlp_act`), built from ``quant_kernels.cpp`` with run-time ISA dispatch.
"""
from .formats import FORMATS, WeightFormat, weight_format
from .ops import (attn_decode, backend_name, input_sparse_linear, rms_norm, rows_matvec, sketch_act,
                  sketch_mlp, sparse_mlp, sparse_mlp_threshold)
from ._torch_impl import one_thread, rope_
from .packing import (ACTIVATION_FNS, ACTIVATIONS, PackedLinear, PackedMLP, activation_id,
                      activation_kind, pack_linear, pack_mlp)
from .quant import QUANT_FORMATS, QuantMatrix, QuantMLP, from_gguf, interleave_rows, quantize, quantize_mlp
from .quant_ops import (q_axpy, q_matvec, q_mlp, q_mlp_act, q_mlp_threshold, q_sketch_mlp, quant_backend_name,
                        quant_isa, set_quant_isa)

__all__ = [
    "ACTIVATIONS", "ACTIVATION_FNS", "FORMATS", "PackedLinear", "PackedMLP", "WeightFormat",
    "activation_id", "activation_kind", "attn_decode", "backend_name", "input_sparse_linear",
    "one_thread", "pack_linear", "pack_mlp", "rms_norm", "rope_", "rows_matvec", "sketch_act", "sketch_mlp", "sparse_mlp",
    "sparse_mlp_threshold", "weight_format",
    "QUANT_FORMATS", "QuantMLP", "QuantMatrix", "from_gguf", "interleave_rows", "q_axpy", "q_matvec", "q_mlp",
    "q_mlp_act", "q_mlp_threshold", "q_sketch_mlp", "quant_backend_name", "quant_isa", "quantize",
    "quantize_mlp", "set_quant_isa",
]
