"""An OpenAI-compatible HTTP server for one :class:`~moyu.engine.Engine` (FastAPI + uvicorn).

Requests run one at a time on the batch-1 runtime, in one :class:`RuntimeThread` (which
`moyu serve` also builds the engine on), so the event loop stays free to accept, queue and
refuse. At most ``max_queue`` requests wait behind the
running one; more get 503 at once. A request that outlives ``timeout`` seconds (queue wait
included) is stopped between two tokens and answered 504 (or, once a stream has started,
with an error event). A client that disconnects, mid-stream or while queued, cancels its
request: the runtime is free again after at most one more token.
"""
import asyncio
import hmac
import json
import logging
import queue
import sys
import threading
import time
from concurrent.futures import Executor, Future
from typing import Any, AsyncIterator, Callable

from .engine import Completion, Engine
from .errors import MoyuError
from .openai_api import (APIError, Request, chunk, error_body, model_card, parse_request, response,
                         usage_chunk)

log = logging.getLogger("moyu.server")
_POLL_S = 0.1            # how often a waiting request checks for its client's disconnect


def _require_server_stack():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise MoyuError("`moyu serve` needs FastAPI and uvicorn: pip install 'moyu[serve]'") from None


def check_server_options(port: int, max_queue: int, timeout: float, stream_interval: int = 1) -> None:
    """One-line :class:`MoyuError` on bad server options or a missing server stack (before a model loads)."""
    if stream_interval < 1:
        raise MoyuError(f"--stream-interval must be >= 1 token per event, got {stream_interval}")
    if not 0 < port < 65536:
        raise MoyuError(f"--port must be in 1..65535, got {port}")
    if max_queue < 0:
        raise MoyuError(f"--max-queue must be >= 0, got {max_queue}")
    if timeout <= 0:
        raise MoyuError(f"--timeout must be > 0 seconds, got {timeout}")
    _require_server_stack()


class Gate:
    """One request on the runtime at a time, at most ``max_queue`` waiting behind it."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.admitted = 0            # running + waiting, counted at once (not when the lock is taken)
        self._lock = asyncio.Lock()

    @property
    def busy(self) -> bool:
        """True while a request holds the runtime."""
        return self._lock.locked()

    @property
    def waiting(self) -> int:
        """Requests admitted but not yet running."""
        return max(self.admitted - (1 if self._lock.locked() else 0), 0)

    async def enter(self, deadline: float, gone: Callable[[], Any]) -> None:
        """Wait for the runtime; 503 when the queue is full or ``deadline`` passes first.

        ``gone()`` (awaitable) is polled: a client that left stops waiting.
        """
        if self.admitted > self.max_queue:
            raise APIError(503, f"the server is busy: one request is running and {self.admitted - 1} "
                                "are queued; retry later", "server_error", "server_busy")
        self.admitted += 1
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise APIError(503, "timed out waiting for the runtime; retry later",
                                   "server_error", "queue_timeout")
                try:
                    await asyncio.wait_for(self._lock.acquire(), min(left, _POLL_S))
                    return
                except (asyncio.TimeoutError, TimeoutError):
                    if await gone():
                        raise APIError(499, "client closed the request", code="client_closed")
        except BaseException:
            self.admitted -= 1
            raise

    def leave(self) -> None:
        """Free the runtime (called on the event loop once the worker has stopped)."""
        self.admitted -= 1
        self._lock.release()


class RuntimeThread(Executor):
    """The one thread that does the runtime's torch work: build the engine on it, then every
    request decodes on it.

    Why the build too: GNU OpenMP (torch's CPU threads) keeps one team of worker threads per
    thread that starts parallel work, and once it manages more threads than the machine has
    cores it stops spin-waiting between parallel regions, so each of the hundreds of regions
    in a decode step wakes its workers through the kernel. The server whose main thread built
    the model (one team) and whose worker thread decoded (a second team) measured 30 % below
    `moyu bench` (one team, all on the main thread) on a quiet machine; on a loaded machine
    it was the other way round (libgomp's spin-waiting then costs more than it saves). One
    thread for both keeps one team, so serving decodes as `moyu bench` and `moyu generate` do.
    """

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        # a daemon: Ctrl-C during a long calibration ends the process instead of waiting for it
        threading.Thread(target=self._loop, name="moyu-runtime", daemon=True).start()

    def _loop(self) -> None:
        while True:
            fut, fn, args, kwargs = self._jobs.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:   # handed to whoever waits on the future
                fut.set_exception(e)

    def submit(self, fn: Callable[..., Any], /, *args, **kwargs) -> Future:
        """Queue ``fn(*args, **kwargs)`` for the runtime thread; its future."""
        fut: Future = Future()
        self._jobs.put((fut, fn, args, kwargs))
        return fut

    def call(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Run ``fn(*args, **kwargs)`` on the runtime thread and wait for its result."""
        return self.submit(fn, *args, **kwargs).result()


class _Job:
    """One request's run on the worker thread, cancellable from the event loop."""

    def __init__(self, engine: Engine, req: Request, deadline: float):
        self.engine, self.req, self.deadline = engine, req, deadline
        self.stop = threading.Event()

    def cancelled(self) -> bool:
        """Checked between tokens: client gone or deadline passed."""
        return self.stop.is_set() or time.monotonic() > self.deadline

    @property
    def timed_out(self) -> bool:
        """True once the deadline has passed."""
        return time.monotonic() > self.deadline


def create_app(engine: Engine, api_key: str | None = None, max_queue: int = 8,
               timeout: float = 300.0, max_body: int = 1 << 20, runtime: RuntimeThread | None = None,
               stream_interval: int = 1):
    """The FastAPI app serving ``engine``: ``/v1/chat/completions``, ``/v1/completions``,
    ``/v1/models``, ``/health``. ``api_key``: required as ``Authorization: Bearer KEY`` on /v1.
    ``runtime``: the thread that built ``engine`` (decoding runs there); default: a new one.
    ``stream_interval``: tokens per streamed event (1: every token as it is decoded; more
    trades a little latency for less CPU per token in the server and the client, as vLLM's
    option of the same name)."""
    _require_server_stack()
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException
    from starlette.requests import Request as HTTPRequest

    check_server_options(8000, max_queue, timeout, stream_interval)
    app = FastAPI(title="moyu", docs_url=None, redoc_url=None, openapi_url=None)
    executor = runtime or RuntimeThread()
    started = int(time.time())
    state: dict[str, Gate] = {}

    def gate() -> Gate:   # made on first use, inside the server's event loop
        if "gate" not in state:
            state["gate"] = Gate(max_queue)
        return state["gate"]

    def err(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return err(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        msg = {404: f"no route {request.method} {request.url.path}: see /v1/models, "
                    "/v1/chat/completions, /v1/completions, /health",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(error_body(msg, code=code), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return JSONResponse(error_body("invalid request"), status_code=400)

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(error_body("internal server error (see the server log)", "server_error"),
                            status_code=500)

    def authorize(request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_body(request) -> bytes:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > max_body:
            raise APIError(413, f"the request body exceeds {max_body} bytes", code="request_too_large")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > max_body:
                raise APIError(413, f"the request body exceeds {max_body} bytes", code="request_too_large")
        return bytes(data)

    async def admit(request, kind: str) -> tuple[Request, _Job]:
        authorize(request)
        req = parse_request(engine, kind, await read_body(request))
        job = _Job(engine, req, time.monotonic() + timeout)
        await gate().enter(job.deadline, request.is_disconnected)
        return req, job

    def run_on_worker(job: _Job, fn: Callable[[], Any]) -> asyncio.Future:
        """Run ``fn`` on the runtime thread; the gate opens when it returns, however it ends."""
        loop = asyncio.get_running_loop()
        g = gate()

        def work():
            try:
                return fn()
            finally:
                loop.call_soon_threadsafe(g.leave)
        try:
            return loop.run_in_executor(executor, work)
        except BaseException:
            g.leave()
            raise

    async def complete(request, req: Request, job: _Job):
        fut = run_on_worker(job, lambda: engine.complete(req.ids, req.params, job.cancelled))
        while not fut.done():
            await asyncio.wait({fut}, timeout=_POLL_S)
            if not fut.done() and await request.is_disconnected():
                job.stop.set()
        c: Completion = fut.result()
        if c.finish_reason == "cancelled":
            if job.timed_out:
                raise APIError(504, f"the request took longer than the server's {timeout:g} s timeout",
                               "server_error", "timeout")
            raise APIError(499, "client closed the request", code="client_closed")
        return JSONResponse(response(req, c, engine))

    def stream(req: Request, job: _Job):
        pipe = _Pipe(asyncio.get_running_loop(), stream_interval)

        def produce():
            s = engine.stream(req.ids, req.params, job.cancelled)
            try:
                for piece in s:
                    pipe.put(piece)
                pipe.end("done", s.completion)
            except BaseException as e:
                pipe.end("error", e)
                raise
            finally:
                s.close()
        run_on_worker(job, produce)
        piece_event = sse_piece(req, engine)

        async def events() -> AsyncIterator[bytes]:
            if req.kind == "chat":
                yield sse(chunk(req, engine, first=True))
            while True:
                text, (kind, value) = await pipe.get()
                if text:
                    yield piece_event(text)
                if kind is None:
                    continue
                if kind == "error":
                    log.error("stream failed: %r", value)
                    yield sse(error_body("internal server error (see the server log)", "server_error"))
                elif value.finish_reason == "cancelled":
                    if job.timed_out:
                        yield sse(error_body(f"the request took longer than the server's {timeout:g} s "
                                             "timeout", "server_error", "timeout"))
                else:
                    yield sse(chunk(req, engine, finish=value.finish_reason))
                    if req.include_usage:
                        yield sse(usage_chunk(req, value, engine))
                    yield b"data: [DONE]\n\n"
                return

        return _cancelling_stream(events(), job.stop.set, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def handle(request: HTTPRequest, kind: str):
        req, job = await admit(request, kind)
        if req.stream:
            try:
                return stream(req, job)
            except BaseException:
                job.stop.set()
                raise
        return await complete(request, req, job)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await handle(request, "completion")

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        authorize(request)
        return {"object": "list", "data": [model_card(engine, started)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: HTTPRequest):
        authorize(request)
        if model_id != engine.name:
            raise APIError(404, f"the model '{model_id}' does not exist: this server runs '{engine.name}'",
                           code="model_not_found")
        return model_card(engine, started)

    @app.get("/health")
    async def health():
        g = gate()
        return {"status": "ok", "model": engine.name, "busy": g.busy or engine.busy,
                "queued": g.waiting, "max_queue": max_queue}

    app.state.executor = executor
    return app


class _Pipe:
    """Text pieces from the runtime thread to the event loop, without a hand-off per token.

    The runtime thread never waits: it appends, and wakes the loop (one
    ``call_soon_threadsafe``: a self-pipe write and a GIL hand-off) only if the loop is
    parked waiting for text, not for every piece. The loop takes everything that arrived
    since it last looked, so a loop that falls behind sends one event for several tokens
    (the text and its order are unchanged) instead of working through a backlog; a loop
    that keeps up still sends each piece as soon as it is decoded. With ``every`` > 1 the
    loop is woken only once that many pieces wait (or the stream ends).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, every: int = 1):
        self._loop = loop
        self._every = every
        self._lock = threading.Lock()
        self._pieces: list[str] = []
        self._end: tuple[str | None, Any] = (None, None)
        self._waiter: asyncio.Future | None = None

    def put(self, piece: str) -> None:
        """Runtime thread: one more piece of text."""
        with self._lock:
            self._pieces.append(piece)
            if len(self._pieces) >= self._every:
                self._wake()

    def end(self, kind: str, value: Any) -> None:
        """Runtime thread: the stream ended (``"done"``, completion) or failed (``"error"``, exception)."""
        with self._lock:
            self._end = (kind, value)
            self._wake()

    def _wake(self) -> None:   # under the lock
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._loop.call_soon_threadsafe(_resolve, waiter)

    async def get(self) -> tuple[str, tuple[str | None, Any]]:
        """Event loop: ``(text arrived so far, (end kind or None, value))``, waiting for either."""
        while True:
            with self._lock:
                if len(self._pieces) >= self._every or self._end[0] is not None:
                    text = "".join(self._pieces)
                    self._pieces.clear()
                    return text, self._end
                waiter = self._waiter = self._loop.create_future()
            await waiter


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def sse(obj: dict) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def sse_piece(req: Request, engine: Engine) -> Callable[[str], bytes]:
    """The text chunk's event for any text: the chunk is rendered once per request and only
    the text is encoded per event (same bytes as ``sse(chunk(req, engine, text=text))``)."""
    mark = "\x00moyu-text\x00"
    head, tail = sse(chunk(req, engine, text=mark)).split(json.dumps(mark).encode())
    return lambda text: head + json.dumps(text, ensure_ascii=False).encode() + tail


def _cancelling_stream(content: AsyncIterator[bytes], on_close: Callable[[], None], **kw):
    """A streaming response that calls ``on_close`` however it ends (finished, client gone,
    or never started), so the runtime never goes on decoding for nobody."""
    from starlette.responses import StreamingResponse

    class CancellingStream(StreamingResponse):
        async def __call__(self, scope, receive, send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                on_close()
    return CancellingStream(content, **kw)


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_queue: int = 8, timeout: float = 300.0, log_level: str = "info",
          runtime: RuntimeThread | None = None, stream_interval: int = 1) -> None:
    """Serve ``engine`` until interrupted (Ctrl-C); ``runtime``: the thread that built it."""
    _require_server_stack()
    import uvicorn
    app = create_app(engine, api_key, max_queue, timeout, runtime=runtime, stream_interval=stream_interval)
    where = f"http://{host}:{port}/v1"
    print(f"moyu serve: {engine.name} ({engine.method or 'dense'}, context {engine.max_seq}) on {where}"
          + ("  (API key required)" if api_key else ""), file=sys.stderr, flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print("moyu serve: warning: listening beyond localhost without --api-key", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=2)
