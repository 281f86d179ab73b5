"""ASGI middleware: OpenAI ``metadata`` → ``vllm_xargs``, and per-request option validation.

vLLM accepts OpenAI's ``metadata`` field but drops it. This middleware reads the HeadRouter keys from it,
checks them (and the same keys in ``vllm_xargs``), and moves them into ``vllm_xargs`` where the engine sees
them. A bad value gets an HTTP 400 in OpenAI's error format naming the field; the server keeps serving.

Load it with vLLM's own flag: ``--middleware headrouter_vllm.api.middleware.HeadRouterMiddleware``
(``headrouter-vllm serve`` does this for you).
"""

from __future__ import annotations

import json
from typing import Any

from headrouter_vllm.api.options import OPTION_KEYS, OptionError, parse_route_options

ROUTED_PATHS = ("/v1/chat/completions", "/v1/completions")


class RequestError(Exception):
    """A malformed request; the message starts with the offending field's name."""

    def __init__(self, param: str, message: str):
        super().__init__(message if message.startswith(param) else f"{param}: {message}")
        self.param = param


def rewrite_body(body: Any) -> Any:
    """Return the request body with HeadRouter options moved from ``metadata`` into ``vllm_xargs``.

    Raises RequestError for malformed or conflicting options. Other fields are left untouched.
    """
    if not isinstance(body, dict):
        return body
    metadata = body.get("metadata")
    xargs = body.get("vllm_xargs")
    if metadata is not None and not isinstance(metadata, dict):
        raise RequestError("metadata", "metadata must be an object of string values")
    if xargs is not None and not isinstance(xargs, dict):
        raise RequestError("vllm_xargs", "vllm_xargs must be an object")
    merged = dict(xargs or {})
    for key in OPTION_KEYS:
        if metadata is None or key not in metadata:
            continue
        value = metadata[key]
        if not isinstance(value, str):
            raise RequestError(f"metadata.{key}", f"metadata values must be strings, got {type(value).__name__}")
        if key in merged and str(merged[key]) != value:
            raise RequestError(f"metadata.{key}", f"{key} is set differently in metadata ({value!r}) and "
                               f"vllm_xargs ({merged[key]!r})")
        merged.setdefault(key, value)
    for key in OPTION_KEYS:
        if key in merged:
            source = "metadata" if xargs is None or key not in xargs else "vllm_xargs"
            try:
                parse_route_options({key: merged[key]}, prefix=f"{source}.")
            except OptionError as e:
                raise RequestError(e.param, str(e)) from None
    if not any(key in merged for key in OPTION_KEYS):
        return body
    # the engine sees typed values: the retention as a float
    options = parse_route_options(merged)
    if options.retention is not None:
        merged["headrouter_retention"] = options.retention
    return {**body, "vllm_xargs": merged}


def error_body(param: str, message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "BadRequestError", "param": param,
                                 "code": 400}}).encode()


class HeadRouterMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in ROUTED_PATHS:
            await self.app(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = None  # not ours to judge: vLLM answers malformed JSON itself
        if body is not None:
            try:
                new_body = rewrite_body(body)
            except RequestError as e:
                await _send_json(send, 400, error_body(e.param, str(e)))
                return
            if new_body is not body:
                raw = json.dumps(new_body).encode()
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(raw)).encode()))
        scope = {**scope, "headers": headers}
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()  # after the body: wait for the client's disconnect
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        await self.app(scope, replay, send)


async def _send_json(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
