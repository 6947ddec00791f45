"""Streaming capture: fixed memory whatever the token count, statistics that agree with the
raw activations, histogram quantiles within bin resolution, and raw span capture."""
from __future__ import annotations


import pytest
import torch

from moyu.arch import mlp_layers
from moyu.capture import (BINS_PER_DECADE, Capture, StreamStats, capture_raw, stream_stats,
                          hist_quantile, log_histogram, run_batches)
from moyu.tiny import TINY_TYPES

pytestmark = pytest.mark.usefixtures("one_thread")

BIN_RATIO = 10 ** (1 / BINS_PER_DECADE)  # one bin is a 2.3 % step in magnitude


def _ids(n, seed=0):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow   # seconds of end-to-end work: the full suite runs it
def test_memory_is_flat_in_token_count(tiny):
    model = tiny("llama")
    streams = ("act", "gate", "inputs")
    small = stream_stats(model, _ids(1_000), streams, window=250)
    with Capture(model, streams) as big:
        for seed in range(100):                    # 100k tokens, 100x more
            run_batches(model, _ids(1_000, seed), window=250)
    assert big.nbytes() == small.nbytes() > 0
    s_small, s_big = small.stats[0]["act"], big.stats[0]["act"]
    assert s_big.count == 100 * s_small.count
    assert s_small.count == 1_000                  # every position of the stream
    for layer in big.stats:
        assert set(layer) == {"act", "gate", "in:mlp", "in:down", "in:attn", "in:o"}
        for st in layer.values():
            assert all(t.numel() <= max(st.channels, st.hist.numel())
                       for t in (st.hist, st.sum_abs, st.sum_sq, st.active))
    # hooks are removed on exit
    assert not big._handles
    before = big.stats[0]["act"].count
    run_batches(model, _ids(300), window=250)
    assert big.stats[0]["act"].count == before


def test_quantiles_match_torch_within_bin_resolution():
    torch.manual_seed(0)
    v = torch.randn(4_000, 32) * torch.logspace(-3, 1, 32)
    v[::7, 3] = 0.0                                 # exact zeros land in the underflow bin
    st = StreamStats(32)
    for chunk in v.split(333):
        st.update(chunk)
    a = v.abs().flatten().double()
    for q in (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99):
        exact = float(torch.quantile(a, q))
        got = st.quantile(q)
        assert exact / BIN_RATIO <= got <= exact * BIN_RATIO, (q, got, exact)
    assert st.count == 4_000
    assert torch.allclose(st.mean_abs, v.abs().mean(0).double(), rtol=1e-5)
    assert torch.allclose(st.rms, v.double().pow(2).mean(0).sqrt(), rtol=1e-5)
    tok_max = v.abs().amax(1, keepdim=True)
    assert torch.allclose(st.active_rate, (v.abs() > 1e-3 * tok_max).double().mean(0))


def test_log_histogram_bins():
    h = log_histogram(torch.tensor([0.0, 1e-9, 1.0, 1.0, 5e5]))
    assert int(h.sum()) == 5
    assert int(h[0]) == 2 and int(h[-1]) == 1       # underflow (zero, 1e-9) and overflow
    assert hist_quantile(torch.zeros_like(h, dtype=torch.float64), 0.5) == 0.0
    one = hist_quantile(log_histogram(torch.full((100,), 1.0)).double(), 0.5)
    assert 1.0 <= one <= BIN_RATIO


@pytest.mark.parametrize("arch", TINY_TYPES)
def test_streamed_stats_equal_raw_activations(tiny, arch):
    model = tiny(arch)
    ids = _ids(90, seed=3)
    with capture_raw(model, layers=None, what=("act", "x", "gate")) as raw:
        run_batches(model, ids, window=40)
    cap = stream_stats(model, ids, ("act", "gate"), window=40)
    for ml in mlp_layers(model):
        acts = torch.cat([t.reshape(-1, ml.d_ff) for t in raw["act"][ml.index]])
        assert acts.shape[0] == cap.stats[ml.index]["act"].count == 90
        st = cap.stats[ml.index]["act"]
        assert torch.allclose(st.sum_abs, acts.abs().sum(0).double(), rtol=1e-4, atol=1e-6)
        assert ("gate" in cap.stats[ml.index]) == ml.gated
        if ml.gated:
            gates = torch.cat([t.reshape(-1, ml.d_ff) for t in raw["gate"][ml.index]])
            xs = torch.cat([t.reshape(-1, t.shape[-1]) for t in raw["x"][ml.index]])
            exp = ml.act(torch.nn.functional.linear(xs, ml.w_gate, ml.b_gate))
            assert torch.allclose(gates, exp, atol=1e-5)
        else:
            assert raw["gate"][ml.index] == []


def test_capture_raw_shapes_and_span(tiny):
    model = tiny("llama")
    with capture_raw(model, layers=[1], what=("act", "x")) as raw:
        with torch.inference_mode():
            model(_ids(17)[None])
            model(_ids(5)[None])
    assert set(raw["act"]) == {1} and set(raw["x"]) == {1}
    assert [tuple(t.shape) for t in raw["act"][1]] == [(1, 17, 192), (1, 5, 192)]
    assert [tuple(t.shape) for t in raw["x"][1]] == [(1, 17, 64), (1, 5, 64)]
    assert raw["act"][1][0].dtype == torch.float32
    with torch.inference_mode():                    # hooks removed after the block
        model(_ids(4)[None])
    assert len(raw["act"][1]) == 2


def test_positions_restrict_statistics(tiny):
    model = tiny("qwen2")
    ids = _ids(30)
    with Capture(model, ("act",), positions=slice(10, None)) as cap:
        with torch.inference_mode():
            model(ids[None])
    with capture_raw(model, [0]) as raw:
        with torch.inference_mode():
            model(ids[None])
    st = cap.stats[0]["act"]
    assert st.count == 20
    assert torch.allclose(st.sum_abs, raw["act"][0][0][0, 10:].abs().sum(0).double(), rtol=1e-5)


def test_unknown_stream_is_refused(tiny):
    with pytest.raises(ValueError, match="unknown capture streams"):
        Capture(tiny("llama"), ("acts",))
