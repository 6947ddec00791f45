"""The evaluation protocol: window arithmetic, dense perplexity equal to a direct HF loss
over the same scored tokens, and KL / top-1 of a modifier against dense."""
from __future__ import annotations

import math

import pytest
import torch

from moyu import MoyuError
from moyu.arch import mlp_layers
from moyu.evaluate import DenseReference, EvalResult, Windows, evaluate
from moyu.stats import Bootstrap
from moyu.tiny import TINY_TYPES

pytestmark = pytest.mark.usefixtures("one_thread")
W = Windows(prompt=16, scored=24)


def _ids(n, seed=0):
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))


class NoOp:
    """A modifier that changes nothing."""

    def __init__(self):
        self.prompts = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def begin(self, prompt_len):
        self.prompts.append(prompt_len)
        self.boundary = prompt_len

    def resume(self):
        self.boundary = 0

    def measured(self):
        return {"sparsity": 0.0}


class HalveMLP(NoOp):
    """Scales every down-projection output by 0.5 on positions >= prompt_len."""

    def __init__(self, model):
        super().__init__()
        self.layers = mlp_layers(model)
        self.handles = []

    def __enter__(self):
        def hook(_m, _a, out):
            out = out.clone()
            out[:, self.boundary:] *= 0.5
            return out
        self.handles = [ml.down.register_forward_hook(hook) for ml in self.layers]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def measured(self):
        return {"sparsity": 0.25, "calls": len(self.prompts)}


def test_window_starts():
    w = Windows(prompt=4, scored=4)
    assert w.starts(9) == [0]
    assert w.starts(12) == [0]
    assert w.starts(13) == [0, 4]
    assert w.starts(21) == [0, 4, 8, 12]
    assert Windows().starts(513) == [0]


@pytest.mark.parametrize("n", [0, 1, 8])
def test_text_shorter_than_one_window_is_one_line(n):
    with pytest.raises(MoyuError) as e:
        Windows(prompt=4, scored=4).starts(n)
    msg = str(e.value)
    assert "\n" not in msg and "too short" in msg and f"{n} tokens" in msg and "9" in msg


@pytest.mark.parametrize("w", [Windows(0, 4), Windows(4, 0), Windows(-1, 4)])
def test_bad_window_sizes(w):
    with pytest.raises(MoyuError, match=">= 1"):
        w.starts(100)


def test_evaluate_rejects_2d_ids(tiny):
    with pytest.raises(MoyuError, match="1-D"):
        evaluate(tiny("llama"), _ids(100)[None], W)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_dense_ppl_equals_hf_loss_on_the_scored_tokens(tiny, arch):
    model = tiny(arch)
    ids = _ids(120)
    res = evaluate(model, ids, W)
    starts = W.starts(len(ids))
    assert len(starts) == 4 and res.tokens == 4 * W.scored
    nll = 0.0
    scored_positions = []
    with torch.inference_mode():
        for s in starts:
            chunk = ids[s: s + W.prompt + W.scored + 1]
            labels = chunk.clone()
            labels[: W.prompt + 1] = -100          # only the scored next-token predictions
            out = model(chunk[None], labels=labels[None])
            nll += float(out.loss) * W.scored
            scored_positions += list(range(s + W.prompt + 1, s + W.prompt + W.scored + 1))
    assert scored_positions == list(range(W.prompt + 1, W.prompt + 1 + 4 * W.scored))  # no gaps, no repeats
    assert math.isclose(res.ppl, math.exp(nll / res.tokens), rel_tol=1e-5)
    assert res.dense_ppl is None and res.kl is None
    assert 1 < res.ppl < 1000


def test_max_windows(tiny):
    res = evaluate(tiny("llama"), _ids(120), W, max_windows=2)
    assert res.tokens == 2 * W.scored


def test_noop_modifier_has_zero_kl_and_full_agreement(tiny):
    model = tiny("llama")
    ids = _ids(120)
    dense = evaluate(model, ids, W)
    mod = NoOp()
    res = evaluate(model, ids, W, modifier=mod)
    assert mod.prompts == [W.prompt] * 4
    assert abs(res.kl) < 1e-6 and res.top1_agree == 1.0
    assert math.isclose(res.ppl, dense.ppl, rel_tol=1e-6)
    assert math.isclose(res.dense_ppl, dense.ppl, rel_tol=1e-6)
    assert res.extra == {"sparsity": 0.0}


def test_changing_modifier_is_measured_against_unchanged_dense(tiny):
    model = tiny("llama")
    ids = _ids(120)
    dense = evaluate(model, ids, W)
    ref = DenseReference()
    res = evaluate(model, ids, W, modifier=HalveMLP(model), reference=ref)
    assert res.kl > 1e-4 and res.ppl != res.dense_ppl
    assert math.isclose(res.dense_ppl, dense.ppl, rel_tol=1e-6)
    # the same windows give the same KL again
    again = evaluate(model, ids, W, modifier=HalveMLP(model), reference=ref)
    assert math.isclose(again.kl, res.kl, rel_tol=1e-6) and again.top1_agree == res.top1_agree
    assert len(ref._store) == 4
    d = res.to_dict()
    for key in ("tokens", "ppl", "seconds", "dense_ppl", "kl", "top1_agree", "prompt_len",
                "scored_len", "sparsity", "calls"):
        assert key in d
    assert d["prompt_len"] == W.prompt and d["scored_len"] == W.scored
    assert "windows" not in d and "extra" not in d and "per_token" not in d
    for key in ("ppl", "dense_ppl", "ppl_ratio", "ppl_diff", "kl", "top1_agree"):
        lo, hi = d[f"{key}_ci"]
        assert lo <= hi
    assert d["ppl_ratio_ci"][0] <= d["ppl_ratio"] <= d["ppl_ratio_ci"][1]
    assert d["ci"]["block"] == 128 and d["ci"]["level"] == 0.95
    assert len(res.per_token["nll"]) == res.tokens
    assert math.isclose(math.exp(res.per_token["nll"].mean()), res.ppl, rel_tol=1e-9)


def test_noop_modifier_has_an_exactly_zero_paired_interval(tiny):
    """The same blocks are resampled for dense and modified: identical outputs give [1, 1]."""
    res = evaluate(tiny("llama"), _ids(120), Windows(prompt=8, scored=8), modifier=NoOp(),
                   bootstrap=Bootstrap(block=8))
    d = res.to_dict()
    assert d["ppl_ratio_ci"] == [1.0, 1.0] and d["ppl_diff_ci"] == [0.0, 0.0]
    assert d["top1_agree_ci"] == [1.0, 1.0]
    assert d["ppl_ci"][0] < d["ppl_ci"][1]
    assert "ppl_ci" in evaluate(tiny("llama"), _ids(120), W).to_dict()
    assert "ppl_ci" not in evaluate(tiny("llama"), _ids(120), W, bootstrap=None).to_dict()


def test_dense_reference_never_serves_another_text_or_model(tiny):
    ref = DenseReference()
    model, other = tiny("llama"), tiny("qwen2")
    a, b = _ids(120), _ids(120) + 1
    mod = HalveMLP(model)
    first = evaluate(model, a, W, modifier=mod, reference=ref)
    shared = evaluate(model, b, W, modifier=mod, reference=ref)
    alone = evaluate(model, b, W, modifier=mod)
    assert first.dense_ppl != shared.dense_ppl
    assert math.isclose(shared.dense_ppl, alone.dense_ppl, rel_tol=1e-6)
    res = evaluate(other, a, W, modifier=HalveMLP(other), reference=ref)
    assert math.isclose(res.dense_ppl, evaluate(other, a, W).ppl, rel_tol=1e-6)


def test_modifier_leaves_prompt_positions_dense(tiny):
    """The scored logits depend on the modified positions only (prompt runs dense)."""
    model = tiny("llama")
    ids = _ids(W.prompt + W.scored + 1)
    mod = HalveMLP(model)
    with torch.inference_mode():
        with mod:
            mod.begin(W.prompt)
            out = model(ids[None, : W.prompt]).logits
        dense = model(ids[None, : W.prompt]).logits
    assert torch.allclose(out, dense)


def test_to_dict_drops_empty_fields():
    d = EvalResult(tokens=10, ppl=1.23456789, seconds=0.5, windows=Windows(3, 4)).to_dict()
    assert d == {"tokens": 10, "ppl": 1.234568, "seconds": 0.5, "prompt_len": 3, "scored_len": 4, "bos": False}


def _one_forward_nll(model, ids, w, modifier):
    """Scored NLL of every window as one forward with the modifier on past the prompt
    (the protocol without a KV cache)."""
    nll = []
    with torch.inference_mode():
        for s in w.starts(len(ids)):
            with modifier:
                modifier.begin(w.lead)
                logits = model(w.window(ids, s)[None], logits_to_keep=w.scored).logits[0]
            nll.append(torch.nn.functional.cross_entropy(logits, w.targets(ids, s), reduction="none"))
    return torch.cat(nll).double()


@pytest.mark.parametrize("method", ["cats", "griffin"])
def test_cached_prefill_equals_one_forward_and_is_shared_only_by_token_methods(tiny, method):
    """The scored tokens on the prefill's cache give the one-forward numbers; a token-level
    sparsifier continues the stored dense prefill (it runs only the scored tokens), a
    sequence-level one runs its own prefill, whose activations choose its set."""
    from moyu.methods import calibrate, sparsify
    model = tiny("llama")
    ids = _ids(120)
    mod = sparsify(model, calibrate(model, _ids(400, seed=1), method=method, sparsity=0.5, windows=W))
    assert mod.observes_prompt == (method == "griffin")
    ref = DenseReference()
    first = evaluate(model, ids, W, modifier=mod, reference=ref)
    lengths = []
    h = model.register_forward_pre_hook(lambda _m, args, kw: lengths.append(args[0].shape[1]),
                                        with_kwargs=True)
    try:
        again = evaluate(model, ids, W, modifier=mod, reference=ref)
    finally:
        h.remove()
    n = len(W.starts(len(ids)))
    assert lengths == ([W.scored] * n if method == "cats" else [W.prompt, W.scored] * n)
    assert again.ppl == first.ppl and again.kl == first.kl
    want = _one_forward_nll(model, ids, W, mod)
    assert torch.allclose(torch.as_tensor(first.per_token["nll"]), want, rtol=1e-4, atol=1e-5)
    assert first.ppl != first.dense_ppl


def test_a_modifier_without_resume_is_refused(tiny):
    class Old(NoOp):
        resume = None
    with pytest.raises(MoyuError, match="resume"):
        evaluate(tiny("llama"), _ids(120), W, modifier=Old())


@pytest.mark.parametrize("arch", TINY_TYPES)
def test_cached_windows_match_one_forward_on_every_architecture(arch):
    """Sparsity 0 reproduces dense through the shared prefill, and at 0.5 the scored tokens
    on the KV cache equal one forward with the prompt dense (every family's cache)."""
    from moyu.methods import calibrate, sparsify
    from moyu.tiny import tiny_model
    model = tiny_model(arch)
    ids = _ids(120)
    zero = sparsify(model, calibrate(model, _ids(400, seed=1), method="oracle", sparsity=0.0, windows=W))
    res = evaluate(model, ids, W, modifier=zero, reference=DenseReference())
    assert res.ppl == res.dense_ppl and res.kl == 0.0 and res.top1_agree == 1.0
    half = sparsify(model, calibrate(model, _ids(400, seed=1), method="oracle", sparsity=0.5, windows=W))
    got = evaluate(model, ids, W, modifier=half, reference=DenseReference())
    want = _one_forward_nll(model, ids, W, half)
    assert torch.allclose(torch.as_tensor(got.per_token["nll"]), want, rtol=1e-4, atol=1e-4)
    assert got.ppl != got.dense_ppl
