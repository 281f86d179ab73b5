"""Serving as users run it (#30), against the session's real server (``tests/test_http.py``'s ``server`` fixture):
streamed responses carry the HeadRouter report, remote audio the server cannot load is a 4xx naming the cause,
and the middleware checks large uploads off the event loop."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest

from headrouter_vllm.audio import to_wav_bytes
from tests.test_http import FETCH_TIMEOUT_S, MODEL_NAME, NEW_TOKENS, QUESTION, audio_message, chat, free_port


def stream_chunks(server, wave, **kwargs):
    extra_body = {"ignore_eos": True, **kwargs.pop("extra_body", {})}
    stream = server["client"].chat.completions.create(model=MODEL_NAME, messages=audio_message(wave), temperature=0,
                                                      max_tokens=NEW_TOKENS, stream=True, extra_body=extra_body,
                                                      **kwargs)
    return list(stream)


def test_streamed_usage_carries_the_report(server, speech):
    """The OpenAI SDK's streaming client: the final usage chunk has ``usage.headrouter``, the same report as the
    same request unstreamed, and the streamed text equals the unstreamed text."""
    options = {"headrouter_task": "asr", "headrouter_retention": "0.5"}
    whole = chat(server, speech["long"], metadata=options)
    chunks = stream_chunks(server, speech["long"], metadata=options, stream_options={"include_usage": True})
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and chunks[-1].choices == []
    report = dict(usage_chunks[0].usage.model_extra["headrouter"])
    expected = dict(whole.usage.model_extra["headrouter"])
    assert report.pop("probe_seconds") > 0 and expected.pop("probe_seconds") > 0
    assert report == expected and report["kept_audio_tokens"] < report["audio_tokens"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert usage_chunks[0].usage.completion_tokens == NEW_TOKENS
    # other chunks are vLLM's, untouched: no report, no kv_transfer_params
    assert all(not (c.model_extra or {}).get("kv_transfer_params") for c in chunks)


def test_stream_without_usage_has_no_usage_chunk(server, speech):
    chunks = stream_chunks(server, speech["short"], metadata={"headrouter_retention": "0.5"})
    assert chunks and all(c.usage is None for c in chunks)


def test_unrouted_stream_reports_full_audio(server, speech):
    """A request that names no option runs as vanilla (the server's retention is 1.0): its report says so."""
    chunks = stream_chunks(server, speech["short"], stream_options={"include_usage": True})
    report = chunks[-1].usage.model_extra["headrouter"]
    assert report["kept_audio_tokens"] == report["audio_tokens"] > 0 and report["kv_blocks_freed"] == 0


def test_streamed_completions_usage_carries_the_report(server):
    """``/v1/completions`` streams through the same report path (no audio: the report says 0 audio tokens)."""
    stream = server["client"].completions.create(model=MODEL_NAME, prompt="hello", max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.model_extra["headrouter"]["audio_tokens"] == 0


# ---- remote audio -----------------------------------------------------------------------------------------------

class _MediaHost(http.server.BaseHTTPRequestHandler):
    """A host for ``audio_url``: /ok.wav is audio, /busy answers 503, /page.html is not audio, /slow never answers
    within the server's fetch timeout."""

    wav = b""

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/ok.wav":
            self._reply(200, "audio/wav", self.wav)
        elif self.path == "/busy":
            self._reply(503, "text/plain", b"busy")
        elif self.path == "/page.html":
            self._reply(200, "text/html", b"<html><body>not audio</body></html>")
        elif self.path == "/slow":
            time.sleep(FETCH_TIMEOUT_S + 5)
            with contextlib.suppress(OSError):
                self._reply(200, "audio/wav", self.wav)
        else:
            self._reply(404, "text/plain", b"no such file")

    def _reply(self, status, content_type, body):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def media_host(speech):
    _MediaHost.wav = to_wav_bytes(speech["short"])
    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MediaHost)
    host.daemon_threads = True
    thread = threading.Thread(target=host.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{host.server_address[1]}"
    finally:
        host.shutdown()
        host.server_close()


def _audio_url_chat(server, url: str) -> httpx.Response:
    messages = [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": url}},
                                             {"type": "text", "text": QUESTION}]}]
    return httpx.post(server["base"] + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL_NAME, "messages": messages, "max_tokens": 2})


@pytest.mark.parametrize("where, status, words", [
    ("file:///etc/hostname", 400, "does not load local files"),
    ("{host}/busy", 422, "answered HTTP 503"),
    ("{host}/missing.wav", 422, "answered HTTP 404"),
    ("{host}/slow", 422, "timed out"),
    ("http://127.0.0.1:{closed}/a.wav", 422, "could not be reached"),
    ("{host}/page.html", 400, "audio"),
], ids=["local-file", "host-503", "host-404", "timeout", "unreachable", "not-audio"])
def test_remote_audio_errors_are_4xx(server, media_host, speech, where, status, words):
    url = where.format(host=media_host, closed=free_port())
    response = _audio_url_chat(server, url)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"]
    if status == 422 or where.startswith("file:"):
        assert error["param"] == "audio_url" and url in error["message"]
    # the server keeps serving
    assert _audio_url_chat(server, media_host + "/ok.wav").status_code == 200


# ---- the event loop -----------------------------------------------------------------------------------------------

def _long_upload(seconds: float = 30.0, rate: int = 48_000) -> bytes:
    """A chat request body with ``seconds`` of 48 kHz stereo Ogg Vorbis (small to send, slow to decode)."""
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(0).standard_normal((t.size, 2)) * 0.01
    wave = (0.3 * np.sin(2 * np.pi * 440 * t)[:, None] + noise).astype(np.float32)
    buffer = io.BytesIO()
    soundfile.write(buffer, wave, rate, format="OGG", subtype="VORBIS")
    data = base64.b64encode(buffer.getvalue()).decode()
    content = [{"type": "input_audio", "input_audio": {"data": data, "format": "ogg"}}, {"type": "text", "text": "?"}]
    return json.dumps({"model": MODEL_NAME, "messages": [{"role": "user", "content": content}],
                       "metadata": {"headrouter_retention": "0.5"}}).encode()


def _stream_gaps_during_uploads(body: bytes, uploads: int = 4) -> tuple[float, float]:
    """The largest gap between a stream's chunks (sent every 5 ms by the app behind the middleware) while
    ``uploads`` requests with ``body`` go through the same middleware; and how long the uploads took."""
    from headrouter_vllm.api.middleware import HeadRouterMiddleware

    async def app(scope, receive, send):  # the server behind the middleware: /v1/completions streams
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        if scope["path"] == "/v1/completions":
            for _ in range(40 + 40 * uploads):
                await send({"type": "http.response.body", "body": b"x", "more_body": True})
                await asyncio.sleep(0.005)
        await send({"type": "http.response.body", "body": b""})

    middleware = HeadRouterMiddleware(app)

    async def request(path: str, raw: bytes, stamps: list | None = None):
        messages = [{"type": "http.request", "body": raw, "more_body": False}]

        async def receive():
            return messages.pop() if messages else await asyncio.sleep(3600)

        async def send(message):
            if stamps is not None and message["type"] == "http.response.body":
                stamps.append(time.perf_counter())

        await middleware({"type": "http", "method": "POST", "path": path, "headers": [], "app": None}, receive, send)

    async def run():
        await request("/v1/chat/completions", body)  # warm: the first use of anyio's worker threads imports them
        stamps: list[float] = []
        stream = asyncio.create_task(request("/v1/completions", b'{"prompt": "x"}', stamps))
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        await asyncio.gather(*(request("/v1/chat/completions", body) for _ in range(uploads)))
        uploads_seconds = time.perf_counter() - started
        await stream
        return float(np.diff(stamps).max()), uploads_seconds

    return asyncio.run(run())


def test_long_uploads_do_not_stall_a_concurrent_stream(monkeypatch):
    """Four 30 s uploads checked by the middleware while another request streams through it: off the event loop the
    stream keeps its pace; checked on the loop (as before), each check would stall it for the check's length."""
    from vllm.multimodal.media.audio import AudioMediaIO  # noqa: F401 (import cost is not what is measured)

    from headrouter_vllm.api import limits, middleware

    limits.set_max_audio_seconds(30.0)
    body = _long_upload()
    try:
        middleware.prepare_body(body)
        start = time.perf_counter()
        middleware.prepare_body(body)
        check_seconds = time.perf_counter() - start  # one upload's check, alone
        off_loop_gap, _ = _stream_gaps_during_uploads(body)
        monkeypatch.setattr(middleware, "INLINE_BODY_BYTES", len(body))
        on_loop_gap, _ = _stream_gaps_during_uploads(body)
    finally:
        limits.set_max_audio_seconds(None)
    monkeypatch.undo()
    assert check_seconds > 0.02 and len(body) > middleware.INLINE_BODY_BYTES
    assert on_loop_gap > check_seconds * 0.8  # the test can see a stall
    assert off_loop_gap < max(0.025, on_loop_gap / 3), (off_loop_gap, on_loop_gap, check_seconds)


def prefix_cache_hits(server) -> float:
    metrics = httpx.get(server["base"] + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("vllm:prefix_cache_hits_total"))


def test_a_resent_conversation_hits_the_cache_unless_routed(server, speech):
    """Prefix caching on the real server: a second turn that resends the clip and the first answer is served from
    the cache, clip included, when unrouted; routed, it hits nothing (the clip starts in the first block) and is
    routed again for its own question."""
    wave = speech["long"]
    first_turn = audio_message(wave)
    for routed in (False, True):
        extra_body = {"ignore_eos": True, **({"vllm_xargs": {"headrouter_retention": 0.5}} if routed else {})}

        def ask(messages, extra_body=extra_body):
            return server["client"].chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0,
                                                            max_tokens=NEW_TOKENS, extra_body=extra_body)

        first = ask(first_turn)
        before = prefix_cache_hits(server)
        second = ask([*first_turn, {"role": "assistant", "content": first.choices[0].message.content},
                      {"role": "user", "content": "And who is speaking?"}])
        hits = prefix_cache_hits(server) - before
        report = second.usage.model_extra["headrouter"]
        audio = report["audio_tokens"]
        if routed:
            assert hits == 0 and report["kept_audio_tokens"] < audio and report["retention"] == 0.5
        else:
            assert hits >= audio and report["kept_audio_tokens"] == audio and report["task"] is None
        assert second.usage.prompt_tokens > first.usage.prompt_tokens
