"""The architecture table: every supported type builds, its MLP is read correctly, and an
unsupported model is refused in one line naming its type and the supported ones."""
from __future__ import annotations

import pytest
import torch

from moyu import MoyuError
from moyu.arch import ARCHITECTURES, mlp_layers, architecture_of, supported_types
from moyu.tiny import TINY_TYPES

pytestmark = pytest.mark.usefixtures("one_thread")

REQUIRED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text",
            "phi3", "gpt2", "opt", "gpt_neox"}
PLAIN = {"gpt2", "opt", "gpt_neox"}


def test_table_covers_the_required_types():
    assert REQUIRED <= set(supported_types())
    assert set(TINY_TYPES) | {"gemma3"} == set(ARCHITECTURES)


def _mlp_io(model, ml, ids):
    """What enters the MLP (up's input) and what enters the down projection, in a real forward."""
    seen = {}
    h1 = ml.up.register_forward_pre_hook(lambda _m, a: seen.__setitem__("x", a[0].detach().clone()))
    h2 = ml.down.register_forward_pre_hook(lambda _m, a: seen.__setitem__("a", a[0].detach().clone()))
    try:
        with torch.inference_mode():
            model(ids)
    finally:
        h1.remove()
        h2.remove()
    return seen["x"], seen["a"]


@pytest.mark.parametrize("arch", TINY_TYPES)
def test_mlp_layers_shapes_and_intermediate(tiny, arch):
    model = tiny(arch)
    assert model.config.model_type == arch
    spec = architecture_of(model)
    layers = mlp_layers(model)
    assert len(layers) == 2
    d = model.get_input_embeddings().weight.shape[1]
    ids = torch.randint(0, 256, (1, 11), generator=torch.Generator().manual_seed(0))
    for ml in layers:
        assert ml.gated == (arch not in PLAIN) == spec.gated
        assert ml.d_ff == 192
        assert ml.w_up.shape == (192, d) and ml.w_down.shape == (d, 192)
        if ml.gated:
            assert ml.w_gate.shape == (192, d)
        else:
            assert ml.w_gate is None and ml.b_gate is None
        if ml.b_up is not None:
            assert ml.b_up.shape == (192,)
        if ml.b_down is not None:
            assert ml.b_down.shape == (d,)
        roles = set(ml.attn_linears())
        assert roles in ({"q", "k", "v", "o"}, {"qkv", "o"})
        assert set(ml.mlp_linears()) >= {"up", "down"}
        x, a = _mlp_io(model, ml, ids)
        with torch.inference_mode():
            mine = ml.intermediate(x)
        assert mine.shape == a.shape
        assert torch.allclose(mine, a, atol=1e-5, rtol=1e-4), (arch, (mine - a).abs().max())


def test_phi3_fused_gate_up_is_split_gate_first(tiny):
    model = tiny("phi3")
    ml = mlp_layers(model)[0]
    fused = ml.up.weight
    assert fused.shape[0] == 2 * ml.d_ff
    assert torch.equal(ml.w_gate, fused[: ml.d_ff]) and torch.equal(ml.w_up, fused[ml.d_ff:])
    assert ml.gate_module() is ml.up
    out = torch.arange(2 * ml.d_ff, dtype=torch.float32)[None]
    assert torch.equal(ml.gate_from_output(out), out[:, : ml.d_ff])
    # swapping the halves must change the activation (so the order is actually tested)
    x = torch.randn(3, ml.w_up.shape[1])
    swapped = ml.act(x @ ml.w_up.T) * (x @ ml.w_gate.T)
    assert not torch.allclose(ml.intermediate(x), swapped, atol=1e-4)


def test_gpt2_conv1d_weights_in_linear_layout(tiny):
    ml = mlp_layers(tiny("gpt2"))[0]
    assert ml.arch.conv1d
    assert torch.equal(ml.w_up, ml.up.weight.t()) and torch.equal(ml.w_down, ml.down.weight.t())


def test_gemma3_multimodal_model_reaches_its_language_layers():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gemma3")
    tc = cfg.text_config
    for k, v in dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=300, head_dim=16, sliding_window=32,
                     query_pre_attn_scalar=16).items():
        setattr(tc, k, v)
    tc.layer_types = tc.layer_types[:2]
    vc = cfg.vision_config
    for k, v in dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     image_size=28, patch_size=14).items():
        setattr(vc, k, v)
    cfg.mm_tokens_per_image, cfg.image_token_index, cfg.boi_token_index, cfg.eoi_token_index = 4, 299, 297, 298
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert model.config.model_type == "gemma3"
    layers = mlp_layers(model)
    assert len(layers) == 2 and layers[0].gated and layers[0].d_ff == 192
    x, a = _mlp_io(model, layers[1], torch.tensor([[2, 5, 7, 9]]))
    with torch.inference_mode():
        assert torch.allclose(layers[1].intermediate(x), a, atol=1e-5)


@pytest.mark.parametrize("model_type", ["bloom", "mixtral"])
def test_unsupported_architecture_is_one_line(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    small = dict(hidden_size=32, num_attention_heads=2, vocab_size=64)
    small.update(dict(n_layer=1, n_head=2) if model_type == "bloom" else
                 dict(num_hidden_layers=1, intermediate_size=64, num_key_value_heads=1,
                      num_local_experts=2, num_experts_per_tok=1))
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **small))
    for call in (architecture_of, mlp_layers):
        with pytest.raises(MoyuError) as e:
            call(model)
        msg = str(e.value)
        assert "\n" not in msg and f"'{model_type}'" in msg
        assert all(t in msg for t in REQUIRED)


def test_object_without_config_is_refused():
    with pytest.raises(MoyuError, match="unsupported architecture 'None'"):
        architecture_of(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2", "opt"])
def test_tap_streams_are_what_the_mlp_computes(arch):
    """One tap API: every stream is the tensor the MLP really computes; ``act`` can be edited."""
    import torch
    from moyu.arch import STREAMS, mlp_layers
    from moyu.tiny import tiny_model

    model = tiny_model(arch)
    ml = mlp_layers(model)[0]
    seen = {}
    handles = [ml.tap(s, lambda t, s=s: seen.setdefault(s, t.detach().clone()))
               for s in STREAMS if s != "gate" or ml.gated]
    ids = torch.arange(3, 11)[None]
    with torch.no_grad():
        ref = model(ids).logits
    for h in handles:
        h.remove()
    x = seen["x"]
    with torch.no_grad():
        assert torch.allclose(seen["act"], ml.intermediate(x), atol=1e-5)
        assert torch.allclose(seen["out"], ml.mlp(x) if ml.arch.mlp else torch.nn.functional.linear(
            seen["act"], ml.w_down, ml.b_down), atol=1e-5)
        assert torch.allclose(seen["up"], torch.nn.functional.linear(x, ml.w_up, ml.b_up), atol=1e-5)
        if ml.gated:
            assert torch.allclose(seen["gate"], torch.nn.functional.linear(x, ml.w_gate, ml.b_gate), atol=1e-5)
    assert seen["attn_in"].shape[-1] == x.shape[-1] and "o_in" in seen
    h = ml.tap("act", lambda a: torch.zeros_like(a))   # an edit reaches the down projection
    with torch.no_grad():
        zeroed = model(ids).logits
    h.remove()
    assert not torch.allclose(zeroed, ref)
    with pytest.raises(ValueError, match="unknown MLP stream"):
        ml.tap("nope", print)
