"""A lean batch-1 decode runtime: static KV cache, packed weights, pluggable MLP/linear steps.

``LeanModel.from_hf(model)`` converts a supported HF causal LM once; its decode loop
calls no HF module. Sparse methods plug in through ``mlp_factory`` (one
:class:`MLPStep` per layer) and ``linear_factory`` (attention projections).
"""
from .convert import LeanLayer, LeanSpec, Norm
from .lean import LeanModel, Timings
from .steps import (DenseLinear, DenseMLPStep, MLPStep, TorchMLPStep, activation_fn,
                    activation_kind, dense_linear_factory, dense_mlp_factory, pack_layer,
                    packed_mlp_matmul)

__all__ = [
    "DenseLinear", "DenseMLPStep", "LeanLayer", "LeanModel", "LeanSpec", "MLPStep", "Norm",
    "Timings", "TorchMLPStep", "activation_fn", "activation_kind", "dense_linear_factory",
    "dense_mlp_factory", "pack_layer", "packed_mlp_matmul",
]
