"""TEAL's greedy allocation: the tail-only MLP replay and the path shared between targets
change its cost, never its result."""
from __future__ import annotations

import copy

import pytest
import torch

from moyu.arch import mlp_layers
from moyu.evaluate import Windows
from moyu.methods import calibrate
from moyu.methods import teal as T
from moyu.methods.calib import block_inputs
from moyu.tiny import TINY_TYPES, tiny_model

W = Windows(prompt=12, scored=12)


def _ids(n=600, seed=1):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", TINY_TYPES)
def test_tail_only_mlp_replay_gives_the_full_replays_errors(arch):
    """Replaying the MLP on the scored positions alone measures the same block error as the
    full replay; only OPT (its MLP is not a module of its own) keeps the full run."""
    model = tiny_model(arch)
    ml = mlp_layers(model)[1]
    calls = block_inputs(model, _ids(), W.resolved(model), 2)[ml.index]
    lead = W.resolved(model).lead
    replay = T.BlockReplay(ml, calls, lead, {})
    assert replay.tail_mlp == (arch != "opt")
    full = T.BlockReplay(ml, calls, lead, {})
    full.tail_mlp = False
    for taus in ({}, {"down": 0.05}, {r: 0.1 for r in T.roles(ml)}):
        assert replay.error(taus) == pytest.approx(full.error(taus), rel=1e-4, abs=1e-6)
    assert replay.error({r: 0.1 for r in T.roles(ml)}) > 0


def test_targets_along_one_path_match_separate_calibrations(monkeypatch):
    """A lower target reads its allocation off the path a higher one walked, with no block
    replay; a higher one extends it; both equal a calibration on a model seen for the first time."""
    model = tiny_model("llama", layers=2)
    replays = []
    real = T.BlockReplay
    monkeypatch.setattr(T, "BlockReplay", lambda *a, **k: replays.append(1) or real(*a, **k))
    shared = {s: calibrate(model, _ids(), method="teal", sparsity=s, windows=W) for s in (0.5, 0.3, 0.7)}
    assert len(replays) == 2 * 2   # 0.5 and 0.7 each replay both layers; 0.3 none
    for s, prof in shared.items():
        fresh = calibrate(copy.deepcopy(model), _ids(), method="teal", sparsity=s, windows=W)
        assert prof.calib == fresh.calib
        assert all(torch.equal(prof.tensors[k], fresh.tensors[k]) for k in fresh.tensors)


def test_a_path_is_not_shared_across_text_or_edited_weights():
    """Other calibration text or weights edited in place start a new path."""
    model = tiny_model("llama", layers=2)
    a = calibrate(model, _ids(), method="teal", sparsity=0.5, windows=W)
    b = calibrate(model, _ids(seed=2), method="teal", sparsity=0.5, windows=W)
    with torch.no_grad():
        mlp_layers(model)[0].gate.weight.mul_(-1.0)
    c = calibrate(model, _ids(), method="teal", sparsity=0.5, windows=W)
    fresh = calibrate(copy.deepcopy(model), _ids(), method="teal", sparsity=0.5, windows=W)
    assert a.calib["sparsity_per_layer"] != b.calib["sparsity_per_layer"] or \
        any(not torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert all(torch.equal(c.tensors[k], fresh.tensors[k]) for k in fresh.tensors)
