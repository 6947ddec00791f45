"""BOS per window: a model whose tokenizer starts texts with a BOS gets it at the start of
every evaluation and calibration window, as one more dense position that is never scored."""
from __future__ import annotations

import math

import pytest
import torch

from moyu.data import bos_id
from moyu.evaluate import Windows, evaluate
from moyu.methods import calib as C
from moyu.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
W = Windows(prompt=16, scored=24)
BOS = 2


class FakeTok:
    """Encodes each character as its code; optionally prepends ``bos`` with special tokens."""

    def __init__(self, bos_token_id, adds):
        self.bos_token_id, self.adds = bos_token_id, adds

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        return type("Enc", (), {"input_ids": ([self.bos_token_id] if add_special_tokens and self.adds else []) + ids})


def test_bos_is_used_exactly_when_the_tokenizer_adds_one():
    assert bos_id(FakeTok(2, adds=True)) == 2
    assert bos_id(FakeTok(1, adds=False)) is None       # SmolLM2: defines a BOS, never adds it
    assert bos_id(FakeTok(None, adds=False)) is None


def _gemma(_tiny):
    model = tiny_model("gemma3_text")    # a fresh one: the shared fixture's models stay BOS-free
    model.moyu_bos = BOS
    return model


def _ids(n):
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(0))


def test_every_evaluation_window_starts_with_bos_and_scores_the_same_tokens(tiny):
    model = _gemma(tiny)
    ids = _ids(120)
    seen = []
    h = model.register_forward_pre_hook(lambda _m, args, kw: seen.append(args[0][0].clone()),
                                        with_kwargs=True)
    try:
        res = evaluate(model, ids, W)
    finally:
        h.remove()
    starts = W.starts(len(ids))
    assert res.tokens == len(starts) * W.scored and res.to_dict()["bos"] is True
    # each window runs as its prefill (BOS and prompt) and then its scored tokens on that cache
    assert [len(w) for w in seen] == [W.prompt + 1, W.scored] * len(starts)
    windows = [torch.cat(seen[i: i + 2]).tolist() for i in range(0, len(seen), 2)]
    assert windows == [[BOS] + ids[s: s + W.prompt + W.scored].tolist() for s in starts]
    nll = 0.0
    with torch.inference_mode():
        for s in starts:
            chunk = torch.cat([torch.tensor([BOS]), ids[s: s + W.prompt + W.scored + 1]])
            labels = chunk.clone()
            labels[: W.prompt + 2] = -100          # BOS and prompt positions are never scored
            nll += float(model(chunk[None], labels=labels[None]).loss) * W.scored
    assert math.isclose(res.ppl, math.exp(nll / res.tokens), rel_tol=1e-5)
    without = evaluate(model, ids, Windows(prompt=16, scored=24, bos=None))
    assert without.tokens == res.tokens and without.ppl != res.ppl and without.to_dict()["bos"] is False


def test_models_without_bos_are_unchanged(tiny):
    model = tiny("llama")     # no moyu_bos: as SmolLM2, whose tokenizer adds none
    ids = _ids(120)
    assert evaluate(model, ids, W).ppl == evaluate(model, ids, Windows(16, 24, bos=None)).ppl


def test_the_bos_is_a_dense_position_for_modifiers_and_calibration(tiny):
    model = _gemma(tiny)
    ids = _ids(200)

    class Spy:
        prompts = []

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def begin(self, n):
            self.prompts.append(n)

        def resume(self):
            pass

        def measured(self):
            return {}

    spy = Spy()
    evaluate(model, ids, W, modifier=spy)
    assert set(spy.prompts) == {W.prompt + 1}
    samples = C.collect(model, ids, W, {"a"}, per_window=4, prompts=True)
    assert samples.prompts[0][0].shape[0] == W.prompt + 1
    assert samples.a[0][0].shape[0] == 4


@pytest.mark.slow
def test_real_tokenizers():
    """Gemma's tokenizer adds <bos> (id 2); SmolLM2's adds nothing."""
    import moyu
    for name, want in (("smollm2-135m", None), ("gemma3-270m", 2)):
        model, _ = moyu.load(name, verbose=False)
        assert model.moyu_bos == want, name
