"""The lean runtime against HF: teacher-forced logits, greedy generation, pluggable steps."""
from __future__ import annotations

import pytest
import torch

from moyu.errors import MoyuError
from moyu.runtime import DenseLinear, LeanModel, packed_mlp_matmul
from moyu.tiny import TINY_TYPES, tiny_model

SEQ = 40  # crosses the tiny Gemma sliding window of 32


def _ids(n: int, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids[None]).logits[0].float()


@pytest.fixture(scope="module", params=TINY_TYPES)
def tiny(request):
    model = tiny_model(request.param)
    return model, LeanModel.from_hf(model, max_seq=96)


def test_teacher_forced_logits_match_hf(tiny):
    model, lean = tiny
    ids = _ids(SEQ)
    ref = _hf_logits(model, ids)
    for n_prefill in (1, 7):
        got = lean.logits(ids, n_prefill=n_prefill)
        assert got.shape == ref.shape
        scale = ref.abs().max().item()
        assert (got - ref).abs().max().item() <= 1e-4 * scale, n_prefill


def test_greedy_generation_matches_hf(tiny):
    model, lean = tiny
    ids = _ids(8, seed=1)
    with torch.no_grad():
        hf = model.generate(ids[None], attention_mask=torch.ones(1, 8, dtype=torch.long),
                            max_new_tokens=SEQ, min_new_tokens=SEQ, do_sample=False,
                            pad_token_id=0)[0, 8:]
    out, t = lean.generate(ids, SEQ)
    assert out.tolist() == hf.tolist()
    assert t.new_tokens == SEQ and t.prefill_s > 0 and t.decode_s > 0


class _ZeroStep:
    def __init__(self, layer):
        self.kept, self.d = 0, layer.w_down.shape[0]
        self.calls = 0

    def prefill(self, x):
        return torch.zeros_like(x)

    def decode(self, x):
        self.calls += 1
        return torch.zeros(self.d)


def test_mlp_step_is_used():
    model = tiny_model("llama")
    ids = _ids(12)
    dense = LeanModel.from_hf(model).logits(ids, n_prefill=4)
    steps = []
    lean = LeanModel.from_hf(model, mlp_factory=lambda layer: steps.append(_ZeroStep(layer)) or steps[-1])
    zero = lean.logits(ids, n_prefill=4)
    assert len(steps) == 2 and all(s.calls == 8 for s in steps)
    assert not torch.allclose(dense, zero, atol=1e-3)
    assert lean.kept() == [0, 0]


def test_linear_factory_gets_each_role():
    model = tiny_model("qwen2")
    seen = []

    def factory(i, role, w, b):
        seen.append((i, role, tuple(w.shape), b is not None))
        return DenseLinear(w, b)

    ids = _ids(10)
    got = LeanModel.from_hf(model, linear_factory=factory).logits(ids, n_prefill=3)
    ref = _hf_logits(model, ids)
    assert [r for i, r, *_ in seen if i == 0] == ["q", "k", "v", "o"]
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_bf16_weights_close_to_fp32():
    model = tiny_model("gemma3_text")
    ids = _ids(SEQ)
    ref = _hf_logits(model, ids)
    lean = LeanModel.from_hf(model, weights="bf16")
    got = lean.logits(ids, n_prefill=5)
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max()
    assert lean.nbytes < LeanModel.from_hf(model).nbytes


def test_sampling_is_seeded():
    lean = LeanModel.from_hf(tiny_model("llama"))
    ids = _ids(6)
    a, _ = lean.generate(ids, 12, greedy=False, temperature=0.8, top_p=0.9, seed=3)
    b, _ = lean.generate(ids, 12, greedy=False, temperature=0.8, top_p=0.9, seed=3)
    assert a.tolist() == b.tolist()


@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_reused_logits_buffer_holds_the_same_logits(fmt):
    """decode_step(reuse_logits=True) writes into one kept buffer and gives the logits a
    fresh tensor would hold."""
    ids = _ids(10)
    a, b = (LeanModel.from_hf(tiny_model("llama"), weights=fmt, max_seq=32) for _ in range(2))
    a.prefill(ids)
    b.prefill(ids)
    held = []   # every returned tensor stays alive, so only reuse can repeat an address
    for t in (5, 9, 17):
        fresh, reused = a.decode_step(t), b.decode_step(t, reuse_logits=True)
        assert torch.equal(fresh, reused)
        held.append(reused)
    assert len({r.data_ptr() for r in held}) == 1


def test_greedy_pick_is_the_first_maximum():
    """The greedy pick (numpy's argmax on float32) keeps torch.argmax's rule: the first of
    tied maxima."""
    x = torch.tensor([0.5, 2.0, -1.0, 2.0, 1.0])
    assert LeanModel.pick(x, True, 1.0, 1.0, None) == 1 == int(torch.argmax(x))
    assert LeanModel.pick(x.double(), True, 1.0, 1.0, None) == 1


def test_packed_prefill_matches_layer():
    from moyu.arch import mlp_layers
    from moyu.runtime import pack_layer
    for mt in ("llama", "gpt2", "phi3"):
        layer = mlp_layers(tiny_model(mt))[0]
        x = torch.randn(5, layer.w_up.shape[1])
        with torch.no_grad():
            ref = layer.mlp(x)
        assert torch.allclose(packed_mlp_matmul(x, pack_layer(layer)), ref, atol=1e-5)


def test_errors_are_one_line():
    model = tiny_model("llama")
    with pytest.raises(MoyuError):
        LeanModel.from_hf(model, weights=torch.float16)
    lean = LeanModel.from_hf(model, max_seq=8)
    with pytest.raises(MoyuError, match="max_seq"):
        lean.generate(_ids(6), 8)
    other = tiny_model("llama")
    other.config.model_type = "falcon"   # a type neither the table nor the runtime knows
    with pytest.raises(MoyuError, match="'falcon'") as err:
        LeanModel.from_hf(other)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_real_default_model_greedy_matches_hf():
    import moyu
    try:
        model, _ = moyu.load()
    except MoyuError as e:
        pytest.skip(f"default model unavailable: {e}")
    ids = _ids(24, vocab=40000)
    with torch.no_grad():
        hf = model.generate(ids[None], attention_mask=torch.ones(1, 24, dtype=torch.long),
                            max_new_tokens=16, min_new_tokens=16, do_sample=False,
                            pad_token_id=0)[0, 24:]
    out, _ = LeanModel.from_hf(model, max_seq=64).generate(ids, 16)
    assert out.tolist() == hf.tolist()


def test_prefill_reuse_equals_a_full_prefill(tiny):
    """A prompt sharing its first tokens with the previous one, prefilled with ``reuse``,
    gives the logits and next steps of a prefill from scratch (the Gemma tiny config's
    sliding window of 32 is crossed); decoded positions are never offered for reuse."""
    model, lean = tiny
    first, second = _ids(SEQ, seed=5), _ids(SEQ + 6, seed=5)
    second[30:] = _ids(SEQ - 24, seed=6)          # shares 30 tokens with ``first``
    full = lean.prefill(second)
    steps_full = [lean.decode_step(t) for t in (7, 9)]
    lean.prefill(first)
    lean.decode_step(11)                          # the answer's positions come after the prompt
    got = lean.prefill(second, reuse=30)
    steps = [lean.decode_step(t) for t in (7, 9)]
    scale = full.abs().max().item()
    assert (got - full).abs().max().item() <= 1e-5 * scale
    for a, b in zip(steps, steps_full):
        assert (a - b).abs().max().item() <= 1e-5 * scale
    with pytest.raises(MoyuError, match="cannot reuse"):
        lean.prefill(first[:10], reuse=10)       # nothing new to compute
    lean.reset()
    with pytest.raises(MoyuError, match="cannot reuse"):
        lean.prefill(second, reuse=5)            # a reset forgets the cached prompt


def test_reusable_prefix_is_the_checked_common_prefix(tiny):
    _, lean = tiny
    a = _ids(20, seed=8)
    b = a.clone()
    b[12] = (b[12] + 1) % 200 + 3
    lean.prefill(a)
    assert lean.reusable_prefix(b) == 12 and lean.reusable_prefix(a) == 19
    assert lean.reusable_prefix(a[:1]) == 0
    with pytest.raises(MoyuError, match="differ from the last prefill"):
        lean.prefill(b, reuse=13)
    lean.reset()
    assert lean.reusable_prefix(a) == 0
