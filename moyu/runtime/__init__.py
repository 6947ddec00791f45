"""A lean batch-1 decode runtime: static KV cache, packed weights, pluggable MLP/linear steps.

``LeanModel.from_hf(model)`` converts a supported HF causal LM once; its decode loop
calls no HF module. ``lean_model(model, profile, weights)`` builds one that runs a
method's profile: sparse steps are looked up by the type of the method's rule
(:mod:`moyu.runtime.sparse`). Weights are packed in a :class:`~moyu.kernels.WeightFormat`.
"""
from .build import check_decodable, decodable, lean_model, linear_factory, mlp_factory
from .convert import LeanLayer, FlatModel, Norm
from .lean import LeanModel, Timings
from .sparse import STEPS, register_step, step_builder
from .steps import (DenseLinear, DenseMLPStep, MLPStep, dense_linear_factory, dense_mlp_factory,
                    pack_layer, packed_activations, packed_mlp_matmul)

__all__ = [
    "DenseLinear", "DenseMLPStep", "LeanLayer", "LeanModel", "FlatModel", "MLPStep", "Norm", "STEPS",
    "Timings", "check_decodable", "decodable", "dense_linear_factory", "dense_mlp_factory",
    "lean_model", "linear_factory", "mlp_factory", "pack_layer", "packed_activations",
    "packed_mlp_matmul", "register_step", "step_builder",
]
