"""Per-row prompt boundaries (``Sparsifier.begin([p0, p1, ...])``): row b runs dense before
its own boundary and sparse after it, exactly as if it ran alone with that boundary."""
from __future__ import annotations

import pytest
import torch

from moyu import MoyuError
from moyu.evaluate import Windows
from moyu.methods import calibrate, sparsify

W = Windows(prompt=12, scored=12)
BOUNDS = [5, 14, 9]


def _ids(n, seed):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


def _run(model, sp, ids, bounds):
    with torch.inference_mode(), sp:
        sp.begin(bounds)
        return model(ids).logits


@pytest.mark.parametrize("method", ["oracle", "sketch-reuse", "griffin", "tda", "teal"])
def test_per_row_boundary_equals_each_row_alone(tiny, one_thread, method):
    model = tiny("llama")
    prof = calibrate(model, _ids(160, 1), method=method, sparsity=0.5, windows=W)
    batch = torch.stack([_ids(24, 10 + r) for r in range(len(BOUNDS))])
    sp = sparsify(model, prof)
    together = _run(model, sp, batch, BOUNDS)
    measured_together = sp.measured()["sparsity"]
    alone_sp = sparsify(model, prof)
    alone = torch.cat([_run(model, alone_sp, batch[r:r + 1], p) for r, p in enumerate(BOUNDS)])
    assert torch.allclose(together, alone, atol=1e-5, rtol=0)
    # only the sparse positions are counted, so the two measurements agree
    assert measured_together == pytest.approx(alone_sp.measured()["sparsity"], abs=1e-9)
    assert measured_together > 0.2
    with torch.inference_mode():
        dense = model(batch).logits
    for r, p in enumerate(BOUNDS):   # each row's prefix is dense, its tail is not
        assert torch.allclose(together[r, :p], dense[r, :p], atol=1e-5, rtol=0)
        assert not torch.allclose(together[r, p:], dense[r, p:], atol=1e-3, rtol=0)


def test_per_row_boundary_equal_rows_is_the_scalar_boundary(tiny, one_thread):
    model = tiny("llama")
    prof = calibrate(model, _ids(160, 1), method="griffin", sparsity=0.5, windows=W)
    batch = torch.stack([_ids(20, 3), _ids(20, 4)])
    sp = sparsify(model, prof)
    assert torch.equal(_run(model, sp, batch, torch.tensor([8, 8])), _run(model, sp, batch, 8))


def test_per_row_boundary_bad_input(tiny):
    model = tiny("llama")
    prof = calibrate(model, _ids(160, 1), method="griffin", sparsity=0.5, windows=W)
    sp = sparsify(model, prof)
    with pytest.raises(MoyuError, match="one per row"):
        _run(model, sp, torch.stack([_ids(10, 1)] * 2), [3, 4, 5])
    with pytest.raises(MoyuError, match="non-negative"):
        sp.begin([3, -1])
    with pytest.raises(MoyuError, match="at least one dense prompt position"):
        _run(model, sp, torch.stack([_ids(10, 1)] * 2), [0, 4])


@pytest.mark.parametrize("method", ["griffin", "sketch"])
def test_resume_continues_a_cached_prefix_like_one_forward(tiny, one_thread, method):
    """Prefix with begin(P), then the tail over its KV cache with resume() == one forward with begin(P)."""
    model = tiny("llama")
    prof = calibrate(model, _ids(160, 1), method=method, sparsity=0.5, windows=W)
    ids = _ids(20, 7)[None]
    sp = sparsify(model, prof)
    whole = _run(model, sp, ids, 12)[0, 12:]
    with torch.inference_mode(), sp:
        sp.begin([12])
        cache = model(ids[:, :12], use_cache=True).cache
        sp.resume()
        tail = model(ids[:, 12:], cache=cache, use_cache=True).logits[0]
    assert torch.allclose(tail, whole, atol=1e-4, rtol=0)
