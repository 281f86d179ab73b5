"""API keys and the body limit at the HTTP edge: with ``--api-key`` (or ``VLLM_API_KEY``) a request vLLM would refuse
gets vLLM's 401 before the HeadRouter middleware reads its body; a body over the limit gets a 413 before it is
buffered whole. Fast tests on a tiny FastAPI app wired by vLLM's own ``init_entrypoints_middleware`` (the real
middleware order), then one real server started with two keys."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
from argparse import Namespace

import httpx
import numpy as np
import pytest
from prometheus_client import REGISTRY

from headrouter_vllm.api import limits
from headrouter_vllm.audio import to_wav_bytes
from tests.test_http import MODEL_NAME, NEW_TOKENS, QUESTION, free_port, start_server, stop_server

MIDDLEWARE = "headrouter_vllm.api.middleware.HeadRouterMiddleware"
KEYS = ["key-one", "key-two"]
CHAT = "/v1/chat/completions"
COUNTERS = ("headrouter_http_bodies_read_total", "headrouter_http_audio_decoded_total",
            "headrouter_http_bodies_too_large_total")


def _b64_wav(wave) -> str:
    return base64.b64encode(to_wav_bytes(wave, subtype="FLOAT")).decode()


def _tone(seconds: float) -> np.ndarray:
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


# kind -> (audio data: "good", "too_long" or "undecodable"; extra body fields; expected status; text in the answer)
KINDS = {
    "good_metadata": ("good", {"metadata": {"headrouter_retention": "1.0"}}, 200, None),
    "good_xargs": ("good", {"vllm_xargs": {"headrouter_retention": 1.0}}, 200, None),
    "bad_option_metadata": ("good", {"metadata": {"headrouter_retention": "abc"}}, 400,
                            "metadata.headrouter_retention"),
    "bad_option_xargs": ("good", {"vllm_xargs": {"headrouter_retention": 1.5}}, 400, "vllm_xargs.headrouter_retention"),
    "too_long_audio": ("too_long", {}, 400, "at most 30 s"),
    "undecodable_audio": ("undecodable", {}, 400, "could not decode"),
}


@pytest.fixture(scope="module")
def audio_data(speech) -> dict[str, str]:
    return {"good": _b64_wav(speech["short"]), "too_long": _b64_wav(np.zeros(16000 * 31, dtype=np.float32)),
            "undecodable": base64.b64encode(b"RIFF garbage" * 50).decode()}


def request_body(kind: str, audio: dict[str, str], stream: bool) -> dict:
    data, extra, _, _ = KINDS[kind]
    body = {"model": MODEL_NAME, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True, "stream": stream,
            "messages": [{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": audio[data], "format": "wav"}},
                {"type": "text", "text": QUESTION}]}], **extra}
    if not stream:
        body["return_token_ids"] = True
    return body


def counters(read) -> dict[str, float]:
    return {name: read(name) or 0.0 for name in COUNTERS}


def local_counters() -> dict[str, float]:
    return counters(REGISTRY.get_sample_value)


def auth_headers(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


# --- the middleware in vLLM's own middleware wiring, on a tiny app (no engine) ---


@pytest.fixture
def audio_limit():
    """The limit the engine sets in a server process (Qwen2-Audio: 30 s), restored afterwards."""
    before = limits.max_audio_seconds()
    limits.set_max_audio_seconds(30.0)
    yield
    limits.set_max_audio_seconds(before)


@pytest.fixture
def set_api_key_env(monkeypatch):
    """Sets VLLM_API_KEY for vLLM to read anew (it caches its environment once an engine has run in this process)."""
    from vllm import envs

    def clear():
        getattr(envs.__getattr__, "cache_clear", lambda: None)()

    def set_key(value: str) -> None:
        monkeypatch.setenv("VLLM_API_KEY", value)
        clear()

    clear()
    yield set_key
    clear()  # before monkeypatch restores the environment: the next read sees the old value


def tiny_app(api_key=None, limit_mm=None, prompt_embeds=False):
    """vLLM's middleware as ``build_app`` adds it (CORS, its API-key check, then ``--middleware`` outermost) around
    routes that echo the body they got."""
    from fastapi import FastAPI
    from starlette.responses import JSONResponse
    from vllm.entrypoints.serve.middleware.register import init_entrypoints_middleware

    args = Namespace(allowed_origins=["*"], allow_credentials=False, allowed_methods=["*"], allowed_headers=["*"],
                     api_key=api_key, enable_request_id_headers=False, middleware=[MIDDLEWARE],
                     limit_mm_per_prompt=limit_mm or {}, enable_prompt_embeds=prompt_embeds)
    app = FastAPI()
    app.state.args = args

    async def echo(request):
        return JSONResponse({"received": await request.json()})

    async def health(request):
        return JSONResponse({})

    for path in (CHAT, "/v1/completions"):
        app.router.add_route(path, echo, methods=["POST"])
    app.router.add_route("/health", health, methods=["GET"])

    init_entrypoints_middleware(args, app, ())
    return app


def client(app):
    from starlette.testclient import TestClient

    return TestClient(app)


def answers(http, audio, key=None) -> dict:
    out = {}
    for kind in KINDS:
        for stream in (False, True):
            response = http.post(CHAT, json=request_body(kind, audio, stream), headers=auth_headers(key))
            out[kind, stream] = (response.status_code, response.json())
    return out


def test_without_keys_the_middleware_checks_as_before(audio_limit, audio_data):
    before = local_counters()
    with client(tiny_app()) as http:
        got = answers(http, audio_data)
    for (kind, stream), (status, body) in got.items():
        assert status == KINDS[kind][2], (kind, stream, body)
        if status == 400:
            assert KINDS[kind][3] in body["error"]["message"] and body["error"]["code"] == 400
    assert got["good_metadata", False][1]["received"]["vllm_xargs"] == {"headrouter_retention": 1.0}
    after = local_counters()
    assert after["headrouter_http_bodies_read_total"] - before["headrouter_http_bodies_read_total"] == 12
    # every request has one clip, decoded before the options are checked
    assert after["headrouter_http_audio_decoded_total"] - before["headrouter_http_audio_decoded_total"] == 12


@pytest.mark.parametrize("source", ["flag", "env"])
def test_refused_requests_get_vllms_401_before_the_body_is_read(audio_limit, audio_data, set_api_key_env, source):
    if source == "env":
        set_api_key_env(KEYS[0])
    app = tiny_app(api_key=KEYS if source == "flag" else None)
    before = local_counters()
    with client(app) as http:
        for header in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEYS[0]}"},
                       {"Authorization": KEYS[0]}, {"Authorization": f"Bearer {KEYS[0]}x"}):
            for kind in KINDS:
                for stream in (False, True):
                    response = http.post(CHAT, json=request_body(kind, audio_data, stream), headers=header)
                    assert (response.status_code, response.json()) == (401, {"error": "Unauthorized"}), (header, kind)
        # a body larger than the limit, without a key: still vLLM's 401 (nothing of it is read)
        response = http.post(CHAT, content=b"x" * (limits.max_body_bytes() + 1))
        assert response.status_code == 401
        # paths vLLM leaves open stay open
        assert http.get("/health").status_code == 200
        preflight = {"Origin": "http://example.com", "Access-Control-Request-Method": "POST"}
        assert http.options(CHAT, headers=preflight).status_code == 200
    assert local_counters() == before  # no body read, no audio decoded


@pytest.mark.parametrize("source", ["flag", "env"])
def test_a_right_key_gets_the_answers_as_without_keys(audio_limit, audio_data, set_api_key_env, source):
    with client(tiny_app()) as http:
        open_answers = answers(http, audio_data)
    if source == "env":
        set_api_key_env(KEYS[1])
    keys = KEYS[1:] if source == "env" else KEYS
    with client(tiny_app(api_key=KEYS if source == "flag" else None)) as http:
        for key in keys:
            assert answers(http, audio_data, key) == open_answers


def test_body_over_the_limit_is_413_before_it_is_read(monkeypatch):
    monkeypatch.setenv(limits.BODY_LIMIT_ENV, "0.01")  # 10,485 bytes
    limit = limits.max_body_bytes()
    before = local_counters()
    with client(tiny_app(api_key=KEYS)) as http:
        response = http.post(CHAT, content=b"x" * (limit + 1), headers=auth_headers(KEYS[0]))
        assert response.status_code == 413
        error = response.json()["error"]
        assert error["code"] == 413 and f"larger than {limit} bytes" in error["message"]
        assert limits.BODY_LIMIT_ENV in error["message"]
        assert http.post(CHAT, content=b"x" * (limit + 1)).status_code == 401  # no key: the 401 comes first
        ok = http.post(CHAT, json={"messages": [], "pad": "x" * (limit - 100)}, headers=auth_headers(KEYS[0]))
        assert ok.status_code == 200
    after = local_counters()
    assert after["headrouter_http_bodies_too_large_total"] - before["headrouter_http_bodies_too_large_total"] == 1
    assert after["headrouter_http_bodies_read_total"] - before["headrouter_http_bodies_read_total"] == 1  # the ok one


def test_a_streamed_body_is_refused_as_soon_as_it_passes_the_limit(monkeypatch):
    """No Content-Length (chunked): the middleware counts the bytes as they come and stops reading at the limit."""
    from headrouter_vllm.api.middleware import HeadRouterMiddleware

    monkeypatch.setenv(limits.BODY_LIMIT_ENV, "0.01")
    reads, sent = [], []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"x" * 4096, "more_body": True}  # a body that never ends

    async def send(message):
        sent.append(message)

    async def inner(scope, receive, send):
        raise AssertionError("the request must not reach the app")

    scope = {"type": "http", "method": "POST", "path": CHAT, "headers": [], "app": None}
    asyncio.run(HeadRouterMiddleware(inner)(scope, receive, send))
    assert len(reads) == 3  # 12,288 bytes > 10,485
    assert sent[0]["status"] == 413 and json.loads(sent[1]["body"])["error"]["code"] == 413


def test_default_body_limit_fits_the_longest_audio(audio_limit, monkeypatch):
    monkeypatch.delenv(limits.BODY_LIMIT_ENV, raising=False)
    assert limits.max_body_bytes() == 30 * 512_000 + 8 * limits.MIB  # 30 s of 48 kHz stereo float32 wav, base64
    assert limits.max_body_bytes(2) == 2 * 30 * 512_000 + 8 * limits.MIB
    limits.set_max_audio_seconds(300.0)  # Omni: capped at vLLM's own per-clip limit (25 MiB), base64
    assert limits.max_body_bytes() == 4 * -(-25 * limits.MIB // 3) + 8 * limits.MIB
    assert [limits.audio_clips_per_prompt(m) for m in (None, {}, {"audio": 3}, {"audio": {"count": 2}},
                                                       {"image": 4})] == [1, 1, 3, 2, 1]
    monkeypatch.setenv(limits.BODY_LIMIT_ENV, "0")
    assert limits.max_body_bytes() is None
    monkeypatch.setenv(limits.BODY_LIMIT_ENV, "2.5")
    assert limits.max_body_bytes() == int(2.5 * limits.MIB)


@pytest.mark.parametrize("value", ["abc", "-1", "nan"])
def test_a_bad_body_limit_stops_the_start(monkeypatch, value):
    from headrouter_vllm.api.middleware import HeadRouterMiddleware

    monkeypatch.setenv(limits.BODY_LIMIT_ENV, value)
    with pytest.raises(ValueError, match=limits.BODY_LIMIT_ENV):
        HeadRouterMiddleware(None)


def test_with_prompt_embeds_the_audio_sized_default_leaves_completions_alone(monkeypatch):
    monkeypatch.delenv(limits.BODY_LIMIT_ENV, raising=False)
    monkeypatch.setattr(limits, "TEXT_BODY_BYTES", 1000)
    before = limits.max_audio_seconds()
    limits.set_max_audio_seconds(0.01)  # a default limit of 6,120 bytes
    try:
        big = {"prompt": "x" * 7000}
        with client(tiny_app(prompt_embeds=True)) as http:
            assert http.post("/v1/completions", json=big).status_code == 200
            assert http.post(CHAT, json=big).status_code == 413
        with client(tiny_app()) as http:
            assert http.post("/v1/completions", json=big).status_code == 413
    finally:
        limits.set_max_audio_seconds(before)


# --- one real server with two keys ---


@pytest.fixture(scope="module")
def auth_server(tiny_model, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("auth-server") / "server.log"
    proc = start_server(tiny_model, log_path, port, extra=("--api-key", *KEYS))
    try:
        yield {"base": f"http://127.0.0.1:{port}", "port": port, "log": log_path}
    finally:
        stop_server(proc)


def server_counters(server) -> dict[str, float]:
    text = httpx.get(server["base"] + "/metrics", timeout=10).text  # /metrics is open, as in vanilla vLLM

    def read(name):
        match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else None

    return counters(read)


@pytest.mark.parametrize("key", [None, "wrong"], ids=["no_key", "wrong_key"])
def test_server_refuses_before_headrouter_reads(auth_server, audio_data, key):
    before = server_counters(auth_server)
    with httpx.Client(base_url=auth_server["base"], timeout=60) as http:
        for kind in KINDS:
            for stream in (False, True):
                response = http.post(CHAT, json=request_body(kind, audio_data, stream), headers=auth_headers(key))
                assert (response.status_code, response.json()) == (401, {"error": "Unauthorized"}), (kind, stream)
    assert server_counters(auth_server) == before


def test_server_with_a_right_key_answers_as_today(auth_server, audio_data, speech, tiny_model):
    from headrouter_vllm.demo import audio_prompt
    from tests.hf_reference import reference

    tokens = reference(tiny_model, audio_prompt(QUESTION), speech["short"], 1.0, NEW_TOKENS)["tokens"]
    before = server_counters(auth_server)
    with httpx.Client(base_url=auth_server["base"], timeout=120) as http:
        for key in KEYS:
            for kind, (_, _, status, text) in KINDS.items():
                for stream in (False, True):
                    response = http.post(CHAT, json=request_body(kind, audio_data, stream), headers=auth_headers(key))
                    assert response.status_code == status, (key, kind, stream, response.text[:500])
                    if status == 400:
                        error = response.json()["error"]
                        assert text in error["message"] and error["code"] == 400
                    elif stream:
                        assert response.text.rstrip().endswith("data: [DONE]")
                    else:
                        assert response.json()["choices"][0]["token_ids"] == tokens
    after = server_counters(auth_server)
    assert after["headrouter_http_bodies_read_total"] - before["headrouter_http_bodies_read_total"] == 24
    assert after["headrouter_http_audio_decoded_total"] - before["headrouter_http_audio_decoded_total"] == 24


def _raw_post(port: int, head: dict[str, str], body_parts: list[bytes], chunked: bool) -> tuple[int, bytes]:
    """A POST written by hand: a Content-Length that is never sent in full, or a chunked body that never ends;
    returns the status and body of the answer."""
    lines = [f"POST {CHAT} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
             *(f"{k}: {v}" for k, v in head.items())]
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        for part in body_parts:
            sock.sendall(b"%x\r\n%s\r\n" % (len(part), part) if chunked else part)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        header, _, rest = answer.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", header).group(1))
        while len(rest) < length:
            data = sock.recv(65536)
            if not data:
                break
            rest += data
    return int(header.split()[1]), rest


def test_server_body_over_the_limit_is_413(auth_server):
    limit = 30 * 512_000 + 8 * limits.MIB  # the default for Qwen2-Audio with one clip per prompt
    before = server_counters(auth_server)
    key = {"Authorization": f"Bearer {KEYS[0]}"}
    # a Content-Length over the limit: answered at once, with a few bytes of the body sent
    status, body = _raw_post(auth_server["port"], {**key, "Content-Length": str(limit + 1)}, [b"{"], chunked=False)
    assert status == 413 and f"larger than {limit} bytes" in json.loads(body)["error"]["message"]
    status, body = _raw_post(auth_server["port"], {"Content-Length": str(limit + 1)}, [b"{"], chunked=False)
    assert (status, json.loads(body)) == (401, {"error": "Unauthorized"})
    # chunked: answered when the bytes read pass the limit, though the body has not ended
    parts = [b"x" * (1 << 20)] * (limit >> 20) + [b"x" * ((limit & ((1 << 20) - 1)) + 1)]
    status, body = _raw_post(auth_server["port"], key, parts, chunked=True)
    assert status == 413 and json.loads(body)["error"]["code"] == 413
    after = server_counters(auth_server)
    assert after["headrouter_http_bodies_too_large_total"] - before["headrouter_http_bodies_too_large_total"] == 2
    assert after["headrouter_http_audio_decoded_total"] == before["headrouter_http_audio_decoded_total"]
