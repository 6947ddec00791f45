"""`moyu chat` and `moyu generate` at a terminal: a pseudo-terminal drives the real command
(reply, /reset, /exit, Ctrl-C, Ctrl-D); in-process runs check the first turn equals the
engine's greedy answer and that history is trimmed to the context window."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moyu.engine import GenerationParams, build_engine
from moyu.terminal import chat, fit_history

pexpect = pytest.importorskip("pexpect")

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TERM": "dumb"}

# A chat whose decode steps take 50 ms, so Ctrl-C lands in the middle of a reply.
SLOW_CHAT = """
import sys, time, moyu
from moyu.engine import Engine, GenerationParams, build_engine
from moyu.terminal import chat
model, tok = moyu.load(sys.argv[1], verbose=False)
fast = build_engine(model, tok, None, max_seq=128)
class Slow:
    max_seq = fast.runtime.max_seq
    prefill = staticmethod(fast.runtime.prefill)
    def decode_step(self, t):
        time.sleep(0.05)
        return fast.runtime.decode_step(t)
chat(Engine(Slow(), tok, "tiny", sorted(fast.eos)), GenerationParams(max_tokens=100))
"""


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    import moyu
    model, tok = moyu.load(str(tiny_gguf), verbose=False)
    return build_engine(model, tok, None, max_seq=128, name="tiny")


def spawn(*argv: str):
    return pexpect.spawn(argv[0], list(argv[1:]), env=ENV, cwd=str(ROOT), timeout=240, encoding="utf-8",
                         codec_errors="replace")


@pytest.mark.slow   # separate processes: interpreter and model start-up dominate
def test_chat_command_in_a_terminal(tiny_gguf):
    child = spawn(sys.executable, "-m", "moyu.cli", "chat", "--model", str(tiny_gguf), "--ctx", "128",
                  "--max-tokens", "8")
    child.expect_exact(">>> ")
    child.sendline("the cat")
    child.expect(r"\[8 tokens \(length\), [\d.]+ tok/s")
    child.expect_exact(">>> ")
    child.sendintr()                    # Ctrl-C at the prompt: a fresh prompt, the chat goes on
    child.expect_exact(">>> ")
    child.sendline("/nope")
    child.expect_exact("unknown command /nope")
    child.sendline("/reset")
    child.expect_exact("(conversation cleared)")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.slow   # separate processes: interpreter and model start-up dominate
def test_ctrl_c_stops_a_reply_not_the_chat(tiny_gguf):
    child = spawn(sys.executable, "-c", SLOW_CHAT, str(tiny_gguf))
    child.expect_exact(">>> ")
    child.sendline("the cat")
    child.expect(r"the cat\r?\n")       # the echo; the reply (100 tokens, ~5 s) is under way
    child.expect(r".", timeout=30)      # some of the reply has been printed
    child.sendintr()
    child.expect_exact("(reply stopped)", timeout=10)
    child.expect_exact(">>> ")
    child.sendline("/reset")
    child.expect_exact("(conversation cleared)")
    child.sendeof()                     # Ctrl-D ends the chat
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_first_turn_is_the_greedy_answer(engine):
    inp = io.StringIO("the cat\nand then?\n/exit\n")
    out, err = io.StringIO(), io.StringIO()
    history = chat(engine, GenerationParams(max_tokens=12), inp=inp, out=out, err=err)
    want = engine.complete(engine.chat_ids([{"role": "user", "content": "the cat"}]),
                           GenerationParams(max_tokens=12))
    assert history[0] == {"role": "user", "content": "the cat"}
    assert history[1] == {"role": "assistant", "content": want.text}
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert f">>> {want.text}\n" in out.getvalue()


def test_history_is_trimmed_to_the_context(engine):
    turn = "the " * 12
    lines = "".join(f"{turn}{i}\n" for i in range(8)) + ("the " * 200) + "\nlast\n"
    out, err = io.StringIO(), io.StringIO()
    history = chat(engine, GenerationParams(max_tokens=16), system="be brief",
                   inp=io.StringIO(lines), out=out, err=err)
    assert "no longer fit the context and were dropped" in err.getvalue()
    assert "does not fit the 128-token context" in err.getvalue()      # the 200-word message
    assert history[0] == {"role": "system", "content": "be brief"}
    assert history[-2] == {"role": "user", "content": "last"}
    kept, ids = fit_history(engine, history[:-1], 16)      # the prompt of the last reply fitted as is
    assert kept == history[:-1] and len(ids) + 16 <= 128
    assert len(history) < 2 + 2 * 9                         # older turns were dropped


@pytest.mark.slow   # separate processes: interpreter and model start-up dominate
def test_generate_command(tiny_gguf, tmp_path, capsys):
    run = lambda *a: subprocess.run([sys.executable, "-m", "moyu.cli", "generate", "--model", str(tiny_gguf),
                                     "--ctx", "128", *a], capture_output=True, text=True, env=ENV, cwd=ROOT,
                                    timeout=300)
    js = run("--prompt", "the cat", "--max-tokens", "10", "--json")
    assert js.returncode == 0, js.stderr
    obj = json.loads(js.stdout.strip().splitlines()[-1])
    assert obj["completion_tokens"] == 10 and obj["finish_reason"] == "length" and obj["sparsity"] is None
    (tmp_path / "p.txt").write_text("the cat")
    plain = run("--prompt-file", str(tmp_path / "p.txt"), "--max-tokens", "10")
    assert plain.returncode == 0 and plain.stdout == obj["text"] + "\n"
    assert "10 tokens (length)" in plain.stderr
    for bad, msg in ((["--prompt", "x", "--max-tokens", "0"], "max_tokens must be >= 1"),
                     (["--prompt", "x", "--max-tokens", "500"], "context window of 128"),
                     (["--prompt", "x", "--top-p", "0"], "top_p"),
                     (["--prompt-file", str(tmp_path / "none.txt")], "--prompt-file"),
                     (["--prompt", ""], "prompt is empty")):
        from moyu.cli import main
        assert main(["generate", "--model", str(tiny_gguf), "--ctx", "128", *bad]) == 2
        stderr = capsys.readouterr().err
        assert len(stderr.strip().splitlines()) == 1 and msg in stderr, stderr
