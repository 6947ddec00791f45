"""The engine behind generate / chat / serve: same tokens as the runtime's own generate,
clean incremental text, stop sequences, cancellation and one stream at a time."""
from __future__ import annotations

import copy

import pytest
import torch

from moyu.engine import (Detokenizer, EngineBusy, GenerationParams, PromptTooLong, StopMatcher,
                         build_engine)
from moyu.errors import MoyuError

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def tiny_llm(tiny_gguf):
    """(model, tokenizer) of the tiny Llama GGUF."""
    import moyu
    return moyu.load(str(tiny_gguf), verbose=False)


@pytest.fixture(scope="module")
def engine(tiny_llm):
    model, tok = tiny_llm
    return build_engine(model, tok, None, max_seq=96)


def test_greedy_matches_runtime_generate(engine, tiny_llm, one_thread):
    from moyu.runtime import lean_model
    model, tok = tiny_llm
    ids = engine.encode("the cat sat on the mat")
    lean = lean_model(model, None, max_seq=96)
    want, _ = lean.generate(torch.tensor(ids), 24, eos_token_id=sorted(engine.eos))
    got = engine.complete(ids, GenerationParams(max_tokens=24))
    assert got.tokens == want.tolist()
    assert got.prompt_tokens == len(ids) and got.completion_tokens == len(want)
    assert got.finish_reason == ("stop" if want[-1].item() in engine.eos else "length")
    assert got.text == tok.decode(want, skip_special_tokens=True)


def test_seeded_sampling_matches_runtime_generate(engine, tiny_llm, one_thread):
    from moyu.runtime import lean_model
    model, _ = tiny_llm
    ids = engine.encode("then the")
    lean = lean_model(model, None, max_seq=96)
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9)):
        want, _ = lean.generate(torch.tensor(ids), 20, greedy=False, temperature=temperature,
                                top_p=top_p, seed=7, eos_token_id=sorted(engine.eos))
        got = engine.complete(ids, GenerationParams(20, temperature, top_p, seed=7))
        assert got.tokens == want.tolist()
    greedy = engine.complete(ids, GenerationParams(20)).tokens
    draws = {tuple(engine.complete(ids, GenerationParams(20, 1.5, seed=s)).tokens) for s in range(3)}
    assert len(draws | {tuple(greedy)}) > 1   # sampling does sample


def test_detokenizer_never_splits_a_character(tiny_llm):
    _, tok = tiny_llm
    text = " héllo 🙂 wörld, 日本語 the end"
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) > len(text.split())          # multi-byte characters span several tokens
    context = tok("a prompt", add_special_tokens=False).input_ids
    d = Detokenizer(tok, context)
    pieces = [d.add(i) for i in ids] + [d.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)
    assert "" in pieces                          # some tokens ended inside a character


@pytest.mark.parametrize("chunks, stops, emitted, stopped", [
    (["hello wor", "ld and more"], ["world"], "hello ", True),
    (["a", "b", "c"], ["bd"], "abc", False),                # held "b" released when "c" comes
    (["x END", "ING"], ["END"], "x ", True),
    (["ab", "cd"], ["zz", "bc"], "a", True),                # earliest stop wins across chunks
    (["plain"], [], "plain", False),
])
def test_stop_matcher(chunks, stops, emitted, stopped):
    m = StopMatcher(stops)
    out, hit = "", False
    for c in chunks:
        piece, hit = m.feed(c)
        out += piece
        if hit:
            break
    if not hit:
        out += m.flush()
    assert (out, hit) == (emitted, stopped)


def test_stop_sequence_cuts_the_text(engine, one_thread):
    ids = engine.encode("the cat sat on the mat")
    full = engine.complete(ids, GenerationParams(max_tokens=40)).text
    assert len(full) > 10
    stop = full[5:8]
    cut = engine.complete(ids, GenerationParams(max_tokens=40, stop=[stop]))
    assert cut.text == full[:full.find(stop)] and cut.finish_reason == "stop"


def test_cancel_and_close_free_the_engine(engine, one_thread):
    ids = engine.encode("the cat")
    n = {"calls": 0}

    def cancel():
        n["calls"] += 1
        return n["calls"] >= 3
    out = engine.complete(ids, GenerationParams(max_tokens=30), cancel=cancel)
    assert out.finish_reason == "cancelled" and out.completion_tokens == 3 and not engine.busy
    s = engine.stream(ids, GenerationParams(max_tokens=30))
    next(iter(s))
    assert engine.busy
    with pytest.raises(EngineBusy):
        engine.complete(ids, GenerationParams(max_tokens=2))
    s.close()
    assert not engine.busy and s.completion.finish_reason == "cancelled"
    assert engine.complete(ids, GenerationParams(max_tokens=2)).completion_tokens == 2


def test_limits(engine):
    long = engine.encode("the " * 200)
    with pytest.raises(PromptTooLong, match="context window is 96"):
        engine.stream(long)
    ids = engine.encode("the cat")
    with pytest.raises(MoyuError, match="ask for at most"):
        engine.stream(ids, GenerationParams(max_tokens=96))
    for bad in (GenerationParams(max_tokens=0), GenerationParams(temperature=-1),
                GenerationParams(top_p=0), GenerationParams(stop=[""])):
        with pytest.raises(MoyuError):
            engine.stream(ids, bad)
    full = engine.complete(ids)     # no max_tokens: fills the window
    assert full.completion_tokens == 96 - len(ids) or full.finish_reason == "stop"


def test_chat_ids_follow_the_template(engine, tiny_llm):
    from moyu.engine import Engine
    from moyu.generate import chat_ids
    _, tok = tiny_llm
    templ = copy.deepcopy(tok)
    templ.chat_template = TEMPLATE
    e = Engine(engine.runtime, templ, "tiny")
    assert e.chat_ids([{"role": "user", "content": "hi there"}]) == chat_ids(templ, "hi there")[0].tolist()
    assert engine.chat_ids([{"role": "user", "content": "hi"}]) == chat_ids(tok, "hi")[0].tolist()
    with pytest.raises(MoyuError):
        e.chat_ids([])


def test_a_conversations_next_turn_reuses_the_earlier_prompt(engine, tiny_llm, one_thread):
    """The second request repeats the first prompt: only its new tokens are prefilled, and
    the reply equals that of a runtime that prefilled the whole prompt."""
    from moyu.runtime import lean_model
    model, _ = tiny_llm
    first = engine.encode("the cat sat on the mat")
    reply = engine.complete(first, GenerationParams(max_tokens=6))
    second = first + reply.tokens + engine.encode(" and then the dog")[1:]
    got = engine.complete(second, GenerationParams(max_tokens=12))
    assert got.prompt_reused == len(first)     # the reply was decoded, not prefilled: not reused
    want, _ = lean_model(model, None, max_seq=96).generate(torch.tensor(second), 12,
                                                         eos_token_id=sorted(engine.eos))
    assert got.tokens == want.tolist()
    other = engine.complete(engine.encode("a different start"), GenerationParams(max_tokens=4))
    assert other.prompt_reused <= 1            # at most the BOS
