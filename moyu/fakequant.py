"""The lean runtime's weight formats simulated on a Hugging Face model.

``eval``, ``calibrate`` and ``sweep`` run the HF model with hooks (``moyu.methods``), while
``bench``/``generate`` decode with packed weights (``moyu.runtime``). For the two to measure
the same model at ``--weights int8``/``int4``/``bf16``, :class:`QuantizedWeights` makes each
HF linear compute what the runtime's kernel computes:

* the weight is replaced by its quantize-dequantize round trip in the format the runtime
  stores that role in (:meth:`WeightFormat.for_role`: int4 keeps ``down`` and the head in
  int8), blocked the way the runtime blocks it: along the input for row-major matrices,
  along the output for the MLP ``down`` projection (stored neuron-major);
* for block-quantized formats, the input of every row-major matrix is rounded the way the
  integer kernels quantize it (int8 blocks of 32, one scale each); the ``down`` projection
  takes its input in float32 (its kernel accumulates ``a_i * row_i``);
* a tied embedding returns rows of the quantized head, as the runtime does; an untied one
  rows of its own table rounded in the head's format (the runtime stores it that way).

Rounding is bit-for-bit the runtime's, in prefill and decode alike; only float summation
order differs (tested: logits agree to ~1e-7 where the formats move them by ~1e-2, unless a
last-bit difference moves one activation across a rounding boundary). Not
simulated: input-sparse attention projections (``teal``) store ``W^T`` in the runtime.
Statistics that methods read straight from the weights (down-projection norms, the per-row
int8 sketch of ``sketch``/``sketch-reuse``) come from the original float weights, while the
runtime at int8/int4 scores those methods' neurons from the quantized gate/up themselves:
their thresholds are calibrated on the format's activations but from a slightly different
score, so achieved sparsity at decode can differ by a little from eval's.
"""
from __future__ import annotations

import types
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .arch import mlp_layers
from .kernels.formats import WeightFormat, weight_format


PARTS = ("attn", "mlp_in", "down", "head")
"""What :class:`QuantizedWeights` can round: attention projections, MLP gate/up (or fc1),
the MLP down projection, and the output head (with a tied embedding)."""


def _round_weight(w: Tensor, fmt: WeightFormat, transposed: bool) -> Tensor:
    """``w [out, in]`` after the round trip through ``fmt`` (blocks along ``in``, or along
    ``out`` when ``transposed``)."""
    w = w.detach().float()
    if not fmt.quantized:
        return w.to(fmt.dtype).float()
    from .kernels.quant import pack_quantized
    if transposed:
        return pack_quantized(w.t(), fmt.name).dequantize().t().contiguous()
    return pack_quantized(w, fmt.name).dequantize()


class QuantizedWeights:
    """Context manager: inside it, ``model`` computes with ``weights``-format linears.

    Build once per model (the rounded weights are computed here and held, one float32 copy
    of the linear weights); enter and leave as often as needed. Leaving restores the original
    forwards exactly. It also has the evaluation harness's modifier interface (``begin``,
    ``measured``), so ``evaluate(model, ids, modifier=QuantizedWeights(model, "int8"))``
    measures the dense model at that format against fp32 dense.
    """

    def __init__(self, model: nn.Module, weights: "str | WeightFormat",
                 parts: "set[str] | None" = None, round_inputs: bool = True):
        """``parts`` limits the simulation to some of ``PARTS`` (default: all) and
        ``round_inputs=False`` keeps activations in float32: both only to attribute the
        format's error (``benchmarks/quant_error_parts.py``); the runtime does all."""
        self.fmt = weight_format(weights)
        self.model = model
        self._plan: list[tuple[nn.Module, Any]] = []
        self._saved: list[tuple[nn.Module, Any]] = []
        parts = set(PARTS if parts is None else parts)
        if parts - set(PARTS):
            raise ValueError(f"unknown parts {sorted(parts - set(PARTS))}: use {', '.join(PARTS)}")
        if self.fmt.name == "fp32":
            return
        round_in = self.fmt.quantized and round_inputs
        for ml in mlp_layers(model):
            conv1d = ml.arch.conv1d
            for role, mod in {**ml.attn_linears(), **ml.mlp_linears()}.items():
                part = "down" if role == "down" else ("mlp_in" if role in ("gate", "up") else "attn")
                if part not in parts:
                    continue
                w = mod.weight.t() if conv1d else mod.weight
                down = role == "down"
                wq = _round_weight(w, self.fmt.for_role("down" if down else role), transposed=down)
                self._plan.append((mod, self._linear(wq, mod.bias, round_in and not down)))
        if "head" not in parts:
            return
        head = model.get_output_embeddings()
        emb = model.get_input_embeddings()
        hq = _round_weight(head.weight, self.fmt.for_role("head"), transposed=False)
        self._plan.append((head, self._linear(hq, getattr(head, "bias", None), round_in)))
        if emb.weight.data_ptr() == head.weight.data_ptr():
            self._plan.append((emb, self._embedding(emb, hq)))
        else:   # the runtime stores an untied table in the head's format too
            self._plan.append((emb, self._embedding(emb, _round_weight(emb.weight, self.fmt.for_role("head"), False))))

    @staticmethod
    def _linear(wq: Tensor, bias: Tensor | None, round_in: bool):
        from .kernels.quant import round_activations

        def forward(_self, x: Tensor) -> Tensor:
            xin = round_activations(x.float()) if round_in else x.float()
            y = F.linear(xin, wq, None if bias is None else bias.float())
            return y.to(x.dtype)
        return forward

    @staticmethod
    def _embedding(emb: nn.Module, table: Tensor):
        original = type(emb).forward

        def forward(_self, ids: Tensor) -> Tensor:
            saved = _self.weight
            try:   # reuse the module's own forward (padding, scaling) on the rounded table
                _self._parameters["weight"] = nn.Parameter(table.to(saved.dtype), requires_grad=False)
                return original(_self, ids)
            finally:
                _self._parameters["weight"] = saved
        return forward

    def __enter__(self) -> "QuantizedWeights":
        if self._saved:
            raise RuntimeError("QuantizedWeights is already active")
        for mod, fwd in self._plan:
            self._saved.append((mod, mod.__dict__.get("forward")))
            mod.forward = types.MethodType(fwd, mod)
        return self

    def __exit__(self, *exc: Any) -> None:
        for mod, prev in reversed(self._saved):
            if prev is None:
                del mod.forward
            else:
                mod.forward = prev
        self._saved.clear()

    def begin(self, prompt_len: "int | list[int]") -> None:
        """Nothing to do per forward (harness interface)."""

    def resume(self) -> None:
        """Nothing to do: every position runs at the format (harness interface)."""

    def measured(self) -> dict[str, float]:
        """No counters (harness interface)."""
        return {}


class Both:
    """Two modifiers as one: ``outer`` entered first (the weight format), then ``inner``
    (a sparsifier); ``measured`` is the inner one's."""

    def __init__(self, outer: Any, inner: Any):
        self.outer, self.inner = outer, inner

    def __enter__(self) -> "Both":
        self.outer.__enter__()
        try:
            self.inner.__enter__()
        except BaseException:
            self.outer.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.inner.__exit__(*exc)
        finally:
            self.outer.__exit__(*exc)

    def begin(self, prompt_len: "int | list[int]") -> None:
        """Forwarded to both."""
        self.outer.begin(prompt_len)
        self.inner.begin(prompt_len)

    def resume(self) -> None:
        """Forwarded to both."""
        self.outer.resume()
        self.inner.resume()

    def measured(self) -> dict[str, float]:
        """The inner modifier's counters."""
        return self.inner.measured()


def calibrate_at(model: nn.Module, ids: Tensor, weights: "str | WeightFormat" = "fp32", **kwargs: Any):
    """:func:`moyu.methods.calibrate` on the path decode runs at ``weights``: inside
    :class:`QuantizedWeights` for any format but fp32 (so thresholds fit the format's own
    activations), as is for fp32. ``kwargs`` go to ``calibrate`` (``method``, ``sparsity`` ...).
    The profile records the format in ``calib["weights"]``."""
    import contextlib

    from .methods import calibrate
    fmt = weight_format(weights)
    with contextlib.nullcontext() if fmt.name == "fp32" else QuantizedWeights(model, fmt.name):
        prof = calibrate(model, ids, **kwargs)
    prof.calib["weights"] = fmt.name
    return prof
