"""Drive one in-process vLLM engine through a workload and measure it.

The engine is stepped by hand (``LLMEngine.add_request`` / ``step``) so every request's arrival, first token and
finish are timed here, and the scheduler is read after every step: requests running at once, KV blocks held,
preemptions. Vanilla and HeadRouter engines run the same requests one after the other in one process, with vLLM's
prefix caching as deployed (on, its default) unless told otherwise. A later turn of a conversation is added when its
previous turn finishes, with the answer that engine gave.
"""

from __future__ import annotations

import bisect
import dataclasses
import gc
import os
import time

import numpy as np

from headrouter_vllm.benchmarks.serving.workload import SAMPLE_RATE, BenchRequest, chat_prompt
from headrouter_vllm.demo import audio_prompt


@dataclasses.dataclass
class RequestResult:
    index: int
    prompt_tokens: int
    output_tokens: int
    arrival: float
    first_token: float
    finish: float
    peak_blocks: int
    audio_tokens: int | None = None
    kept_tokens: int | None = None
    turn: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float:
        return (self.finish - self.first_token) / max(1, self.output_tokens - 1)

    @property
    def latency(self) -> float:
        return self.finish - self.arrival


@dataclasses.dataclass
class StepProfile:
    """Where a run's wall time went: admitting requests (``add_request``: vLLM's input processing, the audio
    feature extraction included), engine steps that ran the audio encoder or prompt rows (prefill), and steps
    that only decoded. Decode-only steps also record their batch size, to show how step time grows with it."""

    input_s: float = 0.0
    prefill_s: float = 0.0
    prefill_steps: int = 0
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_rows: int = 0  # sum of the decode-only steps' batch sizes
    decoding_max: int = 0  # the most requests past their prompt (holding their whole KV) after any step
    decoding_time: float = 0.0  # sum over steps of (requests past their prompt) x (step seconds)

    def add_step(self, seconds: float, scheduled, decoding: int) -> None:
        """One engine step: its seconds, vLLM's scheduler output (None or empty: nothing ran, and the step counts
        nowhere, so the mean below has the same time base as its numerator) and the requests past their prompt."""
        rows = 0 if scheduled is None else len(scheduled.num_scheduled_tokens)
        if not rows:
            return
        self.decoding_max = max(self.decoding_max, decoding)
        self.decoding_time += decoding * seconds
        if scheduled.scheduled_encoder_inputs or scheduled.total_num_scheduled_tokens > rows:
            self.prefill_s += seconds
            self.prefill_steps += 1
        else:
            self.decode_s += seconds
            self.decode_steps += 1
            self.decode_rows += rows

    @property
    def decoding_mean(self) -> float:
        """Requests past their prompt, averaged over the time of the steps that ran."""
        busy = self.prefill_s + self.decode_s
        return self.decoding_time / busy if busy else 0.0


@dataclasses.dataclass
class RunResult:
    label: str
    retention: float | None  # None: vanilla vLLM
    requests: list[RequestResult]
    duration: float
    max_running: int
    preemptions: int
    pool_blocks: int
    block_size: int
    probe_ms: list[float] = dataclasses.field(default_factory=list)
    semantics: str | None = None  # HeadRouter runs: the engine's semantics
    mode: str | None = None  # HeadRouter runs: shared or per_head
    policy: str | None = None  # HeadRouter runs: the selection policy its requests ran (the engine's default if unset)
    compact_ms: list[float] = dataclasses.field(default_factory=list)
    profile: StepProfile = dataclasses.field(default_factory=StepProfile)
    encoder_window: bool = False  # Qwen2-Audio's encoder ran on the real audio only (Omni's always does)
    prefix_caching: bool = True


def run_engine(model: str, workload: list[BenchRequest], retention: float | None, engine_kwargs: dict,
               policy: str | None = None, progress=None, semantics: str = "after_prompt",
               admission_headroom: int = 0, encoder_window: bool | None = None,
               prefix_caching: bool = True, mode: str = "shared") -> RunResult:
    """``encoder_window``: Qwen2-Audio's encoder on the real audio only (vanilla: ``True`` turns it on with
    ``additional_config.headrouter_encoder_window``; HeadRouter: ``headrouter.encoder_window``, ``None``: its
    default). ``prefix_caching``: vLLM's switch, for either engine (on: vLLM's default, as deployed). ``mode``:
    HeadRouter's ``shared`` or ``per_head`` (each KV head its own kept audio, on HeadRouter's backend)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    from headrouter_vllm import inprocess
    from headrouter_vllm.config import HeadRouterConfig
    from headrouter_vllm.models import adapter_for_model_dir
    from headrouter_vllm.options import route_args

    adapter = adapter_for_model_dir(model)
    extra = {}
    if retention is not None:
        extra["additional_config"] = {"headrouter": {"retention": 1.0, "policy": policy, "semantics": semantics,
                                                     "admission_headroom": admission_headroom, "mode": mode}}
        if encoder_window is not None:
            extra["additional_config"]["headrouter"]["encoder_window"] = encoder_window
    elif encoder_window:
        extra["additional_config"] = {"headrouter_encoder_window": True}
    llm = LLM(model=model, seed=0, enable_prefix_caching=prefix_caching, limit_mm_per_prompt=adapter.mm_limits(),
              **engine_kwargs, **extra)
    engine = llm.llm_engine
    scheduler = inprocess.scheduler(llm)
    block_manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    pool_blocks = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    preemptions = [0]
    original_preempt = scheduler._preempt_request

    def counting_preempt(request, *args, **kwargs):
        preemptions[0] += 1
        return original_preempt(request, *args, **kwargs)

    scheduler._preempt_request = counting_preempt
    last_scheduled = [None]
    original_schedule = scheduler.schedule

    def recording_schedule(*args, **kwargs):
        last_scheduled[0] = out = original_schedule(*args, **kwargs)
        return out

    scheduler.schedule = recording_schedule
    label = "vanilla" if retention is None else f"headrouter r={retention:g}"
    if retention is not None and semantics != "after_prompt":
        label += f" {semantics}"
    if retention is not None and mode != "shared":
        label += f" {mode}"
    if encoder_window is not None and (retention is None or not encoder_window):
        label += " encoder window" if encoder_window else " no encoder window"  # apart from the engine's default

    def params(r: BenchRequest):
        args = None if retention is None else route_args(task=r.task, retention=retention)
        return SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True, extra_args=args)

    # warm up (first-request costs are not part of the measurement)
    engine.add_request("warmup", {"prompt": audio_prompt("hi", adapter.family), "multi_modal_data": {
        "audio": (np.zeros(SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)}}, params(workload[0]))
    while engine.has_unfinished_requests():
        engine.step()

    pending = sorted((r for r in workload if not r.history), key=lambda r: r.arrival_s)
    next_turn = {r.history[-1]: r for r in workload if r.history}  # a later turn waits for the one before it
    questions = {r.index: r.question for r in workload}
    answers: dict[int, str] = {}
    results: dict[str, RequestResult] = {}
    max_running = 0
    profile = StepProfile()
    start = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - start
        while pending and pending[0].arrival_s <= now:
            r = pending.pop(0)
            rid = f"req{r.index}"
            t_add = time.perf_counter()
            engine.add_request(rid, {"prompt": chat_prompt(r, adapter.family, questions, answers),
                                     "multi_modal_data": {"audio": (r.wave, SAMPLE_RATE)}}, params(r))
            profile.input_s += time.perf_counter() - t_add
            results[rid] = RequestResult(r.index, 0, 0, start + max(r.arrival_s, now), 0.0, 0.0, 0, turn=r.turn)
        if not engine.has_unfinished_requests():
            time.sleep(min(0.01, max(0.0, pending[0].arrival_s - now)))
            continue
        last_scheduled[0], t_step = None, time.perf_counter()
        outputs = engine.step()
        t = time.perf_counter()
        max_running = max(max_running, len(scheduler.running))
        # vLLM's running list also holds requests part-way through a chunked prompt; the requests past their
        # prompt are the ones whose whole KV the pool holds
        decoding = sum(1 for request in scheduler.running if request.num_output_tokens)
        profile.add_step(t - t_step, last_scheduled[0], decoding)
        for rid, blocks in block_manager.req_to_blocks.items():
            key = rid.split("-")[0]
            if key in results:
                results[key].peak_blocks = max(results[key].peak_blocks, len(blocks))
        for out in outputs:
            res = results.get(out.request_id.split("-")[0])
            if res is None:
                continue
            n = len(out.outputs[0].token_ids)
            if n and not res.first_token:
                res.first_token = t
            if out.finished:
                res.finish, res.output_tokens, res.prompt_tokens = t, n, len(out.prompt_token_ids)
                res.cached_tokens = out.num_cached_tokens or 0
                answers[res.index] = out.outputs[0].text
                follow = next_turn.pop(res.index, None)
                if follow is not None:  # the client sends the next question as soon as it has the answer
                    follow = dataclasses.replace(follow, arrival_s=t - start)
                    bisect.insort(pending, follow, key=lambda r: r.arrival_s)
                if progress is not None:
                    progress.update(1)
    duration = time.perf_counter() - start
    run = RunResult(label, retention, [results[k] for k in sorted(results, key=lambda k: results[k].index)],
                    duration, max_running, preemptions[0], pool_blocks, block_manager.block_size,
                    semantics=None if retention is None else semantics, mode=None if retention is None else mode,
                    policy=None if retention is None else HeadRouterConfig(policy=policy, mode=mode).default_policy,
                    profile=profile,
                    encoder_window=encoder_window is True or (retention is not None and encoder_window is None),
                    prefix_caching=prefix_caching)
    if retention is not None:
        records = {rec.request_id.split("-")[0]: rec for rec in scheduler.hr_records}
        for key, res in results.items():
            rec = records.get(key)
            if rec is not None:
                res.audio_tokens, res.kept_tokens = rec.audio_tokens, rec.kept_tokens
        logs = list(inprocess.model_runner(llm).hr_log)[1:]  # the warm-up request first
        run.probe_ms = [log.probe_s * 1e3 for log in logs]
        run.compact_ms = [log.compact_s * 1e3 for log in logs]
    if inprocess.num_free_blocks(llm) != pool_blocks:
        raise RuntimeError(f"{label}: KV blocks leaked ({inprocess.num_free_blocks(llm)} free of {pool_blocks})")
    del scheduler, engine, llm
    gc.collect()
    return run
