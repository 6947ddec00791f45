"""`moyu serve` driven by the official ``openai`` client on a free localhost port: the OpenAI
shapes, bad requests, a bounded queue, disconnects and timeouts; afterwards the server
still gives the greedy answer of `moyu generate`.

A tiny random Llama (the GGUF of conftest.py) keeps this fast; decode steps are slowed by
a fixed delay where a request must still be running when the next one arrives.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from moyu.engine import Engine, build_engine  # noqa: E402
from moyu.errors import MoyuError  # noqa: E402
from moyu.server import create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "the cat sat on"
NEW = 24
CTX = 128
DELAY = 0.02          # seconds added to each decode step of the slowed engine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlowRuntime:
    """A runtime whose decode steps take ``delay`` seconds longer (same outputs)."""

    def __init__(self, runtime, delay: float):
        self.runtime, self.delay = runtime, delay

    @property
    def max_seq(self) -> int:
        return self.runtime.max_seq

    def prefill(self, ids):
        return self.runtime.prefill(ids)

    def decode_step(self, token):
        time.sleep(self.delay)
        return self.runtime.decode_step(token)


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    import moyu
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)       # tiny matmuls only lose to thread hand-offs
    model, tok = moyu.load(str(tiny_gguf), verbose=False)
    fast = build_engine(model, tok, None, max_seq=CTX, name=tiny_gguf.name)
    yield Engine(SlowRuntime(fast.runtime, DELAY), tok, fast.name, sorted(fast.eos))
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tiny_gguf):
    """`moyu generate --json` for PROMPT: plain and as a chat turn (the command in this
    process; `test_serve_command` and test_chat's tests run it as a separate process)."""
    import contextlib
    import io

    from moyu import cli
    out = {}
    for key, extra in (("completion", []), ("chat", ["--chat"])):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            assert cli.main(["generate", "--model", str(tiny_gguf), "--ctx", str(CTX), "--prompt", PROMPT,
                             "--max-tokens", str(NEW), "--json", "--threads", "1", *extra]) == 0
        out[key] = json.loads(buf.getvalue().strip().splitlines()[-1])
    return out


@contextmanager
def running(engine, **options):
    """A server for ``engine`` on a free port, in a thread; yields its base URL."""
    app = create_app(engine, **options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        assert time.monotonic() - t0 < 30 and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def url(engine):
    with running(engine, max_queue=1, timeout=60) as u:
        yield u


def client(url: str, key: str = "none", **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)


def raw(url: str, method: str, path: str, body: bytes | str | None = None,
        headers: dict | None = None) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data)


def wait_idle(url: str, within: float) -> float:
    """Seconds until /health says the runtime is idle; fails after ``within``."""
    t0 = time.monotonic()
    while True:
        _, h = raw(url, "GET", "/health")
        if not h["busy"] and h["queued"] == 0:
            return time.monotonic() - t0
        assert time.monotonic() - t0 < within, f"runtime still busy after {within} s: {h}"
        time.sleep(0.01)


def greedy_ok(url: str, name: str, reference: dict) -> None:
    c = client(url).completions.create(model=name, prompt=PROMPT, max_tokens=NEW)
    assert c.choices[0].text == reference["completion"]["text"]


def test_openai_client_chat_and_completion(url, engine, reference):
    c = client(url)
    assert [m.id for m in c.models.list().data] == [engine.name]
    ref, ref_chat = reference["completion"], reference["chat"]

    done = c.completions.create(model=engine.name, prompt=PROMPT, max_tokens=NEW)
    assert done.object == "text_completion" and done.id.startswith("cmpl-")
    assert done.choices[0].text == ref["text"] and done.choices[0].finish_reason == ref["finish_reason"]
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (ref["prompt_tokens"],
                                                                       ref["completion_tokens"])
    assert done.usage.total_tokens == ref["prompt_tokens"] + ref["completion_tokens"]

    pieces = list(c.completions.create(model=engine.name, prompt=PROMPT, max_tokens=NEW, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == ref["text"]
    assert pieces[-1].choices[0].finish_reason == ref["finish_reason"]

    msgs = [{"role": "user", "content": PROMPT}]
    chat = c.chat.completions.create(model=engine.name, messages=msgs, max_tokens=NEW)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == ref_chat["text"]
    assert chat.usage.completion_tokens == ref_chat["completion_tokens"]

    chunks = list(c.chat.completions.create(model=engine.name, messages=msgs, max_tokens=NEW, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == ref_chat["text"]
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == ref_chat["finish_reason"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref_chat["completion_tokens"]


def test_stop_and_seed(url, engine, reference):
    c = client(url)
    full = reference["completion"]["text"]
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].strip())
    cut = c.completions.create(model=engine.name, prompt=PROMPT, max_tokens=NEW, stop=[stop])
    assert cut.choices[0].text == full[:full.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model=engine.name, prompt=PROMPT, max_tokens=NEW, stop=stop, stream=True)
    assert "".join(p.choices[0].text for p in streamed) == cut.choices[0].text
    a, b = (c.completions.create(model=engine.name, prompt=PROMPT, max_tokens=NEW, temperature=1.0,
                                 top_p=0.9, seed=3).choices[0].text for _ in range(2))
    assert a == b


@pytest.mark.parametrize("body, status", [
    (b"{not json", 400),
    (b"[1, 2]", 400),
    (b'{"prompt": "hi"}', 400),                                              # no model
    (b'{"model": "gpt-4o", "prompt": "hi"}', 404),
    (b'{"model": "@", "prompt": "' + b"the " * 400 + b'"}', 413),            # longer than the context
    (b'{"model": "@", "prompt": "hi", "max_tokens": 100000}', 400),           # beyond the context
    (b'{"model": "@", "prompt": "hi", "max_tokens": "ten"}', 400),
    (b'{"model": "@", "prompt": "hi", "temperature": 9}', 400),
    (b'{"model": "@", "prompt": "hi", "n": 2}', 400),
    (b'{"model": "@", "prompt": ""}', 400),
    (b'{"model": "@", "prompt": [99999999]}', 400),
    (b'{"model": "@", "messages": []}', 400),
    (b'{"model": "@", "messages": [{"role": "tool", "content": "x"}]}', 400),
    (b'{"model": "@", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}', 400),
    (b'{"model": "@", "messages": [{"role": "user", "content": "' + b"x" * (2 << 20) + b'"}]}', 413),
])
def test_bad_requests_get_openai_errors(url, engine, reference, body, status):
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    got, err = raw(url, "POST", path, body.replace(b'"@"', json.dumps(engine.name).encode()))
    assert got == status, err
    assert set(err) == {"error"} and err["error"]["message"] and "Traceback" not in json.dumps(err)
    assert {"type", "code", "param"} <= set(err["error"])


def test_errors_through_the_client(url, engine, reference):
    c = client(url)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context window"):
        c.completions.create(model=engine.name, prompt=PROMPT, max_tokens=CTX)
    with pytest.raises(openai.APIStatusError) as e:
        c.completions.create(model=engine.name, prompt="the " * 300)
    assert e.value.status_code == 413
    assert raw(url, "GET", "/v1/nothing")[0] == 404
    assert raw(url, "GET", "/v1/models/" + engine.name)[1]["id"] == engine.name
    greedy_ok(url, engine.name, reference)


def test_concurrent_requests_queue_or_refuse(url, engine, reference):
    """max_queue=1: of three simultaneous streams one runs, one waits, one gets 503; the two
    served ones give the greedy answer (their tokens never shared one KV cache)."""
    c = client(url)
    go = threading.Barrier(3)
    results: list = [None] * 3

    def ask(i: int) -> None:
        go.wait()
        try:
            s = c.completions.create(model=engine.name, prompt=PROMPT, max_tokens=NEW, stream=True)
            results[i] = "".join(p.choices[0].text for p in s)
        except openai.APIStatusError as e:
            results[i] = e
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    texts = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    assert len(texts) == 2 and len(refused) == 1, results
    assert refused[0].status_code == 503 and "busy" in refused[0].message
    assert texts == [reference["completion"]["text"]] * 2
    wait_idle(url, 5)
    greedy_ok(url, engine.name, reference)


def _open_stream(url: str, name: str, max_tokens: int, stream: bool = True):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"model": name, "prompt": PROMPT, "max_tokens": max_tokens, "stream": stream}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    return conn


def test_disconnect_mid_stream_frees_the_runtime(url, engine, reference):
    long = CTX - 40                       # about 1.8 s of decoding if nobody stopped it
    conn = _open_stream(url, engine.name, long)
    r = conn.getresponse()
    assert r.status == 200
    seen = 0
    while seen < 3:
        line = r.fp.readline()
        seen += line.startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert wait_idle(url, 1.0) < 1.0      # stopped within a few tokens, not after ~100
    greedy_ok(url, engine.name, reference)

    conn = _open_stream(url, engine.name, long, stream=False)   # a non-streaming request too
    time.sleep(0.3)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert wait_idle(url, 1.0) < 1.0
    greedy_ok(url, engine.name, reference)


def test_stream_interval_groups_tokens_without_changing_the_text(engine, reference):
    ref = reference["completion"]
    with running(engine, stream_interval=3) as u:
        pieces = [p.choices[0].text for p in client(u).completions.create(
            model=engine.name, prompt=PROMPT, max_tokens=NEW, stream=True) if p.choices]
    assert "".join(pieces) == ref["text"]
    texts = [t for t in pieces if t]
    # three tokens per event (the last event holds the rest): about a third as many events
    assert len(texts) <= -(-ref["completion_tokens"] // 3) < ref["completion_tokens"]
    with pytest.raises(MoyuError, match="--stream-interval must be >= 1"):
        create_app(engine, stream_interval=0)


@pytest.mark.slow   # seconds of end-to-end work: the full suite runs it
def test_timeout(engine, reference):
    # CTX - 40 slowed steps take >= 1.76 s whatever the load; the greedy check's NEW take 0.48 s
    # plus overhead, which on a loaded 2-core machine can pass 0.5 s: 1.5 s separates them.
    with running(engine, timeout=1.5) as u:
        status, err = raw(u, "POST", "/v1/completions",
                          json.dumps({"model": engine.name, "prompt": PROMPT, "max_tokens": CTX - 40}))
        assert status == 504 and err["error"]["code"] == "timeout"
        with pytest.raises(openai.APIError, match="timeout"):
            list(client(u).completions.create(model=engine.name, prompt=PROMPT, max_tokens=CTX - 40,
                                              stream=True))
        wait_idle(u, 1.0)
        greedy_ok(u, engine.name, reference)


def test_api_key(engine, reference):
    with running(engine, api_key="s3cret") as u:
        with pytest.raises(openai.AuthenticationError):
            client(u, "wrong").models.list()
        status, err = raw(u, "POST", "/v1/completions", b"{}")
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
        assert raw(u, "GET", "/health")[0] == 200            # health needs no key
        c = client(u, "s3cret").completions.create(model=engine.name, prompt=PROMPT, max_tokens=NEW)
        assert c.choices[0].text == reference["completion"]["text"]


@pytest.mark.slow   # a separate server process: interpreter and model start-up dominate
def test_serve_command(tiny_gguf, reference):
    """The real `moyu serve` process: starts, answers as `moyu generate` does, stops on SIGINT."""
    from moyu.cli import main
    assert main(["serve", "--model", str(tiny_gguf), "--port", "70000"]) == 2    # before any model loads
    assert main(["serve", "--model", str(tiny_gguf), "--stream-interval", "0"]) == 2
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "moyu.cli", "serve", "--model", str(tiny_gguf),
                             "--ctx", str(CTX), "--port", str(port)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        u, t0 = f"http://127.0.0.1:{port}", time.monotonic()
        while True:
            try:
                if raw(u, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() - t0 < 240, "moyu serve did not come up"
            time.sleep(0.2)
        greedy_ok(u, tiny_gguf.name, reference)
    finally:
        proc.send_signal(2)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    assert "Traceback" not in out


class _ThreadSpy:
    """A runtime that records the threads its prefill and decode steps run on."""

    def __init__(self, runtime):
        self.runtime, self.threads = runtime, set()

    @property
    def max_seq(self) -> int:
        return self.runtime.max_seq

    def prefill(self, ids):
        self.threads.add(threading.current_thread())
        return self.runtime.prefill(ids)

    def decode_step(self, token):
        self.threads.add(threading.current_thread())
        return self.runtime.decode_step(token)


def test_serve_builds_and_decodes_on_one_thread(monkeypatch, engine, reference):
    """`moyu serve` builds the engine on the thread that then runs every request (so torch's
    OpenMP keeps one team of threads, as in `moyu bench`), not on the event loop's thread."""
    from moyu import cli, server
    spy = _ThreadSpy(engine.runtime)
    built = {}

    def load_engine(args):
        built["thread"] = threading.current_thread()
        return Engine(spy, engine.tok, engine.name, sorted(engine.eos))

    def serve(eng, *args, runtime=None, stream_interval=1):
        built.update(engine=eng, runtime=runtime, stream_interval=stream_interval)
    monkeypatch.setattr(cli, "load_engine", load_engine)
    monkeypatch.setattr(server, "serve", serve)
    assert cli.main(["serve", "--model", "tiny", "--port", "8123", "--stream-interval", "2"]) == 0
    runtime = built["runtime"]
    assert built["stream_interval"] == 2
    assert built["thread"] is runtime.call(threading.current_thread) is not threading.current_thread()
    with running(built["engine"], runtime=runtime) as u:
        greedy_ok(u, engine.name, reference)
        chunks = list(client(u).completions.create(model=engine.name, prompt=PROMPT, max_tokens=NEW, stream=True))
        assert "".join(ch.choices[0].text for ch in chunks) == reference["completion"]["text"]
    assert spy.threads == {built["thread"]}
