"""Generation tasks of `moyu tasks` (SQuAD / CoQA greedy exact match and F1): the metrics,
the stop rule, the shipped requests, and the protocol on a tiny model (context dense,
every predicted token with the method on; the lean runtime agrees with the HF model)."""
from __future__ import annotations

import json

import pytest
import torch

import moyu
from moyu import MoyuError
from moyu import gentasks as G
from moyu import qa_metrics as Q
from moyu import tasks as T
from moyu.cli import main
from moyu.evaluate import Windows
from moyu.methods import calibrate, sparsify

W = Windows(prompt=16, scored=16)
CONTEXTS = ["The cat sat on the mat. Question: where did the cat sit?\nAnswer:",
            "One, two, three, four,", "the heat in the sun is hot\nthe heat"]


def test_normalisation_and_scores():
    assert Q.normalize_answer("  The Cat,  sat!  ") == "cat sat"
    assert Q.normalize_answer("an apple a day") == "apple day"
    assert Q.exact_match("Saint Bernadette Soubirous", "saint bernadette soubirous.") == 1.0
    assert Q.exact_match("23 years", "23") == 0.0
    assert Q.f1("23 years", "23") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert Q.f1("the cat", "a dog") == 0.0 and Q.f1("", "") == 1.0 and Q.f1("x", "the") == 0.0
    assert Q.best_of(["23 years", "23"], "23") == {"em": 1.0, "f1": 1.0}
    # CoQA: leave one out, then average; one gold scores against itself
    assert Q.leave_one_out(["white", "grey", "grey"], "white") == {"em": pytest.approx(2 / 3),
                                                                     "f1": pytest.approx(2 / 3)}
    assert Q.leave_one_out(["white"], "White!") == {"em": 1.0, "f1": 1.0}


def test_answer_cut_at_newline_or_stop():
    assert G.answer_text(" Paris\nQuestion: x", ["\n\n"]) == ("Paris", True)
    assert G.answer_text(" 1858 Title: y", ["Title:", "\n\n"]) == ("1858", True)
    assert G.answer_text(" still going", ["\n\n"]) == ("still going", False)
    assert G.answer_text("\n\n white\nQ:", ["\n\n"]) == ("white", True)   # leading newlines skipped


def test_shipped_requests():
    pytest.importorskip("lm_eval")
    squad = G.load_items("squad", 3)
    assert len(squad) == 3 and squad[0]["golds"] == ["23 years", "23", "23"]
    assert squad[0]["context"].endswith("\nAnswer:") and "Title:" in squad[0]["stops"]
    coqa = G.load_items("coqa", 2)
    assert coqa[0]["golds"] == ["white"] * 4 and coqa[0]["context"].endswith("Answer:")
    with pytest.raises(MoyuError, match="available are squad, coqa"):
        G.load_items("drop", 1)


@pytest.fixture(scope="module")
def tiny_lm(tiny_gguf, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:   # an isolated cache for this load only
        mp.setenv("MOYU_CACHE", str(tmp_path_factory.mktemp("cache")))
        lm = moyu.load(str(tiny_gguf), verbose=False)
    yield lm


def _ids(n, seed=1):
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed))


def _reference(model, tok, sp, ctx: list[int], n: int) -> str:
    """Greedy tokens by full forwards without a cache: positions < len(ctx) - 1 dense."""
    new: list[int] = []
    for _ in range(n):
        with torch.inference_mode():
            if sp is not None:
                sp.begin([len(ctx) - 1])
            logits = model(torch.tensor([ctx + new])).logits[0, -1]
        new.append(int(logits.argmax()))
    return G.answer_text(tok.decode(new, skip_special_tokens=True), [])[0]


@pytest.mark.parametrize("method", [None, "griffin", "cats"])
def test_hf_decoder_is_the_protocol(tiny_lm, one_thread, method):
    """Dense prefill of the context but its last token, then cached decode steps with the
    method on: the same tokens as full forwards with the boundary at len(context) - 1."""
    model, tok = tiny_lm
    sp = None if method is None else sparsify(model, calibrate(model, _ids(400), method=method,
                                                                 sparsity=0.5, windows=W))
    dec = G.HFDecoder(model, sp)
    with (sp if sp is not None else torch.no_grad()):
        for text in CONTEXTS:
            ids = tok(text, add_special_tokens=False).input_ids
            got = dec.answer(ids, tok, ["NEVER"], set(), 6)
            # the reference decodes 6 tokens and cuts at a newline the same way
            assert got == _reference(model, tok, sp, ids, 6)


@pytest.mark.parametrize("method", [None, "cats"])
def test_lean_runtime_agrees_with_hf(tiny_lm, one_thread, method):
    model, tok = tiny_lm
    prof = None if method is None else calibrate(model, _ids(400), method=method, sparsity=0.5, windows=W)
    sp = None if prof is None else sparsify(model, prof)
    lean, hf = G.LeanDecoder(model, prof, max_seq=256), G.HFDecoder(model, sp)
    with (sp if sp is not None else torch.no_grad()):
        for text in CONTEXTS:
            ids = tok(text, add_special_tokens=False).input_ids
            assert lean.answer(ids, tok, [], set(), 6) == hf.answer(ids, tok, [], set(), 6)
    if method is not None:
        assert 0.3 < lean.sparsity() < 0.7


@pytest.mark.slow   # seconds of end-to-end work: the full suite runs it
def test_cli_generation_tasks(tiny_gguf, tmp_path, capsys, one_thread, temp_cache):
    pytest.importorskip("lm_eval")
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(f"the heat {i} in the sun then thin" for i in range(80)))
    rc = main(["tasks", "--model", str(tiny_gguf), "--tasks", "squad,coqa", "--limit", "2",
               "--method", "cats", "--sparsity", "0.5", "--calib-tokens", "300", "--calib-text", str(calib),
               "--prompt-len", "16", "--scored-len", "16", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["generation"]["engine"] == "lean" and 0.3 < out["generation"]["measured"] < 0.7
    for name in ("squad", "coqa"):
        row = out["tasks"][name]
        assert row["n"] == 2 and {"em", "f1", "em_stderr"} <= set(row["dense"]) and "f1" in row["diff"]
        assert len(row["examples"]) == 2 and {"dense", "sparse", "golds"} <= set(row["examples"][0])
    # oracle has no decode path in the runtime: the HF model with the sparsifier
    model, tok = moyu.load(str(tiny_gguf), verbose=False)
    prof = calibrate(model, _ids(400), method="oracle", sparsity=0.5, windows=W)
    res = T.evaluate_tasks(model, tok, ["squad"], limit=1, profile=prof, progress=False)
    assert res["generation"]["engine"] == "hf" and res["tasks"]["squad"]["n"] == 1
    assert res["generation"]["measured"] == pytest.approx(0.5, abs=0.05)
