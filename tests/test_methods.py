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
SPARSE = sorted(m for m in METHODS if m != "dense")


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
@pytest.mark.parametrize("method", SPARSE)
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


@pytest.mark.parametrize("method", SPARSE)
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


def test_tda_with_griffins_statistic_and_a_k_threshold_is_griffin():
    """TDA thresholds a prompt statistic; with GRIFFIN's statistic and a per-prompt threshold
    that keeps exactly k, it keeps GRIFFIN's set."""
    from moyu.methods.griffin import PromptTopKRule
    from moyu.methods.tda import PromptThresholdRule, tda_stat
    a = torch.randn(3, 20, 64, generator=torch.Generator().manual_seed(0)) * torch.rand(64) * 3
    k = 24
    griffin = PromptTopKRule(k).choose(a, None)
    for row in range(3):
        s = tda_stat(a[row:row + 1], "griffin")[0]
        theta = float(s.sort(descending=True).values[k])   # the (k+1)-th largest: keeps exactly k
        tda = PromptThresholdRule(theta, norm="griffin").choose(a[row:row + 1], None)[0]
        assert int(tda.sum()) == k and torch.equal(tda, griffin[row])


def test_tda_statistic_is_the_length_normalised_l2_norm():
    from moyu.methods.tda import tda_stat
    a = torch.randn(1, 10, 8)
    assert torch.allclose(tda_stat(a, "l2")[0], (a[0] ** 2).mean(0).sqrt())
    assert float(tda_stat(a, "max").max()) == pytest.approx(1.0)
    with pytest.raises(MoyuError, match="allowed values are l2, max, griffin"):
        calibrate(tiny_model("llama", layers=1), _ids(400), method="tda", sparsity=0.5, windows=W, norm="l1")


def test_tda_calibrated_threshold_hits_the_target_on_held_out():
    model = tiny_model("llama", layers=2)
    prof = calibrate(model, _ids(3000, seed=1), method="tda", sparsity=0.5, windows=W, calib_windows=200)
    assert prof.params["norm"] == "l2" and prof.config_version == 3
    res = evaluate(model, _ids(1200, seed=2), W, modifier=sparsify(model, prof))
    assert abs(res.extra["sparsity"] - 0.5) < 0.05


def test_tda_thresholds_follow_the_prompt_length():
    """One threshold per calibrated prompt length, interpolated in log length and clamped;
    ``by_length=false`` keeps one threshold, fitted on the full prompts."""
    from moyu.methods.tda import PromptThresholdRule, calib_lengths
    assert calib_lengths(32) == [8, 16, 32] and calib_lengths(20) == [8, 16, 20] and calib_lengths(8) == [8]
    rule = PromptThresholdRule(torch.tensor([1.0, 2.0, 4.0]), lengths=torch.tensor([8.0, 16.0, 64.0]))
    assert rule.theta_at(4) == 1.0 and rule.theta_at(8) == 1.0 and rule.theta_at(1000) == 4.0
    assert rule.theta_at(32) == pytest.approx(3.0)   # halfway from 16 to 64 in log2
    a = torch.ones(1, 8, 4) * torch.tensor([0.5, 1.5, 2.5, 3.5])
    assert rule.choose(a, None)[0].tolist() == [False, True, True, True]        # 8 tokens: theta 1
    assert rule.choose(a.repeat(1, 8, 1), None)[0].tolist() == [False, False, False, False]  # 64: theta 4
    model = tiny_model("llama", layers=2)
    prof = calibrate(model, _ids(3000, seed=1), method="tda", sparsity=0.5, windows=W, calib_windows=200)
    lengths = prof.layer(0, "theta_lengths").tolist()
    assert lengths == [float(n) for n in calib_lengths(int(lengths[-1]))] and len(lengths) > 1
    assert prof.layer(0, "theta").numel() == len(lengths)
    one = calibrate(model, _ids(3000, seed=1), method="tda", sparsity=0.5, windows=W, calib_windows=200,
                    by_length=False)
    assert one.layer(0, "theta").numel() == 1
    assert float(one.layer(0, "theta")[0]) == pytest.approx(float(prof.layer(0, "theta")[-1]))


def test_tda_calibration_keeps_statistics_not_activations():
    """Calibration holds [lengths, d_ff] per window (not [P, d_ff]); the thresholds equal the
    quantiles of the statistic computed from the raw prompt activations."""
    from moyu.methods import calib as C
    from moyu.methods.tda import calib_lengths, tda_stat
    model = tiny_model("llama", layers=1)
    w = W.resolved(model)
    tda = get_method("tda")
    opts = tda.make_options()
    ids = _ids(600, seed=3)
    summ = C.collect(model, ids, w, set(), max_windows=8, prompts=tda.prompt_summary(opts, w))
    raw = C.collect(model, ids, w, set(), max_windows=8, prompts=True)
    lengths = calib_lengths(w.lead)
    assert summ.prompts[0][0].shape == (len(lengths), raw.prompts[0][0].shape[1])
    assert raw.prompts[0][0].shape[0] == w.lead
    prof = calibrate(model, ids, method="tda", sparsity=0.4, windows=W, calib_windows=8)
    for j, n in enumerate(lengths):
        stat = torch.stack([tda_stat(a[None, :n])[0] for a in raw.prompts[0]])
        assert float(prof.layer(0, "theta")[j]) == pytest.approx(C.quantile(stat, 0.4))


def test_static_keeps_one_set_for_every_token():
    model = tiny_model("llama", layers=2)
    prof = calibrate(model, _ids(400), method="static", sparsity=0.5, windows=W)
    keep = prof.layer(0, "keep")
    assert keep.dtype == torch.bool and int(keep.sum()) == round(0.5 * keep.numel())
    sp = sparsify(model, prof)
    _logits(model, _ids(40, seed=3), sp, prompt=20)
    assert sp.measured()["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_teal_thresholds_are_per_projection_and_greedy_lands_on_target():
    model = tiny_model("llama", layers=2)
    prof = calibrate(model, _ids(600), method="teal", sparsity=0.5, windows=W)
    names = {k.split(".")[-1] for k in prof.tensors}
    assert names == {f"tau_{r}" for r in ("q", "k", "v", "o", "gate", "up", "down")}
    assert all(abs(s - 0.5) < 1e-6 for s in prof.calib["sparsity_per_layer"])
    taus = [float(prof.layer(0, f"tau_{r}")) for r in ("q", "k", "v")]
    assert len(set(taus)) > 1, "q, k and v share an input but not a threshold"


def test_wina_scales_only_where_the_reference_does():
    from moyu.arch import mlp_layers
    from moyu.methods.teal import wina_scales
    assert set(wina_scales(mlp_layers(tiny_model("llama"))[0])) == {"k", "gate"}
    assert set(wina_scales(mlp_layers(tiny_model("phi3"))[0])) == {"qkv", "gate_up"}


def test_profile_is_written_with_the_umask_and_checked_against_its_method(models, tmp_path):
    import os
    model = models["llama"]
    prof = calibrate(model, _ids(400), method="cats", sparsity=0.4, windows=W)
    old = os.umask(0o022)
    try:
        path = prof.save(tmp_path / "p.moyu")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    prof.method = "tda"   # tensors of cats under tda's name: one line, no KeyError
    with pytest.raises(MoyuError, match="profile was calibrated with tda config v1"):
        sparsify(model, prof)
    prof.config_version = 3
    with pytest.raises(MoyuError, match="profile tensors do not match method 'tda'"):
        sparsify(model, prof)


@pytest.mark.parametrize("method", SPARSE)
def test_rules_hold_no_reference_to_the_model(models, method):
    """Rules keep only their own parameters, so the runtime can drop the HF model."""
    from moyu.arch import MLPLayer, mlp_layers
    model = models["llama"]
    prof = calibrate(model, _ids(400), method=method, sparsity=0.5, windows=W)
    neuron, inputs = get_method(method).rules(prof, mlp_layers(model))
    rules = [r for r in neuron + inputs if r is not None]
    assert rules
    for rule in rules:
        values = list(vars(rule).values())
        values += [w for v in values if hasattr(v, "__dict__") and not isinstance(v, torch.Tensor)
                   for w in vars(v).values()]
        assert not any(isinstance(v, (MLPLayer, torch.nn.Module)) for v in values), method


def test_teal_refined_thresholds_hit_the_target_on_held_out():
    """Dense-model quantiles overshoot once upstream projections are sparse; one refining
    pass on the inputs seen under sparsity brings the held-out sparsity back to the target."""
    model = tiny_model("llama", layers=3)
    got = {}
    for refine in (0, 1):
        prof = calibrate(model, _ids(1500, seed=1), method="teal", sparsity=0.7, windows=W,
                         allocation="uniform", refine=refine, calib_windows=60)
        got[refine] = evaluate(model, _ids(800, seed=2), W, modifier=sparsify(model, prof)).extra["sparsity"]
    assert abs(got[1] - 0.7) < 0.01 < abs(got[0] - 0.7)


def test_large_models_calibrate_on_fewer_windows_unless_told(monkeypatch):
    """At or above LARGE_MODEL_PARAMS the default calib_windows drops to 8 (recorded in the
    profile); an explicit calib_windows is kept."""
    from moyu.methods import method as M
    model = tiny_model("llama")
    n = sum(p.numel() for p in model.parameters())
    ids = _ids(12 * W.scored + W.prompt + 1)
    assert calibrate(model, ids, method="cats", sparsity=0.5, windows=W).params["calib_windows"] == 16
    monkeypatch.setattr(M, "LARGE_MODEL_PARAMS", n)
    assert calibrate(model, ids, method="cats", sparsity=0.5, windows=W).params["calib_windows"] == 8
    told = calibrate(model, ids, method="cats", sparsity=0.5, windows=W, calib_windows=12)
    assert told.params["calib_windows"] == 12
