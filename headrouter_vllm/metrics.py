"""Prometheus metrics for HeadRouter, served on vLLM's own ``/metrics``.

The engine core returns a report with every finished request's final output (``kv_transfer_params
["headrouter"]``, the same dict clients get in ``usage.headrouter``). The front end counts those reports as
vLLM's output processor receives them (``patch/output_processor.py``), so streaming and non-streaming requests
and the offline ``LLM`` API are all counted, in the process that serves ``/metrics``.

Metrics live in prometheus_client's default registry, which vLLM's ``/metrics`` exposes. Under
``PROMETHEUS_MULTIPROC_DIR`` (several API-server processes) prometheus_client keeps their values in that
folder's files and vLLM's multiprocess collector sums them over the processes; only counters and a histogram
are used, which sum correctly there. Docs: ``docs/observability.md``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from headrouter_vllm.log import get_logger
from headrouter_vllm.names import REPORT_KEY

logger = get_logger(__name__)

# probe + compaction take about a millisecond on tiny models and tens of milliseconds on 7B-size ones
PROBE_SECONDS_BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                         10.0)


class HeadRouterMetrics:
    """HeadRouter's counters and histogram, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.audio_requests = Counter(
            "headrouter_audio_requests", "Finished requests with audio, routed or not.", registry=registry)
        self.audio_tokens_seen = Counter(
            "headrouter_audio_tokens_seen", "Audio tokens in the prompts of finished requests.", registry=registry)
        self.audio_tokens_kept = Counter(
            "headrouter_audio_tokens_kept", "Audio tokens of finished requests kept in the KV cache after routing "
            "(all of them for requests not routed).", registry=registry)
        self.kv_blocks_freed = Counter(
            "headrouter_kv_blocks_freed", "KV-cache blocks given back to the pool by routing, right after the "
            "prompt step.", registry=registry)
        self.routed_requests = Counter(
            "headrouter_routed_requests", "Finished routed requests (audio pruned), by task and selection policy.",
            ["task", "policy"], registry=registry)
        self.probe_seconds = Histogram(
            "headrouter_probe_seconds", "Time per routed request in the probe, selection and KV compaction "
            "(summed over re-prefills after preemption).", buckets=PROBE_SECONDS_BUCKETS, registry=registry)

    def observe(self, report: Mapping[str, Any]) -> None:
        """Count one finished request's report."""
        audio = int(report.get("audio_tokens") or 0)
        if audio <= 0:
            return  # no audio: ran as vanilla vLLM, nothing to count
        self.audio_requests.inc()
        self.audio_tokens_seen.inc(audio)
        self.audio_tokens_kept.inc(int(report.get("kept_audio_tokens", audio)))
        self.kv_blocks_freed.inc(int(report.get("kv_blocks_freed") or 0))
        task = report.get("task")
        if task is None:
            return  # audio kept whole (retention 1.0, or nothing to drop)
        self.routed_requests.labels(task=str(task), policy=str(report.get("policy"))).inc()
        seconds = report.get("probe_seconds")
        if seconds is not None:  # None: the engine could not time it (model runner in another process)
            self.probe_seconds.observe(float(seconds))


def report_of(output) -> Mapping[str, Any] | None:
    """The HeadRouter report an ``EngineCoreOutput`` carries, if any (only a finished request's final one)."""
    params = output.kv_transfer_params
    if params is None or output.finish_reason is None or not isinstance(params, dict):
        return None
    report = params.get(REPORT_KEY)
    return report if isinstance(report, Mapping) else None


def observe_outputs(outputs: Iterable, sink: HeadRouterMetrics | None = None) -> int:
    """Count the reports in a batch of ``EngineCoreOutput``; returns how many there were."""
    n = 0
    for output in outputs:
        report = report_of(output)
        if report is not None:
            (sink or metrics()).observe(report)
            n += 1
    return n


_metrics: HeadRouterMetrics | None = None
_lock = threading.Lock()


def metrics() -> HeadRouterMetrics:
    """This process's metrics, registered in the default registry on first use (once: a second registration of
    the same names would raise)."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = HeadRouterMetrics()
        return _metrics
