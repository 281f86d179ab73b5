"""ASGI middleware: OpenAI ``metadata`` → ``vllm_xargs``, per-request option validation, audio checks.

vLLM accepts OpenAI's ``metadata`` field but drops it. This middleware reads the HeadRouter keys from it,
checks them (and the same keys in ``vllm_xargs``), and moves them into ``vllm_xargs`` where the engine sees
them. Inline audio parts (``input_audio``, ``data:`` URLs) are decoded with vLLM's own loader and refused
when they cannot be decoded, are empty, or are longer than the model takes (Qwen2-Audio's processor would
silently cut them at 30 s). A bad request gets an HTTP 400 in OpenAI's error format naming the field; the
server keeps serving. A body larger than ``INLINE_BODY_BYTES`` is parsed and its audio decoded in a worker thread,
off the event loop, so a long upload never stalls other requests' streams. Remote audio URLs are fetched by vLLM
later and are not checked here; the middleware installs two patches in the API server process:
``patch/media_fetch_errors.py`` (a URL the server cannot load is a 4xx naming the cause, not a 500) and
``patch/stream_usage.py`` (a streamed response's usage chunk carries ``usage.headrouter``).

vLLM adds user middleware outside its own API-key check, so with ``--api-key`` (or ``VLLM_API_KEY``) this
middleware puts vLLM's own ``AuthenticationMiddleware``, with the same keys, in front of its work: a request vLLM
would refuse gets vLLM's 401 before its body is read. A body larger than ``limits.max_body_bytes`` gets a 413 as
soon as its Content-Length or the bytes read so far pass the limit. ``/metrics`` counts the bodies read and the
audio parts decoded here (``headrouter_http_*``).

Load it with vLLM's own flag: ``--middleware headrouter_vllm.api.middleware.HeadRouterMiddleware``
(``headrouter-vllm serve`` does this for you).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import anyio
import msgspec
from prometheus_client import Counter

from headrouter_vllm import patch
from headrouter_vllm.api import limits
from headrouter_vllm.names import REPORT_KEY
from headrouter_vllm.options import OPTION_KEYS, XARG_FOCUS, XARG_TASK, OptionError, parse_route_options
from headrouter_vllm.patch import media_fetch_errors, stream_usage

ROUTED_PATHS = ("/v1/chat/completions", "/v1/completions")

# What the middleware did, on vLLM's /metrics: shows that refused requests cost no parsing or decoding.
BODIES_READ = Counter("headrouter_http_bodies_read", "Request bodies the HeadRouter middleware began to read "
                      "(authenticated requests to the routed paths).")
AUDIO_DECODED = Counter("headrouter_http_audio_decoded", "Inline audio parts the HeadRouter middleware decoded "
                        "to check their length.")
BODIES_TOO_LARGE = Counter("headrouter_http_bodies_too_large", "Requests answered 413: body over the limit.")


class RequestError(Exception):
    """A malformed request; the message starts with the offending field's name."""

    def __init__(self, param: str, message: str):
        super().__init__(message if message.startswith(param) else f"{param}: {message}")
        self.param = param


def check_audio(body: dict) -> int:
    """Decode every inline audio part of a chat request; raise RequestError for audio the model cannot take.
    Returns the number of audio parts (inline or remote)."""
    messages = body.get("messages")
    parts = 0
    if not isinstance(messages, list):
        return parts
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                continue
            where = f"messages[{i}].content[{j}]"
            data = None
            if part.get("type") == "input_audio" and isinstance(part.get("input_audio"), dict):
                parts += 1
                audio_format = part["input_audio"].get("format")
                if audio_format is not None and not (isinstance(audio_format, str) and audio_format):
                    raise RequestError(where + ".input_audio.format",
                                       f"the audio format must be a name such as 'wav' or 'mp3', got {audio_format!r}")
                data = part["input_audio"].get("data")
                where += ".input_audio.data"
            elif part.get("type") == "audio_url" and isinstance(part.get("audio_url"), dict):
                parts += 1
                url = part["audio_url"].get("url")
                if isinstance(url, str) and url.startswith("data:"):
                    data = url.split(",", 1)[1] if "," in url else ""
                    where += ".audio_url.url"
            if data is None:
                continue
            seconds = _decoded_seconds(data, where)
            limit = limits.max_audio_seconds()
            if limit is not None and seconds > limit + 1e-6:
                raise RequestError(where, f"audio is {seconds:.1f} s long; this model takes at most {limit:g} s "
                                          "(longer audio would be cut silently)")
    return parts


def _decoded_seconds(data: Any, where: str) -> float:
    import binascii

    import pybase64
    from vllm.multimodal.media.audio import AudioMediaIO

    if not isinstance(data, str) or not data:
        raise RequestError(where, "audio data must be a non-empty base64 string")
    try:
        raw = pybase64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(where, "audio data is not valid base64") from None
    AUDIO_DECODED.inc()
    try:
        wave, rate = AudioMediaIO().load_bytes(raw)
    except Exception as e:  # any decoder failure is the client's audio, not a server error
        raise RequestError(where, f"could not decode the audio ({type(e).__name__}: {str(e)[:200]})") from None
    if wave.size == 0 or not rate:
        raise RequestError(where, "audio is empty")
    return wave.shape[-1] / float(rate)


def rewrite_body(body: Any) -> Any:
    """Return the request body with HeadRouter options moved from ``metadata`` into ``vllm_xargs``.

    Raises RequestError for malformed or conflicting options and for audio the model cannot take. Other
    fields are left untouched.
    """
    if not isinstance(body, dict):
        return body
    audio_parts = check_audio(body)
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

    def source(key: str) -> str:  # where the client put an option: errors name that place
        return "metadata" if xargs is None or key not in xargs else "vllm_xargs"

    for key in OPTION_KEYS:
        if key in merged:
            try:
                parse_route_options({key: merged[key]}, prefix=f"{source(key)}.", one_key=True)
            except OptionError as e:
                raise RequestError(e.param, str(e)) from None
    if not any(key in merged for key in OPTION_KEYS):
        return body
    for key, what in ((XARG_TASK, "a task"), (XARG_FOCUS, "seconds of audio")):
        if key in merged and not audio_parts:
            # a task or focus says what to listen for: without audio it is a client mistake (a retention alone is
            # harmless, e.g. a client-wide default, and such requests run as vanilla vLLM)
            raise RequestError(f"{source(key)}.{key}", f"names {what}, but the request has no audio part to route")
    try:  # the options together (policy region needs its focus)
        options = parse_route_options(merged)
    except OptionError as e:
        raise RequestError(f"{source(e.param)}.{e.param}", str(e)) from None
    # the engine sees typed values: the retention as a float
    if options.retention is not None:
        merged["headrouter_retention"] = options.retention
    return {**body, "vllm_xargs": merged}


def move_usage(body: Any) -> Any:
    """The engine returns its per-request report in ``kv_transfer_params["headrouter"]`` (the one per-request
    channel from vLLM's engine core to the API server); clients find it in ``usage.headrouter``."""
    if not isinstance(body, dict) or not isinstance(body.get("kv_transfer_params"), dict):
        return body
    params = dict(body["kv_transfer_params"])
    report = params.pop(REPORT_KEY, None)
    if report is None:
        return body
    usage = dict(body.get("usage") or {})
    usage[REPORT_KEY] = report
    return {**body, "usage": usage, "kv_transfer_params": params or None}


# A body this small is checked on the event loop (parsing it takes well under a millisecond); a larger one, which
# can carry minutes of audio to decode, in a worker thread, so one upload never stalls another request's stream.
INLINE_BODY_BYTES = 64 * 1024
# One body at a time in that thread: the checks are CPU-bound under the GIL, so more threads would not finish them
# sooner, but would make the event loop wait for the GIL behind each of them.
_BODY_CHECKS = anyio.CapacityLimiter(1)


def prepare_body(raw: bytes) -> bytes:
    """The request body as the server passes it on: parsed, checked and rewritten (:func:`rewrite_body`). Raises
    RequestError. A body that is not JSON passes unchanged: vLLM answers malformed JSON itself."""
    try:  # msgspec (vLLM's dependency) parses a 15 MB body in a third less time than json, holding the GIL less
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        try:  # what msgspec refuses and Python's json (vLLM's parser) takes: NaN, integers past 64 bits
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return raw
    new_body = rewrite_body(body)
    if new_body is body:
        return raw
    try:
        return msgspec.json.encode(new_body)
    except (msgspec.EncodeError, OverflowError, TypeError, ValueError):
        return json.dumps(new_body).encode()


def error_body(param: str | None, message: str, code: int = 400, kind: str = "BadRequestError") -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


def api_tokens(args) -> list[str]:
    """The API keys vLLM's server enforces: ``--api-key`` (one or more) over ``VLLM_API_KEY``, as vLLM's
    ``init_entrypoints_middleware`` picks them."""
    from vllm import envs

    return [key for key in (getattr(args, "api_key", None) or [envs.VLLM_API_KEY]) if key]


def _vllm_auth_below(app):
    """vLLM's AuthenticationMiddleware among the middleware this one wraps, if any (a fallback for an app without
    ``state.args``: Starlette builds each middleware around the next one, as ``.app``)."""
    from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

    for _ in range(64):
        if isinstance(app, AuthenticationMiddleware):
            return app
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


def _too_large(limit: int) -> bytes:
    return error_body(None, f"request body is larger than {limit} bytes ({limit / limits.MIB:.1f} MiB), the most "
                      f"this server reads; send shorter or compressed audio, or raise {limits.BODY_LIMIT_ENV} on the "
                      "server", code=413, kind="RequestEntityTooLargeError")


class HeadRouterMiddleware:
    def __init__(self, app):
        self.app = app
        # Starlette builds its middleware at the lifespan startup: a bad HEADROUTER_MAX_BODY_MB stops the start
        limits.configured_body_limit()
        # in the API server process only: a plain `vllm serve` is untouched
        patch.apply_once("stream_usage", stream_usage.apply)
        patch.apply_once("media_fetch_errors", media_fetch_errors.apply)
        self._guarded = None  # _checked behind vLLM's API-key check when the server has keys (first request)
        self._body_limit: int | None = None
        self._completions_limit: int | None = None

    def _setup(self, scope) -> None:
        """Learns the server's args from the app (vLLM's ``build_app`` keeps them in ``app.state.args``)."""
        from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

        args = getattr(getattr(scope.get("app"), "state", None), "args", None)
        tokens = api_tokens(args)
        if tokens:
            # vLLM's own class and comparison: the same 401, the same open paths and methods
            guarded = AuthenticationMiddleware(self._checked, tokens=tokens)
        elif args is None and (below := _vllm_auth_below(self.app)) is not None:
            guarded = copy.copy(below)  # its keys, in front of our work
            guarded.app = self._checked
        else:
            guarded = self._checked
        self._body_limit = limits.max_body_bytes(limits.audio_clips_per_prompt(
            getattr(args, "limit_mm_per_prompt", None)))
        # the default is sized for audio: /v1/completions carries none, but may carry prompt embeddings, whose size
        # the default knows nothing of (an explicit HEADROUTER_MAX_BODY_MB applies there too)
        embeds = getattr(args, "enable_prompt_embeds", False) and limits.configured_body_limit() is None
        self._completions_limit = None if embeds else self._body_limit
        # vLLM's audio loader imports its media stack on first use (seconds): here, not inside a request
        from vllm.multimodal.media.audio import AudioMediaIO  # noqa: F401
        self._guarded = guarded

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in ROUTED_PATHS:
            await self.app(scope, receive, send)
            return
        if self._guarded is None:
            self._setup(scope)
        await self._guarded(scope, receive, send)

    async def _checked(self, scope, receive, send):
        """An authenticated routed request: read the body (up to the limit), check and rewrite it, pass it on."""
        limit = self._completions_limit if scope["path"] == "/v1/completions" else self._body_limit
        if limit is not None:
            declared = dict(scope["headers"]).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > limit:  # refused before a byte of the body is read
                BODIES_TOO_LARGE.inc()
                await _send_json(send, 413, _too_large(limit))
                return
        BODIES_READ.inc()
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if limit is not None and size > limit:  # chunked, or longer than declared: stop buffering now
                BODIES_TOO_LARGE.inc()
                await _send_json(send, 413, _too_large(limit))
                return
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        try:
            if len(raw) <= INLINE_BODY_BYTES:
                raw = prepare_body(raw)
            else:
                raw = await anyio.to_thread.run_sync(prepare_body, raw, limiter=_BODY_CHECKS)
        except RequestError as e:
            await _send_json(send, 400, error_body(e.param, str(e)))
            return
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

        await self.app(scope, replay, _UsageRewritingSend(send))


class _UsageRewritingSend:
    """Holds back a non-streaming JSON response until complete, to move the HeadRouter report into ``usage``;
    streams pass straight through."""

    def __init__(self, send):
        self.send = send
        self.start = None
        self.chunks: list[bytes] = []

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            content_type = dict(message.get("headers") or []).get(b"content-type", b"")
            if content_type.startswith(b"application/json"):
                self.start = message
                return
        elif message["type"] == "http.response.body" and self.start is not None:
            self.chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            raw = b"".join(self.chunks)
            try:
                body = json.loads(raw)
                new_body = move_usage(body)
                if new_body is not body:
                    raw = json.dumps(new_body).encode()
            except (UnicodeDecodeError, json.JSONDecodeError):
                pass
            headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() != b"content-length"]
            await self.send({**self.start, "headers": [*headers, (b"content-length", str(len(raw)).encode())]})
            await self.send({"type": "http.response.body", "body": raw})
            return
        await self.send(message)


async def _send_json(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
