"""A real server on 127.0.0.1 (``headrouter-vllm serve``), driven by the official ``openai`` client."""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from headrouter_vllm.audio import to_wav_bytes
from tests.conftest import CLEAN_ENV
from tests.hf_reference import keep_count, reference

QUESTION = "What is said in this audio clip?"
MODEL_NAME = "tiny"
NEW_TOKENS = 12
FETCH_TIMEOUT_S = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, log_path, port: int, max_model_len: int = 1024, limit_mm: str = '{"audio": 1}',
                 extra: tuple[str, ...] = ()):
    cmd = [sys.executable, "-m", "headrouter_vllm.cli", "serve", model, "--retention", "1.0",
           "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", str(max_model_len), "--block-size", "32", "--enforce-eager", "--limit-mm-per-prompt",
           limit_mm, *extra]
    # the routed-request log line is at INFO (other tests in this process may have turned vLLM logging down)
    # a short audio-fetch timeout, no retries: test_serving's slow URL times out in seconds, not vLLM's 10 + 40 + 160
    env = {**CLEAN_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_LOGGING_LEVEL": "INFO",
           "VLLM_AUDIO_FETCH_TIMEOUT": str(FETCH_TIMEOUT_S), "VLLM_MEDIA_FETCH_MAX_RETRIES": "1"}
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            stop_server(proc)
            raise RuntimeError(f"server did not start:\n{log_path.read_text()[-4000:]}")
        time.sleep(1)


def stop_server(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its engine-core process
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def audio_message(*waves, subtype: str = "FLOAT"):
    encoded = [base64.b64encode(to_wav_bytes(w, subtype=subtype)).decode() for w in waves]
    parts = [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}} for data in encoded]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}]


def chat(server, wave, **kwargs):
    extra_body = {"ignore_eos": True, "return_token_ids": True, **kwargs.pop("extra_body", {})}
    return server["client"].chat.completions.create(model=MODEL_NAME, messages=audio_message(wave), temperature=0,
                                                    max_tokens=NEW_TOKENS, extra_body=extra_body, **kwargs)


def routed_log_lines(server) -> list[str]:
    return re.findall(r"headrouter routed .*", server["log"].read_text())


def test_metadata_routes_and_prunes(server, speech, tiny_model):
    from headrouter_vllm.demo import audio_prompt

    wave = speech["long"]
    before = len(routed_log_lines(server))
    response = chat(server, wave, metadata={"headrouter_task": "asr", "headrouter_retention": "0.5"})
    ref = reference(tiny_model, audio_prompt(QUESTION), wave, 0.5, NEW_TOKENS)
    assert response.choices[0].token_ids == ref["tokens"]
    assert response.usage.prompt_tokens == ref["length"]
    lines = routed_log_lines(server)[before:]
    assert len(lines) == 1
    fields = dict(kv.split("=") for kv in lines[0].split()[2:])
    n, keep = ref["audio_tokens"], keep_count(0.5, ref["audio_tokens"])
    assert (fields["task"], int(fields["audio_tokens"]), int(fields["kept_tokens"])) == ("asr", n, keep)
    assert int(fields["blocks_before"]) == -(-ref["length"] // 32)
    assert int(fields["blocks_after"]) == -(-(ref["length"] - (n - keep)) // 32)
    report = response.usage.model_extra["headrouter"]  # the same, per request, in the response
    assert report.pop("probe_seconds") > 0  # probe and compaction, timed by the model runner
    assert report == {"audio_tokens": n, "kept_audio_tokens": keep, "task": "asr", "policy": "coverage",
                      "retention": 0.5, "semantics": "after_prompt",
                      "kv_blocks_freed": int(fields["blocks_before"]) - int(fields["blocks_after"])}
    assert not getattr(response, "kv_transfer_params", None)


@pytest.mark.parametrize("how", ["metadata", "vllm_xargs"])
def test_region_policy_keeps_the_named_seconds(server, speech, tiny_model, how):
    """A client that knows where to listen names it (``headrouter_focus``, seconds): the kept audio tokens lie in
    those windows, and the answer equals the HF reference keeping the same tokens."""
    from headrouter_vllm.demo import audio_prompt

    wave, focus = speech["long"], "0.8-4.4,6-6.4"
    options = {"headrouter_policy": "region", "headrouter_focus": focus, "headrouter_retention": "0.5"}
    kwargs = {"metadata": options} if how == "metadata" else {
        "extra_body": {"vllm_xargs": {**options, "headrouter_focus": [0.8, 4.4, 6, 6.4]}}}
    got = chat(server, wave, **kwargs)
    ref = reference(tiny_model, audio_prompt(QUESTION), wave, 0.5, NEW_TOKENS, policy="region",
                    focus=((0.8, 4.4), (6.0, 6.4)))
    assert got.choices[0].token_ids == ref["tokens"]
    inside = {ref["start"] + t for t in [*range(20, 110), *range(150, 160)]}
    assert set(ref["kept"]) <= inside and len(ref["kept"]) == keep_count(0.5, ref["audio_tokens"])
    assert got.usage.model_extra["headrouter"]["policy"] == "region"


def test_vllm_xargs_and_unrouted_requests(server, speech, tiny_model):
    from headrouter_vllm.demo import audio_prompt

    wave = speech["short"]
    ref = reference(tiny_model, audio_prompt(QUESTION), wave, 0.3, NEW_TOKENS)
    got = chat(server, wave, extra_body={"vllm_xargs": {"headrouter_retention": 0.3}})
    assert got.choices[0].token_ids == ref["tokens"]
    unpruned = reference(tiny_model, audio_prompt(QUESTION), wave, 1.0, NEW_TOKENS)
    assert chat(server, wave).choices[0].token_ids == unpruned["tokens"]  # server default retention 1.0
    text_only = server["client"].chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hello"}], max_tokens=4,
        metadata={"headrouter_retention": "0.5"})  # no audio: served as vanilla, not an error
    assert text_only.choices[0].message.content is not None
    assert text_only.usage.model_extra["headrouter"]["audio_tokens"] == 0
    unpruned_report = chat(server, wave, metadata={"headrouter_retention": "1.0"}).usage.model_extra["headrouter"]
    assert unpruned_report["kept_audio_tokens"] == unpruned_report["audio_tokens"] > 0
    assert unpruned_report["kv_blocks_freed"] == 0


BAD_REQUESTS = [
    ("unknown_task", {"metadata": {"headrouter_task": "karaoke"}}, "headrouter_task"),
    ("retention_text", {"metadata": {"headrouter_retention": "abc"}}, "headrouter_retention"),
    ("retention_zero", {"metadata": {"headrouter_retention": "0"}}, "headrouter_retention"),
    ("retention_above_one", {"extra_body": {"vllm_xargs": {"headrouter_retention": 1.5}}}, "headrouter_retention"),
    ("retention_negative", {"extra_body": {"vllm_xargs": {"headrouter_retention": -1}}}, "headrouter_retention"),
    ("metadata_not_string", {"extra_body": {"metadata": {"headrouter_retention": 0.5}}}, "headrouter_retention"),
    ("metadata_list", {"extra_body": {"metadata": {"headrouter_task": ["asr"]}}}, "headrouter_task"),
    ("retention_list", {"extra_body": {"vllm_xargs": {"headrouter_retention": [0.5]}}}, "headrouter_retention"),
    ("task_not_string", {"extra_body": {"vllm_xargs": {"headrouter_task": 3}}}, "headrouter_task"),
    ("unknown_policy", {"metadata": {"headrouter_policy": "best"}}, "headrouter_policy"),
    ("unknown_probe_point", {"metadata": {"headrouter_probe_point": "middle"}}, "headrouter_probe_point"),
    ("region_without_focus", {"metadata": {"headrouter_policy": "region"}}, "headrouter_focus"),
    ("focus_without_region", {"metadata": {"headrouter_focus": "1-2"}}, "headrouter_focus"),
    ("focus_backwards", {"metadata": {"headrouter_policy": "region", "headrouter_focus": "3-1"}}, "headrouter_focus"),
    ("focus_odd_list", {"metadata": {"headrouter_policy": "region"},
                        "extra_body": {"vllm_xargs": {"headrouter_focus": [1, 2, 3]}}}, "headrouter_focus"),
    ("conflict", {"metadata": {"headrouter_retention": "0.5"},
                  "extra_body": {"vllm_xargs": {"headrouter_retention": 0.7}}}, "headrouter_retention"),
]


@pytest.mark.parametrize("kwargs,field", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS])
def test_bad_options_are_400_and_server_keeps_serving(server, speech, kwargs, field):
    with pytest.raises(openai.BadRequestError) as info:
        chat(server, speech["short"], **kwargs)
    assert info.value.status_code == 400
    assert field in str(info.value)
    assert chat(server, speech["short"]).choices[0].token_ids  # the next good request still succeeds


def test_task_without_audio_is_400(server, speech):
    with pytest.raises(openai.BadRequestError) as info:
        server["client"].chat.completions.create(model=MODEL_NAME, max_tokens=2, metadata={"headrouter_task": "asr"},
                                                 messages=[{"role": "user", "content": QUESTION}])
    assert info.value.status_code == 400 and "metadata.headrouter_task" in str(info.value)
    assert "no audio" in str(info.value)
    assert chat(server, speech["short"]).choices[0].token_ids


def test_kv_pool_is_empty_after_requests(server):
    metrics = httpx.get(server["base"] + "/metrics", timeout=10).text
    usage = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("vllm:kv_cache_usage_perc")]
    assert usage and all(u == 0.0 for u in usage)


def _raw_audio_chat(server, data: str):
    return server["client"].chat.completions.create(
        model=MODEL_NAME, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
            {"type": "text", "text": QUESTION}]}])


def _b64(wave) -> str:
    return base64.b64encode(to_wav_bytes(wave)).decode()


BAD_AUDIO = [
    ("too_long", lambda: _b64(__import__("numpy").zeros(16000 * 31, dtype="float32")), "at most 30 s"),
    ("corrupt", lambda: base64.b64encode(b"RIFF garbage" * 50).decode(), "could not decode"),
    ("not_base64", lambda: "%%%%", "not valid base64"),
    ("empty", lambda: "", "non-empty"),
    # a format the decoder does not know: an image declared as audio
    ("not_audio", lambda: base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(200)).decode(), "could not decode"),
]


@pytest.mark.parametrize("make,message", [b[1:] for b in BAD_AUDIO], ids=[b[0] for b in BAD_AUDIO])
def test_bad_audio_is_400_and_server_keeps_serving(server, speech, make, message):
    with pytest.raises(openai.BadRequestError) as info:
        _raw_audio_chat(server, make())
    assert info.value.status_code == 400 and message in str(info.value)
    assert "messages[0].content[0]" in str(info.value)
    assert chat(server, speech["short"]).choices[0].token_ids


def test_bad_audio_format_field_is_400(server, speech):
    part = audio_message(speech["short"])[0]["content"][0]
    part = {**part, "input_audio": {**part["input_audio"], "format": 7}}
    with pytest.raises(openai.BadRequestError) as info:
        server["client"].chat.completions.create(model=MODEL_NAME, max_tokens=2, messages=[
            {"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}])
    assert info.value.status_code == 400 and "input_audio.format" in str(info.value)
    assert chat(server, speech["short"]).choices[0].token_ids


def test_too_many_audio_parts_is_400(server, speech):
    part = audio_message(speech["short"])[0]["content"][0]
    with pytest.raises(openai.BadRequestError) as info:
        server["client"].chat.completions.create(model=MODEL_NAME, max_tokens=2, messages=[
            {"role": "user", "content": [part, part, {"type": "text", "text": QUESTION}]}])
    assert info.value.status_code == 400
    assert chat(server, speech["short"]).choices[0].token_ids


def test_loopback_load(server, speech):
    """320 requests, 32 at a time, mixed retentions, policies and tasks, streaming and not, every seventh
    streaming client hanging up after its first chunk: each request gets one complete answer (equal to the same
    request run alone) or is dropped by its own client; the KV pool is empty afterwards."""
    import asyncio
    import itertools
    import json as jsonlib

    clips = {name: base64.b64encode(to_wav_bytes(wave, subtype="FLOAT")).decode() for name, wave in speech.items()}
    variants = list(itertools.product(["short", "long"], ["1.0", "0.7", "0.3"], ["headrouter", "uniform"],
                                      ["asr", "auto"]))

    def body(i: int, stream: bool) -> dict:
        clip, retention, policy, task = variants[i % len(variants)]
        return {"model": MODEL_NAME, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": stream,
                "messages": [{"role": "user", "content": [
                    {"type": "input_audio", "input_audio": {"data": clips[clip], "format": "wav"}},
                    {"type": "text", "text": QUESTION}]}],
                "metadata": {"headrouter_retention": retention, "headrouter_task": task,
                             "headrouter_policy": policy}}

    async def one(client, i, stream, hang_up, limit):
        async with limit:
            if not stream:
                r = await client.post("/v1/chat/completions", json=body(i, False))
                return r.status_code, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
            text, chunks = "", 0
            async with client.stream("POST", "/v1/chat/completions", json=body(i, True)) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunks += 1
                    if hang_up:
                        return "hung up", None
                    delta = jsonlib.loads(line[6:])["choices"][0]["delta"]
                    text += delta.get("content") or ""
                return r.status_code, text

    async def main():
        limit = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=server["base"], timeout=120) as client:
            alone = [await one(client, i, False, False, limit) for i in range(len(variants))]
            jobs = [one(client, i, i % 2 == 1, i % 14 == 1, limit) for i in range(320)]
            return alone, await asyncio.gather(*jobs)

    alone, results = asyncio.run(main())
    assert all(status == 200 for status, _ in alone)
    hung_up = 0
    for i, (status, text) in enumerate(results):
        if status == "hung up":
            hung_up += 1
            continue
        assert status == 200, text
        assert text == alone[i % len(variants)][1], f"request {i} differs from the same request alone"
    assert hung_up == len([i for i in range(320) if i % 14 == 1])
    deadline = time.time() + 30  # aborted streams are cleaned up asynchronously
    while True:
        metrics = httpx.get(server["base"] + "/metrics", timeout=10).text
        usage = [float(x.split()[-1]) for x in metrics.splitlines() if x.startswith("vllm:kv_cache_usage_perc")]
        running = [float(x.split()[-1]) for x in metrics.splitlines() if x.startswith("vllm:num_requests_running")]
        if usage and all(u == 0.0 for u in usage) and all(r == 0 for r in running):
            break
        assert time.time() < deadline, f"KV pool not empty after the load: usage {usage}, running {running}"
        time.sleep(1)


def test_vllm_bench_serve_client_drives_the_server(server, tiny_model, tmp_path):
    """vLLM's own benchmark client, on a workload exported by `headrouter-vllm bench --export-workload`."""
    from headrouter_vllm.benchmarks.serving.vllm_client import main as vllm_bench
    from headrouter_vllm.benchmarks.serving.workload import export_for_vllm_bench, make_workload

    before = len(routed_log_lines(server))
    path = export_for_vllm_bench(make_workload(4, [6.0], 4, seed=3), tmp_path)
    result = vllm_bench(["--backend", "openai-chat", "--endpoint", "/v1/chat/completions", "--base-url",
                         server["base"], "--model", MODEL_NAME, "--tokenizer", tiny_model, "--dataset-name",
                         "custom_audio", "--dataset-path", str(path), "--num-prompts", "4", "--custom-output-len",
                         "4", "--enable-multimodal-chat", "--extra-body",
                         '{"vllm_xargs": {"headrouter_retention": 0.5}}'])
    assert result["completed"] == 4 and result["failed"] == 0
    assert len(routed_log_lines(server)) - before == 4


def test_restart_mid_load_loses_no_request_silently(server, speech):
    """Stop the server while 48 requests are in flight, start it again: every request either got a complete
    answer or an error its client can see (connection error, 5xx, a stream without its end); retried on the
    restarted server, all of those succeed. The restarted server's HeadRouter counters start at 0. (The session's
    shared server is the one stopped; the restarted one takes its place for the tests after this one.)"""
    import asyncio
    import json as jsonlib

    from tests.test_metrics import COUNTERS, scrape

    port = server["port"]
    data = base64.b64encode(to_wav_bytes(speech["long"], subtype="FLOAT")).decode()

    def body(i: int) -> dict:
        return {"model": MODEL_NAME, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stream": i % 2 == 1,
                "messages": [{"role": "user", "content": [
                    {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
                    {"type": "text", "text": QUESTION}]}],
                "metadata": {"headrouter_retention": ["0.3", "0.5", "1.0"][i % 3]}}

    async def one(client, i, limit) -> str:
        """'ok' for a complete answer, else 'error: <what the client saw>'."""
        async with limit:
            try:
                if not body(i)["stream"]:
                    r = await client.post("/v1/chat/completions", json=body(i))
                    if r.status_code != 200:
                        return f"error: HTTP {r.status_code} {r.text[:200]}"
                    choice = r.json()["choices"][0]
                    if choice["finish_reason"] != "length":  # "abort": the stop cut it, and the client is told
                        return f"error: finish_reason {choice['finish_reason']}"
                    assert r.json()["usage"]["completion_tokens"] == 24  # a complete answer is whole
                    return "ok"
                finish, done = None, False
                async with client.stream("POST", "/v1/chat/completions", json=body(i)) as r:
                    if r.status_code != 200:
                        return f"error: stream HTTP {r.status_code}"
                    async for line in r.aiter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: "):
                            chunk = jsonlib.loads(line[6:])
                            if "error" in chunk:
                                return f"error: stream chunk {line[:200]}"
                            finish = chunk["choices"][0].get("finish_reason") or finish if chunk["choices"] else finish
                return "ok" if done and finish == "length" else f"error: stream ended, done={done} finish={finish}"
            except httpx.HTTPError as e:
                return f"error: {type(e).__name__} {e!r}"

    async def load(indices, stop_server_after_first_answer=None):
        limit = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            tasks = [asyncio.create_task(one(client, i, limit)) for i in indices]
            if stop_server_after_first_answer is not None:
                # stop as soon as one request is answered: with 16 in flight of 48, the stop lands mid-load
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                await asyncio.to_thread(stop_server, stop_server_after_first_answer)
            return await asyncio.gather(*tasks)

    try:
        first = asyncio.run(load(range(48), stop_server_after_first_answer=server["proc"]))
    finally:  # restarted whatever happened: the tests after this one share the server
        stop_server(server["proc"])
        server["proc"] = start_server(server["model"], server["log"], port)  # the session fixture stops it
    failed = [i for i, outcome in enumerate(first) if outcome != "ok"]
    assert failed, "the stop was meant to land mid-load"
    start = scrape(server)
    for name in COUNTERS:  # registered at startup: 0 before any request
        assert start[(name, ())] == 0, name
    log_before_retry = len(server["log"].read_text())
    retried = asyncio.run(load(failed))
    # on a failure, say what each client saw and what the restarted server logged
    errors = {i: outcome for i, outcome in zip(failed, retried, strict=True) if outcome != "ok"}
    server_errors = [line for line in server["log"].read_text()[log_before_retry:].splitlines()
                     if re.search(r"ERROR|Traceback|Error:| 5\d\d ", line)]
    assert not errors, f"retried requests failed: {errors}\nserver log: {server_errors[-40:]}"


@pytest.fixture(scope="module")
def omni_server(tiny_models, tmp_path_factory):
    """A HeadRouter server on the tiny Qwen2.5-Omni thinker, with room for 300 s of audio and two clips."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("omni-server") / "server.log"
    proc = start_server(tiny_models("qwen2.5-omni"), log_path, port, max_model_len=8192,
                        limit_mm='{"audio": 2, "image": 0, "video": 0}')
    base = f"http://127.0.0.1:{port}"
    try:
        yield dict(base=base, log=log_path, client=openai.OpenAI(base_url=base + "/v1", api_key="none"))
    finally:
        stop_server(proc)


def test_omni_server_routes_two_clips_and_takes_up_to_300_s(omni_server, speech, tiny_models):
    """The OpenAI client's chat request with two audio parts: each clip routed on its own, tokens = the HF
    reference; audio over the model's 300 s is a 400 naming the limit, and a 280 s clip is served."""
    from headrouter_vllm.demo import audio_prompt
    from tests.test_long_audio import long_clip

    client = omni_server["client"]
    waves = [speech["short"], speech["long"]]
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=audio_message(*waves), temperature=0, max_tokens=NEW_TOKENS,
        metadata={"headrouter_task": "asr", "headrouter_retention": "0.5"},
        extra_body={"ignore_eos": True, "return_token_ids": True})
    ref = reference(tiny_models("qwen2.5-omni"), audio_prompt(QUESTION, "qwen2.5-omni", clips=2), waves, 0.5,
                    NEW_TOKENS, task="asr")
    assert response.choices[0].token_ids == ref["tokens"]
    report = response.usage.model_extra["headrouter"]
    assert report["audio_tokens"] == sum(n for _, n in ref["spans"])
    assert report["kept_audio_tokens"] == sum(keep_count(0.5, n) for _, n in ref["spans"])

    with pytest.raises(openai.BadRequestError, match="this model takes at most 300 s"):
        client.chat.completions.create(model=MODEL_NAME, messages=audio_message(long_clip(speech, 301),
                                                                                subtype="PCM_16"), max_tokens=2)
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=audio_message(long_clip(speech, 280), subtype="PCM_16"), max_tokens=2,
        metadata={"headrouter_retention": "0.3"})
    report = response.usage.model_extra["headrouter"]
    assert report["audio_tokens"] == 7000 and report["kept_audio_tokens"] == keep_count(0.3, 7000)
