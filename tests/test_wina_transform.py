"""WINA's orthogonal transform (``--option transform=svd``): the rotated key weights have
orthogonal columns, the transformed layer is the folded linear on the kept rotated channels,
and with every channel kept the model is dense."""
from __future__ import annotations

import pytest
import torch

from moyu import MoyuError
from moyu.arch import mlp_layers
from moyu.methods import calibrate, sparsify
from moyu.methods.base import InputRule, Sparsifier, projection_weight, projections
from moyu.methods.rotation import norm_affine, rotations

pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(n, seed=0):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "phi3", "gpt2"])
def test_rotated_key_weights_have_orthogonal_columns(tiny, arch):
    ml = mlp_layers(tiny(arch))[0]
    roles = list(projections(ml))
    rot, norms = rotations(ml, roles)
    for key in [r for r in ("k", "qkv", "gate", "gate_up") if r in roles] or ["up"]:
        r = rot[key]
        w = projection_weight(ml, key).double() * r.g.double()[None] @ r.q.double()
        gram = w.T @ w
        off = gram - torch.diag(torch.diagonal(gram))
        assert float(off.abs().max()) < 1e-4 * float(gram.abs().max()), key
        assert torch.allclose(norms[key].double(), torch.diagonal(gram).sqrt(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "phi3", "gpt2"])
def test_every_channel_kept_is_the_dense_model(tiny, arch):
    model = tiny(arch)
    ids = _ids(40)[None]
    layers = mlp_layers(model)
    rules = []
    for ml in layers:
        roles = list(projections(ml))
        rot, norms = rotations(ml, roles)
        rules.append(InputRule({r: -1.0 for r in roles}, norms, rot))
    with torch.inference_mode():
        dense = model(ids).logits
        sp = Sparsifier(model, input_rules=rules, method="wina")
        with sp:
            sp.begin(0)
            out = model(ids).logits
    assert sp.measured()["sparsity"] == 0.0
    assert torch.allclose(out, dense, atol=1e-4, rtol=1e-4)


def test_a_masked_projection_is_the_folded_linear_on_kept_rotated_channels(tiny):
    model = tiny("llama")
    ml = mlp_layers(model)[0]
    roles = list(projections(ml))
    rot, norms = rotations(ml, roles)
    k = projections(ml)["k"]
    seen = {}
    h1 = k.register_forward_pre_hook(lambda _m, a: seen.__setitem__("y", a[0].clone()))
    h2 = k.register_forward_hook(lambda _m, _a, o: seen.__setitem__("out", o.clone()))
    taus = {r: -1.0 for r in roles}
    taus["k"] = 0.05
    sp = Sparsifier(model, input_rules=[InputRule(taus, norms, rot)] + [None] * (len(mlp_layers(model)) - 1),
                    method="wina")
    try:
        with torch.inference_mode(), sp:
            sp.begin(0)
            model(_ids(24)[None])
    finally:
        h1.remove()
        h2.remove()
    r = rot["k"]
    g, b = norm_affine(ml.layer.input_layernorm, r.q.shape[0])
    z = ((seen["y"] - b) / g) @ r.q                              # z' = Q^T z
    keep = (z.abs() * norms["k"]) > 0.05
    assert 0 < float(keep.float().mean()) < 1
    folded = (k.weight.double() * g.double()[None]) @ r.q.double()   # W diag(g) Q
    want = (z.double() * keep) @ folded.T + (k.weight.double() @ b.double())
    if k.bias is not None:
        want = want + k.bias.double()
    assert torch.allclose(seen["out"].double(), want, atol=1e-4)


def test_calibrated_transform_hits_the_target_and_has_no_decode_path(tiny):
    from moyu.runtime import lean_model
    model = tiny("llama")
    ids = _ids(2000, seed=1)
    from moyu.evaluate import Windows, evaluate
    w = Windows(prompt=16, scored=32)
    prof = calibrate(model, ids, method="wina", sparsity=0.5, windows=w, allocation="uniform",
                     transform="svd", per_window=8)
    assert prof.params["transform"] == "svd"
    res = evaluate(model, _ids(600, seed=2), w, modifier=sparsify(model, prof))
    assert abs(res.extra["sparsity"] - 0.5) < 0.08
    plain = calibrate(model, ids, method="wina", sparsity=0.5, windows=w, allocation="uniform", per_window=8)
    assert evaluate(model, _ids(600, seed=2), w, modifier=sparsify(model, plain)).kl != res.kl
    with pytest.raises(MoyuError, match="transform=svd has no decode path"):
        lean_model(model, prof)


def test_unknown_transform_lists_the_allowed_values():
    from moyu import cli
    with pytest.raises(MoyuError, match="allowed values are none, svd"):
        cli.method_options("wina", ["transform=qr"])
    with pytest.raises(MoyuError):
        cli.method_options("teal", ["transform=svd"])    # TEAL has no transform
