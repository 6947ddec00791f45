"""Decode steps compute what the evaluation hooks compute: same kept neurons, same output."""
from __future__ import annotations

import pytest
import torch

from moyu import MoyuError
from moyu.arch import mlp_layers
from moyu.evaluate import Windows
from moyu.methods import METHODS, calibrate
from moyu.methods.base import LayerInputs
from moyu.runtime import decodable, lean_model, mlp_factory
from moyu.tiny import tiny_model

W = Windows(prompt=12, scored=12)
DECODABLE = sorted(m for m in METHODS if decodable(m))
NEURON = [m for m in DECODABLE if METHODS[m].granularity != "input"]


def _ids(n, seed):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def _reference(ml, x, keep):
    """The masked dense MLP: what the evaluation hook gives for this keep-mask."""
    a = ml.intermediate(x) * keep.to(x.dtype)
    return torch.nn.functional.linear(a, ml.w_down, ml.b_down)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text", "opt"])
@pytest.mark.parametrize("method", NEURON)
def test_step_matches_masked_reference(arch, method):
    model = tiny_model(arch)
    try:
        prof = calibrate(model, _ids(600, 1), method=method, sparsity=0.5, windows=W)
    except MoyuError as e:
        assert "gated MLP" in str(e)
        return
    factory = mlp_factory(model, prof)
    from moyu.methods import get_method
    torch.manual_seed(0)
    for ml in mlp_layers(model):
        step = factory(ml)
        rule = get_method(method).neuron_rule(prof, ml)
        d = ml.w_up.shape[1]
        prompt = torch.randn(10, d)
        x = torch.randn(d)
        with torch.inference_mode():
            y_prompt = step.prefill(prompt)
            assert torch.allclose(y_prompt, _reference(ml, prompt, torch.ones(ml.d_ff, dtype=torch.bool)), atol=1e-4)
            y = step.decode(x)
            if rule is None:
                keep = torch.ones(ml.d_ff, dtype=torch.bool)
            elif rule.sequence:
                keep = rule.choose(ml.intermediate(prompt)[None], LayerInputs())[0]
            else:
                a = ml.intermediate(x)[None, None]
                inp = LayerInputs(x=x[None, None])
                if ml.gated:
                    inp.g = torch.nn.functional.linear(x, ml.w_gate, ml.b_gate)[None, None]
                inp.u = torch.nn.functional.linear(x, ml.w_up, ml.b_up)[None, None]
                keep3 = rule.mask(a, inp)
                keep = keep3[0, 0]
                if method == "sketch-reuse":   # kept neurons take the sketch's own estimate
                    a_used = rule.apply(a, keep3, inp)[0, 0]
                    ref = torch.nn.functional.linear(a_used, ml.w_down, ml.b_down)
                    assert step.kept == int(keep.sum())
                    assert torch.allclose(y, ref, atol=1e-4)
                    continue
                if method == "relu":   # ReLU swaps the activation, not only the kept set
                    pre = inp.g if ml.gated else inp.u
                    act = torch.relu(pre[0, 0]) * keep
                    a_ref = act * inp.u[0, 0] if ml.gated else act
                    ref = torch.nn.functional.linear(a_ref, ml.w_down, ml.b_down)
                    assert torch.allclose(y, ref, atol=1e-4)
                    assert step.kept == int(keep.sum())
                    continue
            assert step.kept == int(keep.sum())
            assert torch.allclose(y, _reference(ml, x, keep), atol=1e-4)


@pytest.mark.parametrize("method", sorted(m for m in METHODS if not decodable(m)))
def test_methods_without_a_decode_step_are_refused_in_one_line(method):
    model = tiny_model("llama")
    prof = calibrate(model, _ids(600, 1), method=method, sparsity=0.5, windows=W)
    with pytest.raises(MoyuError, match="no decode path"):
        mlp_factory(model, prof)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
@pytest.mark.parametrize("method", [m for m in DECODABLE if m != "dense"])
def test_runtime_logits_equal_evaluation_path(arch, method):
    """One truth: the lean runtime with a profile gives the logits the evaluation hooks give."""
    from moyu.methods import sparsify

    model = tiny_model(arch)
    try:
        prof = calibrate(model, _ids(600, 1), method=method, sparsity=0.5, windows=W)
    except MoyuError as e:
        assert "gated MLP" in str(e)
        return
    ids, p = _ids(28, 7), 14
    sp = sparsify(model, prof)
    with torch.inference_mode(), sp:
        sp.begin(p)
        hooked = model(ids[None]).logits[0]
    lean = lean_model(model, prof, max_seq=64)
    ran = lean.logits(ids, n_prefill=p)
    assert torch.allclose(ran, hooked, atol=2e-4), (ran - hooked).abs().max()
    if method in ("teal", "wina"):   # input sparsity: fewer weight columns read, attention too
        # each projection has its own level (the greedy may leave a small one dense); the
        # MLP holds most of a layer's weights, so every layer's MLP reads fewer of them
        assert all(L.mlp.kept_share < 1 for L in lean.layers)
        return
    # the same neurons: per layer, the kept counts summed over the decoded positions equal
    # what the evaluation hooks counted over the same (sparse) positions
    d_ff = mlp_layers(model)[0].d_ff
    kept = torch.zeros(len(lean.layers))
    lean.prefill(ids[:p])
    for t in ids[p:]:
        lean.decode_step(int(t))
        kept += torch.tensor(lean.kept(), dtype=torch.float)
    runtime_sparsity = 1 - kept / ((len(ids) - p) * d_ff)
    hooked_sparsity = torch.tensor(sp.measured()["sparsity_per_layer"])
    assert torch.allclose(runtime_sparsity, hooked_sparsity, atol=1e-4), (runtime_sparsity, hooked_sparsity)
    assert 0 < float(runtime_sparsity.mean()) < 1


@pytest.mark.parametrize("method", DECODABLE)
def test_runtime_outlives_the_hf_model(method):
    """The runtime owns its tensors: with the HF model deleted, decoding still gives the same logits."""
    import gc
    import weakref

    model = tiny_model("llama")
    prof = calibrate(model, _ids(600, 1), method=method, sparsity=0.5, windows=W)
    ids = _ids(20, 3)
    lean = lean_model(model, prof, max_seq=32)
    before = lean.logits(ids, n_prefill=8)
    alive = weakref.ref(model)
    gate = weakref.ref(mlp_layers(model)[0].gate)
    del model, prof
    gc.collect()
    assert alive() is None and gate() is None
    assert torch.equal(lean.logits(ids, n_prefill=8), before)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_one_token_embedding_row_equals_the_sliced_rows(fmt):
    """A decoded token's embedding comes from one row of the quantized table directly; it
    must equal the rows a prompt lookup dequantizes, and refuse ids outside the table."""
    from moyu.kernels import weight_format
    from moyu.runtime.steps import DenseLinear
    w = torch.randn(300, 70)
    lin = DenseLinear(w, None, weight_format(fmt))
    for r in (0, 123, 299):
        assert torch.equal(lin.rows(torch.tensor([r])), lin.rows(torch.tensor([r, r]))[:1])
    with pytest.raises(IndexError):
        lin.rows(torch.tensor([300]))


@pytest.mark.parametrize("method", ["griffin", "tda", "sketch-reuse"])
def test_prefill_reuse_keeps_the_whole_prompts_set(method):
    """Sequence methods choose their set from the whole prompt even when its first tokens
    come from the previous prefill; without enable_prompt_reuse() reuse is refused."""
    model = tiny_model("llama", layers=2)
    prof = calibrate(model, _ids(600, 1), method=method, sparsity=0.5, windows=W)
    first, second = _ids(30, 2), _ids(36, 2)
    second[20:] = _ids(16, 3)
    ref = lean_model(model, prof, max_seq=64)
    want = ref.prefill(second)
    want_step = ref.decode_step(5)
    lean = lean_model(model, prof, max_seq=64)
    if method != "sketch-reuse":
        lean.prefill(first)
        with pytest.raises(MoyuError, match="enable_prompt_reuse"):
            lean.prefill(second, reuse=20)
    lean.enable_prompt_reuse()
    lean.prefill(first)
    got = lean.prefill(second, reuse=20)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(lean.decode_step(5), want_step, atol=1e-5, rtol=1e-5)
    assert lean.kept() == ref.kept()
