"""Every method on every architecture: sparsity 0 is dense, sparsity > 0 changes and is measured,
batches are per-sequence, profiles round-trip and refuse the wrong model or a corrupt file."""
from __future__ import annotations

import pytest
import torch

from moyu import MoyuError
from moyu.evaluate import Windows, evaluate
from moyu.methods import METHODS, calibrate, get_method, sparsify
from moyu.profile import Profile
from moyu.tiny import TINY_TYPES, tiny_model

W = Windows(prompt=12, scored=12)
GATED_ONLY = {m for m, obj in METHODS.items() if obj.needs_gate}


@pytest.fixture(scope="module")
def models():
    return {t: tiny_model(t) for t in TINY_TYPES}


def _ids(n=160, seed=1):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, sp=None, prompt=W.prompt):
    with torch.inference_mode():
        if sp is None:
            return model(ids[None]).logits[0]
        with sp:
            sp.begin(prompt)
            return model(ids[None]).logits[0]



@pytest.mark.parametrize("arch", TINY_TYPES)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_sparsity_zero_reproduces_dense(models, arch, method):
    model = models[arch]
    try:
        get_method(method).check(model)
    except MoyuError as e:
        assert method in GATED_ONLY and "gated MLP" in str(e)
        return
    prof = calibrate(model, _ids(), method=method, sparsity=0.0, windows=W)
    ids = _ids(40, seed=2)
    dense = _logits(model, ids)
    sp = sparsify(model, prof)
    assert torch.allclose(_logits(model, ids, sp), dense, atol=1e-5, rtol=0)
    assert sp.measured()["sparsity"] == 0.0


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3", "gemma3_text"])
@pytest.mark.parametrize("method", ["oracle", "cats", "teal", "wina", "griffin", "tda", "sketch",
                                    "dejavu", "moe", "relu", "cett"])
def test_sparsity_changes_output_prompt_stays_dense(models, arch, method):
    model = models[arch]
    try:
        get_method(method).check(model)
    except MoyuError:
        return
    prof = calibrate(model, _ids(400), method=method, sparsity=0.5, windows=W)
    ids = _ids(40, seed=3)
    dense = _logits(model, ids)
    sp = sparsify(model, prof)
    other = _logits(model, ids, sp, prompt=20)
    assert torch.allclose(other[:20], dense[:20], atol=1e-5), "prompt positions must run dense"
    assert not torch.allclose(other[20:], dense[20:], atol=1e-4), "sparse positions must change"
    got = sp.measured()["sparsity"]
    assert 0.05 < got < 0.95
    # the hooks are gone after the block
    assert torch.equal(_logits(model, ids), dense)


@pytest.mark.parametrize("method", ["oracle", "cats", "cett", "griffin", "tda", "sketch", "sketch-reuse",
                                    "teal", "wina", "dejavu", "moe", "relu"])
def test_batch_rows_match_single_runs(models, method):
    model = models["llama"]
    prof = calibrate(model, _ids(400), method=method, sparsity=0.5, windows=W)
    batch = torch.stack([_ids(30, seed=s) for s in (5, 6, 7)])
    sp = sparsify(model, prof)
    with torch.inference_mode(), sp:
        sp.begin(10)
        together = model(batch).logits
    for row in range(3):
        alone = _logits(model, batch[row], sp, prompt=10)
        assert torch.allclose(together[row], alone, atol=1e-4)


def test_generate_auto_mode_matches_protocol(models):
    """Inside `with sparsify(...)`, generate() runs its prefill dense and decodes sparse."""
    model = models["llama"]
    prof = calibrate(model, _ids(400), method="griffin", sparsity=0.5, windows=W)
    prompt = _ids(16, seed=9)[None]
    sp = sparsify(model, prof)
    with torch.inference_mode(), sp:
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                             do_sample=False, pad_token_id=0)
    full = out[0]
    teacher = _logits(model, full, sp, prompt=16)
    assert torch.equal(teacher[15:-1].argmax(-1), full[16:])


@pytest.mark.parametrize("method", ["cats", "teal", "griffin", "sketch", "dejavu"])
def test_cett_budget_reaches_every_method_as_a_sparsity(models, method):
    """--cett B with a method other than cett: the sparsity the cett method reaches at B."""
    model = models["llama"]
    ref = calibrate(model, _ids(400), method="cett", cett=0.2, windows=W)
    prof = calibrate(model, _ids(400), method=method, cett=0.2, windows=W)
    assert prof.target == {"cett": 0.2, "sparsity": ref.calib["sparsity"]}
    assert 0.05 < prof.target["sparsity"] < 0.95
    ids = _ids(40, seed=3)
    assert not torch.allclose(_logits(model, ids, sparsify(model, prof)), _logits(model, ids), atol=1e-4)
    zero = calibrate(model, _ids(400), method=method, cett=0.0, windows=W)   # no error allowed: dense
    assert zero.target["sparsity"] == 0.0
    assert torch.allclose(_logits(model, ids, sparsify(model, zero)), _logits(model, ids), atol=1e-5, rtol=0)


def test_cett_budget_needs_text_and_a_valid_range(models):
    with pytest.raises(MoyuError, match="CETT budget 1.5 is outside"):
        calibrate(models["llama"], _ids(400), method="cats", cett=1.5, windows=W)
    with pytest.raises(MoyuError, match="needs calibration text"):
        calibrate(models["llama"], None, method="cats", cett=0.2, windows=W)


def test_threshold_sparsity_hits_target_on_held_out(models):
    model = tiny_model("llama", layers=2)
    prof = calibrate(model, _ids(2000, seed=1), method="sketch", sparsity=0.5, windows=W,
                     per_window=12, calib_windows=100)
    res = evaluate(model, _ids(800, seed=2), W, modifier=sparsify(model, prof))
    assert abs(res.extra["sparsity"] - 0.5) < 0.05


def test_profile_roundtrip_and_refusals(models, tmp_path):
    model = models["llama"]
    prof = calibrate(model, _ids(400), method="sketch", sparsity=0.4, windows=W)
    path = prof.save(tmp_path / "p.moyu")
    back = Profile.load(path)
    assert back.method == "sketch" and back.target == {"sparsity": 0.4}
    assert set(back.tensors) == set(prof.tensors)
    ids = _ids(40, seed=4)
    a = _logits(model, ids, sparsify(model, prof))
    b = _logits(model, ids, sparsify(model, back))
    assert torch.equal(a, b)
    with pytest.raises(MoyuError, match="made for model"):
        sparsify(models["mistral"], back)
    with pytest.raises(MoyuError, match="made for model"):   # same type and shapes, other weights
        sparsify(tiny_model("llama", seed=1), back)
    bad = tmp_path / "bad.moyu"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(MoyuError, match="not a valid moyu profile"):
        Profile.load(bad)
    with pytest.raises(MoyuError, match="not found"):
        Profile.load(tmp_path / "missing.moyu")
    assert not list(tmp_path.glob(".*")), "no temporary files left behind"


def test_bad_targets_and_methods(models):
    model = models["gpt2"]
    for s in (-0.1, 1.0, 1.5):
        with pytest.raises(MoyuError, match=r"outside \[0, 1\)"):
            calibrate(model, _ids(), method="griffin", sparsity=s, windows=W)
    with pytest.raises(MoyuError, match="known methods are"):
        calibrate(model, _ids(), method="nope", sparsity=0.5, windows=W)
    with pytest.raises(MoyuError, match="needs a gated MLP"):
        calibrate(model, _ids(), method="cats", sparsity=0.5, windows=W)
    with pytest.raises(MoyuError, match="too little calibration text"):
        calibrate(models["llama"], _ids(30), method="cats", sparsity=0.5, windows=W)


def test_teal_uniform_allocation_gives_every_layer_the_target():
    """TEAL's two allocations: uniform puts the target on every layer, greedy spreads it."""
    model = tiny_model("llama", layers=3)
    uni = calibrate(model, _ids(600), method="teal", sparsity=0.5, windows=W, allocation="uniform")
    greedy = calibrate(model, _ids(600), method="teal", sparsity=0.5, windows=W)
    assert uni.params["allocation"] == "uniform" and greedy.params["allocation"] == "greedy"
    assert all(abs(s - 0.5) < 0.02 for s in uni.calib["sparsity_per_layer"])
    assert abs(greedy.calib["sparsity"] - 0.5) < 0.02
    ids = _ids(40, seed=3)
    assert not torch.equal(_logits(model, ids, sparsify(model, uni)), _logits(model, ids, sparsify(model, greedy)))
