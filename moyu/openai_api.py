"""The OpenAI wire format, without a web framework: parse a request body into token ids and
:class:`~moyu.engine.GenerationParams`, and shape completions, stream chunks and errors.

Only what a batch-1 text model can honour is accepted: one choice (``n`` = 1), text content,
``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``,
``stream`` and ``stream_options.include_usage``. Fields that would silently change the
meaning of the answer (tools, logprobs, echo, suffix ...) are refused with a 400; other
unknown fields (``user``, ``metadata`` ...) are ignored, as OpenAI does. ``temperature``
defaults to 0 (greedy), not OpenAI's 1: the runtime's answer is reproducible by default.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from .engine import Completion, Engine, GenerationParams, PromptTooLong
from .errors import MoyuError

# Fields whose effect the server cannot provide: refusing beats answering something else.
_UNSUPPORTED = {"tools": None, "tool_choice": None, "functions": None, "function_call": None,
                "logprobs": False, "top_logprobs": None, "echo": False, "suffix": None,
                "logit_bias": None, "response_format": None, "audio": None, "prediction": None}
_MAX_STOPS = 4


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {message, type, param, code}}`` + status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """An OpenAI-shaped error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class Request:
    """A validated request: what to decode and how to answer."""

    kind: str                      # "chat" or "completion"
    ids: list[int]
    params: GenerationParams
    stream: bool
    include_usage: bool
    id: str
    created: int


def _type_error(name: str, want: str) -> APIError:
    return APIError(400, f"'{name}' must be {want}", param=name, code="invalid_type")


def _number(body: dict, name: str, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _type_error(name, "a number")
    return float(v)


def _integer(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _type_error(name, "an integer")
    return v


def _stops(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _type_error("stop", "a non-empty string or a list of them")
    if len(stops) > _MAX_STOPS:
        raise APIError(400, f"at most {_MAX_STOPS} stop sequences, got {len(stops)}", param="stop")
    return stops


def _text_content(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise _type_error(f"messages[{i}].content", "a string or a list of text parts")


def _messages(body: dict) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects",
                       param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a 'role' and a 'content'",
                           param=f"messages[{i}]")
        role = "system" if m["role"] == "developer" else m["role"]
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role '{m['role']}' is not supported: use system, "
                                "user or assistant", param=f"messages[{i}].role")
        out.append({"role": role, "content": _text_content(m.get("content"), i)})
    return out


def _prompt_ids(engine: Engine, body: dict) -> list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]                                   # a batch of one
    if isinstance(p, str) and p:
        return engine.encode(p)
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        vocab = len(engine.tok)
        if not all(0 <= t < vocab for t in p):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return list(p)
    raise APIError(400, "'prompt' must be a non-empty string or token-id list (one prompt per request)",
                   param="prompt")


def parse_request(engine: Engine, kind: str, raw: bytes) -> Request:
    """Validate a request body for ``kind`` ``"chat"`` or ``"completion"``; raises :class:`APIError`.

    Statuses: 400 bad JSON / field / ``max_tokens`` beyond the context window, 404 unknown
    model, 413 a prompt longer than the context window.
    """
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required", param="model")
    if model != engine.name:
        raise APIError(404, f"the model '{model}' does not exist: this server runs '{engine.name}'",
                       code="model_not_found", param="model")
    for name, neutral in _UNSUPPORTED.items():
        if body.get(name, neutral) not in (neutral, None):
            raise APIError(400, f"'{name}' is not supported by this server", param=name,
                           code="unsupported_parameter")
    for name in ("n", "best_of"):
        if _integer(body, name) not in (None, 1):
            raise APIError(400, f"'{name}' must be 1: the server decodes one sequence per request",
                           param=name, code="unsupported_parameter")
    stream = body.get("stream", False)
    opts = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(opts, dict):
        raise _type_error("stream", "a boolean (and stream_options an object)")
    max_tokens = _integer(body, "max_completion_tokens") if kind == "chat" else None
    max_tokens = max_tokens if max_tokens is not None else _integer(body, "max_tokens")
    params = GenerationParams(max_tokens=max_tokens, temperature=_number(body, "temperature", 0.0),
                              top_p=_number(body, "top_p", 1.0), seed=_integer(body, "seed"),
                              stop=_stops(body))
    try:
        ids = engine.chat_ids(_messages(body)) if kind == "chat" else _prompt_ids(engine, body)
        engine.check(ids, params)
    except PromptTooLong as e:
        raise APIError(413, str(e), code="context_length_exceeded",
                       param="messages" if kind == "chat" else "prompt") from None
    except MoyuError as e:
        code = "context_length_exceeded" if "context window" in str(e) else None
        raise APIError(400, str(e), code=code) from None
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    return Request(kind, ids, params, stream, bool(opts.get("include_usage")),
                   f"{prefix}-{uuid.uuid4().hex}", int(time.time()))


def usage(c: Completion) -> dict[str, int]:
    """OpenAI ``usage`` counts."""
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def timings(c: Completion, engine: Engine) -> dict[str, Any]:
    """moyu's own figures, beside the OpenAI fields (clients ignore unknown keys)."""
    s = engine.sparsity()
    return {"prefill_s": round(c.prefill_s, 4), "prompt_reused": c.prompt_reused, "decode_s": round(c.decode_s, 4),
            "decode_tok_s": round(c.decode_tok_s, 2), "method": engine.method,
            "sparsity": None if s is None else round(s, 4)}


def response(req: Request, c: Completion, engine: Engine) -> dict[str, Any]:
    """The non-streaming answer."""
    if req.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": c.text},
                  "logprobs": None, "finish_reason": c.finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
        obj = "text_completion"
    return {"id": req.id, "object": obj, "created": req.created, "model": engine.name,
            "system_fingerprint": None, "choices": [choice], "usage": usage(c),
            "timings": timings(c, engine)}


def chunk(req: Request, engine: Engine, text: str | None = None, finish: str | None = None,
          first: bool = False) -> dict[str, Any]:
    """One streamed chunk: a text piece, the opening role (chat, ``first``) or the finish reason."""
    if req.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else (
            {"content": text} if text is not None else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    out = {"id": req.id, "object": obj, "created": req.created, "model": engine.name,
           "system_fingerprint": None, "choices": [choice]}
    if req.include_usage:
        out["usage"] = None
    return out


def usage_chunk(req: Request, c: Completion, engine: Engine) -> dict[str, Any]:
    """The last chunk when ``stream_options.include_usage`` is set: no choices, the usage."""
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {"id": req.id, "object": obj, "created": req.created, "model": engine.name,
            "system_fingerprint": None, "choices": [], "usage": usage(c), "timings": timings(c, engine)}


def model_card(engine: Engine, created: int) -> dict[str, Any]:
    """The ``/v1/models`` entry of the served model."""
    return {"id": engine.name, "object": "model", "created": created, "owned_by": "moyu",
            "context_window": engine.max_seq, "method": engine.method}
