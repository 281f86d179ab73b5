"""HeadRouter's Prometheus metrics: each finished request's report, counted in the front end, on vLLM's /metrics."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import httpx
import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from headrouter_vllm.metrics import HeadRouterMetrics
from tests.test_http import MODEL_NAME, QUESTION, chat, routed_log_lines

ROUTED = {"audio_tokens": 158, "kept_audio_tokens": 79, "kv_blocks_freed": 2, "task": "asr", "policy": "headrouter",
          "retention": 0.5, "probe_seconds": 0.004}
UNROUTED = {"audio_tokens": 63, "kept_audio_tokens": 63, "kv_blocks_freed": 0, "task": None, "policy": None,
            "retention": 1.0, "probe_seconds": 0.0}
TEXT_ONLY = {**UNROUTED, "audio_tokens": 0, "kept_audio_tokens": 0}
COUNTERS = ("headrouter_audio_requests_total", "headrouter_audio_tokens_seen_total",
            "headrouter_audio_tokens_kept_total", "headrouter_kv_blocks_freed_total", "headrouter_probe_seconds_count",
            "headrouter_probe_seconds_sum")


def expected(reports) -> dict:
    """What the counters should move by for these reports (probe times: those that are known)."""
    audio = [r for r in reports if r["audio_tokens"] > 0]
    routed = [r for r in audio if r["task"] is not None]
    timed = [r["probe_seconds"] for r in routed if r["probe_seconds"] is not None]
    return {"headrouter_audio_requests_total": len(audio),
            "headrouter_audio_tokens_seen_total": sum(r["audio_tokens"] for r in audio),
            "headrouter_audio_tokens_kept_total": sum(r["kept_audio_tokens"] for r in audio),
            "headrouter_kv_blocks_freed_total": sum(r["kv_blocks_freed"] for r in audio),
            "headrouter_probe_seconds_count": len(timed), "headrouter_probe_seconds_sum": sum(timed)}


def read(registry, name: str, labels: dict | None = None) -> float:
    return registry.get_sample_value(name, labels or {}) or 0.0


# ---- without an engine --------------------------------------------------------------------------------------
def test_observe_counts_each_report():
    registry = CollectorRegistry()
    m = HeadRouterMetrics(registry)
    reports = [ROUTED, UNROUTED, TEXT_ONLY, {**ROUTED, "task": "ser", "policy": "uniform", "probe_seconds": None}]
    for report in reports:
        m.observe(report)
    for name, value in expected(reports).items():
        assert read(registry, name) == pytest.approx(value), name
    assert read(registry, "headrouter_audio_tokens_seen_total") == 158 + 63 + 158
    assert read(registry, "headrouter_routed_requests_total", {"task": "asr", "policy": "headrouter"}) == 1
    assert read(registry, "headrouter_routed_requests_total", {"task": "ser", "policy": "uniform"}) == 1
    assert read(registry, "headrouter_probe_seconds_count") == 1  # the untimed one is not observed
    assert read(registry, "headrouter_probe_seconds_bucket", {"le": "0.005"}) == 1
    assert read(registry, "headrouter_probe_seconds_bucket", {"le": "0.0025"}) == 0


def test_output_processor_counts_final_reports_only():
    """vLLM's own OutputProcessor, patched by register(): reports of finished outputs are counted, once, even for a
    request the front end has already dropped; unfinished outputs and other kv_transfer_params are not."""
    from vllm.v1.engine import EngineCoreOutput, FinishReason
    from vllm.v1.engine.output_processor import OutputProcessor

    from headrouter_vllm.plugin import register

    register()
    before = {name: read(REGISTRY, name) for name in COUNTERS}
    routed_before = read(REGISTRY, "headrouter_routed_requests_total", {"task": "asr", "policy": "headrouter"})
    outputs = [
        EngineCoreOutput("a", [1], finish_reason=FinishReason.LENGTH, kv_transfer_params={"headrouter": ROUTED}),
        EngineCoreOutput("b", [1], finish_reason=FinishReason.STOP, kv_transfer_params={"headrouter": UNROUTED}),
        EngineCoreOutput("c", [1], kv_transfer_params={"headrouter": ROUTED}),  # not finished: not a final report
        EngineCoreOutput("d", [1], finish_reason=FinishReason.LENGTH, kv_transfer_params={"do_remote_decode": True}),
        EngineCoreOutput("e", [1], finish_reason=FinishReason.LENGTH),
    ]
    OutputProcessor(None, log_stats=False).process_outputs(outputs)  # no request states: vLLM drops them all
    for name, value in expected([ROUTED, UNROUTED]).items():
        assert read(REGISTRY, name) - before[name] == pytest.approx(value), name
    assert read(REGISTRY, "headrouter_routed_requests_total", {"task": "asr", "policy": "headrouter"}) \
        - routed_before == 1


def test_output_processor_patch_is_reversible():
    from vllm.v1.engine.output_processor import OutputProcessor

    from headrouter_vllm import patch
    from headrouter_vllm.plugin import register

    register()
    patched = OutputProcessor.process_outputs
    register()  # once only
    assert OutputProcessor.process_outputs is patched and "output_processor" in patch.applied()
    patch.revert_all()
    try:
        assert OutputProcessor.process_outputs is not patched
        assert OutputProcessor.process_outputs.__module__ == "vllm.v1.engine.output_processor"
    finally:
        register()
    assert OutputProcessor.process_outputs.__module__ == "headrouter_vllm.patch.output_processor"


def test_multiprocess_mode_sums_over_processes(tmp_path):
    """Under PROMETHEUS_MULTIPROC_DIR (several API-server processes) vLLM's /metrics reads every process's values
    through prometheus_client's MultiProcessCollector: two processes' counts add up."""
    code = ("import json, sys\nfrom headrouter_vllm.metrics import metrics\n"
            "for report in json.loads(sys.argv[1]):\n    metrics().observe(report)\n")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for reports in ([ROUTED, UNROUTED], [ROUTED]):
        subprocess.run([sys.executable, "-c", code, json.dumps(reports)], env=env, check=True, timeout=120)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    for name, value in expected([ROUTED, UNROUTED, ROUTED]).items():
        assert read(registry, name) == pytest.approx(value), name
    assert read(registry, "headrouter_routed_requests_total", {"task": "asr", "policy": "headrouter"}) == 2


# ---- the offline LLM API -------------------------------------------------------------------------------------
def test_offline_llm_requests_are_counted(tiny_model, speech):
    """In-process ``vllm.LLM``: the counters move by what the outputs' reports say; routed requests are timed."""
    from vllm import LLM, SamplingParams

    from headrouter_vllm.demo import audio_prompt
    from headrouter_vllm.options import route_args

    llm = LLM(model=tiny_model, dtype="float32", max_model_len=1024, block_size=32, enforce_eager=True, seed=0,
              max_num_seqs=4, enable_prefix_caching=False, limit_mm_per_prompt={"audio": 1},
              additional_config={"headrouter": {"retention": 1.0}})
    try:
        before = {name: read(REGISTRY, name) for name in COUNTERS}
        routed_before = read(REGISTRY, "headrouter_routed_requests_total", {"task": "asr", "policy": "coverage"})
        audio = {"prompt": audio_prompt(QUESTION), "multi_modal_data": {"audio": (speech["long"], 16000)}}
        params = [SamplingParams(max_tokens=4, ignore_eos=True, extra_args=args)
                  for args in (route_args(task="asr", retention=0.5), None, route_args(retention=0.5))]
        outputs = llm.generate([audio, audio, "Hello, how are you?"], params, use_tqdm=False)
        reports = [out.kv_transfer_params["headrouter"] for out in outputs]
    finally:
        del llm
        gc.collect()
    assert reports[0]["task"] == "asr" and reports[0]["probe_seconds"] > 0
    assert reports[1]["task"] is None and reports[1]["audio_tokens"] > 0 and reports[2]["audio_tokens"] == 0
    for name, value in expected(reports).items():
        assert read(REGISTRY, name) - before[name] == pytest.approx(value), name
    assert read(REGISTRY, "headrouter_routed_requests_total", {"task": "asr", "policy": "coverage"}) \
        - routed_before == 1


# ---- a real server -------------------------------------------------------------------------------------------
def scrape(server) -> dict[tuple[str, tuple], float]:
    response = httpx.get(server["base"] + "/metrics", timeout=10)
    assert response.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def routed(samples, task: str, policy: str) -> float:
    return samples.get(("headrouter_routed_requests_total", (("policy", policy), ("task", task))), 0.0)


def test_metrics_endpoint_counts_streaming_and_non_streaming_requests(server, speech):
    start = scrape(server)
    text = httpx.get(server["base"] + "/metrics", timeout=10).text
    assert "# HELP headrouter_audio_tokens_seen_total Audio tokens" in text
    assert "# TYPE headrouter_probe_seconds histogram" in text
    for name in COUNTERS:  # registered at startup (their start at 0: the restart test in test_http.py)
        assert (name, ()) in start, name
    assert any(name.startswith("vllm:") for name, _ in start)  # vLLM's own metrics are still there
    lines_before = len(routed_log_lines(server))

    a = chat(server, speech["long"], metadata={"headrouter_task": "asr", "headrouter_retention": "0.5"})
    streamed_options = {"headrouter_task": "ser", "headrouter_policy": "uniform", "headrouter_retention": "0.3"}
    chunks = list(chat(server, speech["short"], metadata=streamed_options, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    twin = chat(server, speech["short"], metadata=streamed_options)  # the streamed request's report, non-streamed
    unrouted = chat(server, speech["short"])  # server retention 1.0: audio kept whole
    text_only = server["client"].chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hello"}], max_tokens=4,
        metadata={"headrouter_retention": "0.5"})
    reports = [r.usage.model_extra["headrouter"] for r in (a, twin, unrouted, text_only)]
    assert [r["task"] for r in reports] == ["asr", "ser", None, None]
    assert reports[0]["kv_blocks_freed"] > 0 and reports[0]["probe_seconds"] > 0 and reports[1]["probe_seconds"] > 0
    assert reports[2]["probe_seconds"] == reports[3]["probe_seconds"] == 0.0

    end = scrape(server)
    delta = {name: end[(name, ())] - start[(name, ())] for name in COUNTERS}
    want = expected([reports[0], reports[1], reports[1], reports[2], reports[3]])  # the twin counts for the stream
    for name in COUNTERS[:-1]:
        assert delta[name] == pytest.approx(want[name]), name
    # the probe time of the streamed request is in no response; what is left of the sum is its own
    assert delta["headrouter_probe_seconds_sum"] - reports[0]["probe_seconds"] - reports[1]["probe_seconds"] > 0
    assert routed(end, "asr", "coverage") - routed(start, "asr", "coverage") == 1
    assert routed(end, "ser", "uniform") - routed(start, "ser", "uniform") == 2

    # the streamed request by its own log line (no response usage): the same as its twin's report
    lines = routed_log_lines(server)[lines_before:]
    fields = [dict(kv.split("=") for kv in line.split()[2:]) for line in lines]
    assert [f["task"] for f in fields] == ["asr", "ser", "ser"]
    stream = fields[1]
    assert (int(stream["audio_tokens"]), int(stream["kept_tokens"]),
            int(stream["blocks_before"]) - int(stream["blocks_after"])) == \
        (reports[1]["audio_tokens"], reports[1]["kept_audio_tokens"], reports[1]["kv_blocks_freed"])
    assert delta["headrouter_audio_tokens_seen_total"] == \
        sum(int(f["audio_tokens"]) for f in fields) + reports[2]["audio_tokens"]
    assert delta["headrouter_kv_blocks_freed_total"] == \
        sum(int(f["blocks_before"]) - int(f["blocks_after"]) for f in fields)


def test_requests_ending_on_a_stop_string_or_aborted_are_counted(server, speech):
    """vLLM gives no final output for these (the front end aborts them in the engine); their reports still count."""
    import time

    from tests.test_http import audio_message

    options = {"headrouter_task": "asr", "headrouter_retention": "0.5"}
    full = chat(server, speech["long"], metadata=options)
    report = full.usage.model_extra["headrouter"]
    start = scrape(server)
    long_answer = dict(model=MODEL_NAME, messages=audio_message(speech["long"]), temperature=0, max_tokens=400,
                       metadata=options, extra_body={"ignore_eos": True})
    # greedy, so the answer starts as before: a stop on its first character ends it after one token
    stopped = server["client"].chat.completions.create(stop=[full.choices[0].message.content[:1]], **long_answer)
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens < 400
    stream = server["client"].chat.completions.create(stream=True, **long_answer)
    next(iter(stream))  # the first chunk comes after the prompt step; then the client goes away
    stream.close()
    deadline, delta = time.time() + 30, {}
    while time.time() < deadline:
        end = scrape(server)
        delta = {name: end[(name, ())] - start[(name, ())] for name in COUNTERS}
        if delta["headrouter_audio_requests_total"] >= 2:
            break
        time.sleep(0.2)
    assert delta["headrouter_audio_requests_total"] == 2
    assert delta["headrouter_audio_tokens_seen_total"] == 2 * report["audio_tokens"]
    assert delta["headrouter_audio_tokens_kept_total"] == 2 * report["kept_audio_tokens"]
    assert delta["headrouter_kv_blocks_freed_total"] == 2 * report["kv_blocks_freed"]
    assert routed(end, "asr", "coverage") - routed(start, "asr", "coverage") == 2
    assert chat(server, speech["short"]).choices[0].finish_reason == "length"  # and the server still serves
