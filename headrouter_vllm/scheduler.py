"""HeadRouterScheduler: vLLM's scheduler, plus the block side of "compact and shorten".

The scheduler never sees which audio tokens are kept, only how many are removed (known from the plan at
admission). After the step that finishes a routed request's prompt, the request's KV is ``removed`` slots
shorter: block accounting subtracts that, and its surplus tail blocks go back to the pool as soon as that
step's output is in, so admission sees them at once.
"""

from __future__ import annotations

import collections
import dataclasses

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
from vllm.v1.request import Request, RequestStatus

from headrouter_vllm.config import HeadRouterConfig
from headrouter_vllm.log import get_logger
from headrouter_vllm.models import adapter_for, audio_spans
from headrouter_vllm.names import REPORT_KEY
from headrouter_vllm.options import parse_route_options
from headrouter_vllm.patch.kv_cache_coordinator import wrap_block_accounting
from headrouter_vllm.plan import RoutePlan, cdiv, chunk_budget, make_plan
from headrouter_vllm.routing.context import routing_context

logger = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class RouteRecord:
    """What was done to one routed request (kept for tests, the demo and logs)."""

    request_id: str
    task: str
    retention: float
    audio_tokens: int
    kept_tokens: int
    blocks_before: int
    blocks_after: int

    @property
    def blocks_freed(self) -> int:
        return self.blocks_before - self.blocks_after


class HeadRouterScheduler(Scheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hr_config = HeadRouterConfig.required_from_vllm_config(self.vllm_config, "scheduler")
        routing_context(self.hr_config)  # reads the profile file once: its tasks become valid request tasks here
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            logger.warning("HeadRouter on a GPU: its GPU worker and runner have not run on a CUDA machine in this "
                           "project's CI yet (their logic is tested on CPU with the Triton kernels interpreted; "
                           "see docs/gpu.md). Check outputs against vanilla vLLM (scripts/gpu_engine_check.py) "
                           "before relying on them.")
        adapter_for(self.vllm_config.model_config.hf_config)  # unsupported model -> clear error at startup
        self.hr_plans: dict[str, RoutePlan] = {}
        # request id -> KV slots removed; set at schedule time of the step that finishes the prompt
        self.hr_removed: dict[str, int] = {}
        # request id -> KV slots kept, for the tail free after that step's output is in
        self._hr_tail_free: dict[str, int] = {}
        self.hr_records: collections.deque[RouteRecord] = collections.deque(maxlen=4096)
        # per-request report, returned with the request's final output (``kv_transfer_params["headrouter"]``,
        # which the HTTP middleware moves into ``usage.headrouter`` and the front end counts: metrics.py)
        self._hr_usage: dict[str, dict] = {}
        self._hr_finished_usage: dict[str, tuple[int, dict]] = {}  # request id -> (client index, report)
        self._hr_routed: set[str] = set()  # requests whose compaction step was scheduled (kept across preemption)
        wrap_block_accounting(self.kv_cache_manager.coordinator, self.hr_removed, self._hr_cacheable_tokens)
        logger.info("HeadRouter on: %s", self.hr_config)

    # ---- admission ------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        plan = self._plan_of(request)
        super().add_request(request)
        if plan is not None:
            self.hr_plans[request.request_id] = plan
        audio = sum(n for _, n in audio_spans(request.mm_features))
        self._hr_usage[request.request_id] = {
            "audio_tokens": audio, "kept_audio_tokens": audio if plan is None else plan.kept_tokens,
            "kv_blocks_freed": 0, "task": None if plan is None else plan.task,
            "policy": None if plan is None else plan.policy, "retention": 1.0 if plan is None else plan.retention,
            "semantics": None if plan is None else plan.semantics,
            "probe_seconds": 0.0 if plan is None else None}  # routed: set when the model runner reports it

    def _plan_of(self, request: Request) -> RoutePlan | None:
        if request.sampling_params is None:
            return None
        options = parse_route_options(request.sampling_params.extra_args)
        plan = make_plan(options, self.hr_config, audio_spans(request.mm_features), request.num_prompt_tokens,
                         chunk_budget(self.scheduler_config), request.sampling_params.prompt_logprobs is not None)
        if plan is not None and plan.semantics_note is not None:
            logger.warning("headrouter request_id=%s: %s", request.request_id, plan.semantics_note)
        return plan

    def _hr_cacheable_tokens(self, request_id: str) -> int | None:
        """The prompt tokens a routed request's prefix-cache hits and cached blocks may cover: the whole blocks
        before its first audio token (compaction rewrites the rest); None for a request that is not routed."""
        plan = self.hr_plans.get(request_id)
        if plan is None:
            return None
        # the KV manager's block size: the unit of its hits (truncate_computed_blocks) and of cached blocks
        block_size = self.kv_cache_manager.coordinator.single_type_managers[0].block_size
        return plan.spans[0].start // block_size * block_size

    def _get_local_prefix_cache_hit(self, request: Request):
        """vLLM's prefix-cache hit, cut for a routed request at its first audio block.

        A routed request computes its audio itself (the probe reads it, and compaction rewrites those blocks in
        place: a block shared with another request must never be rewritten), so it reuses only the whole blocks
        before its first audio token. A follow-up turn over the same clip is therefore prefilled and routed again,
        for its own question: exact, at the cost of that turn's audio prefill (README, "What is cached"). Requests
        that are not routed hit exactly as in vanilla."""
        blocks, num_local, shared_prefix_boundary, hit_diverged = super()._get_local_prefix_cache_hit(request)
        cap = self._hr_cacheable_tokens(request.request_id)
        if cap is None or num_local <= cap:
            return blocks, num_local, shared_prefix_boundary, hit_diverged
        blocks = self.kv_cache_manager.truncate_computed_blocks(blocks, cap)
        return blocks, cap, min(shared_prefix_boundary, cap), hit_diverged

    def _reserve_prefill_lookahead(self, request: Request, num_computed_tokens: int, num_new_tokens: int) -> int:
        """Where a routed request's prefill chunk may end.

        * A request re-prefilled after preemption (prompt and generated tokens recomputed) stops its chunk where
          its probe rows end (the prompt's end; one token later for ``first_token``; at both for ``routed``,
          whose first token's row is probed apart from the prompt rows), so it is probed and compacted there,
          and its later tokens are recomputed over the kept audio only, as they first were.
          Otherwise they would attend to all the audio and drift.
        * ``in_prompt``: every prompt row after the audio must be in one chunk (they are re-attended with only the
          kept audio in the same forward that picks it), so a chunk may not end inside them.
        * ``prefill``: the same from the first audio token on (above the probe layer that forward drops the rows
          of the audio it does not keep, so they must all be in it).
        """
        num_new_tokens = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        if request.status != RequestStatus.RUNNING and not self._room_to_grow(request):
            return 0  # not admitted this step (vLLM stops admitting at the first request that does not fit)
        plan = self.hr_plans.get(request.request_id)
        if plan is None or request.request_id in self.hr_removed:
            return num_new_tokens
        end = num_computed_tokens + num_new_tokens
        if plan.probe_point == "routed" and num_computed_tokens < plan.num_prompt_tokens < end:
            num_new_tokens = plan.num_prompt_tokens - num_computed_tokens  # the first token's row probes alone
        elif num_computed_tokens < plan.probe_end < end:
            num_new_tokens = plan.probe_end - num_computed_tokens
        elif plan.one_step_start is not None and plan.one_step_start < end < plan.num_prompt_tokens:
            num_new_tokens = max(0, plan.one_step_start - num_computed_tokens)
        return num_new_tokens

    def _room_to_grow(self, request: Request) -> bool:
        """Growth-aware admission (``headrouter.admission_headroom`` tokens; 0: vLLM's rule, admit what fits).

        A waiting request is admitted only if the pool holds its whole prompt and still has the blocks every
        running request needs to grow by ``admission_headroom`` more tokens (or to its end, if nearer), the new
        one included. A routed request counts at its length after compaction, but at its whole prompt until then
        (when that is more); blocks a compaction has yet to give back count as free. vLLM admits on the prompt
        alone; then the decoders' growth finds the pool full and preempts, and a preempted request prefills again.
        Pruning makes that likelier: more, shorter requests share the pool, and together they take more new blocks
        per step. With nothing running, a request is always admitted."""
        headroom = self.hr_config.admission_headroom
        if headroom <= 0 or not self.running:
            return True
        block_size = self.kv_cache_manager.coordinator.single_type_managers[0].block_size
        reserve = sum(self._blocks_to_grow(r, headroom, block_size) - self.num_blocks_of(r.request_id)
                      for r in self.running)
        needed = self._blocks_to_grow(request, headroom, block_size)
        return self.kv_cache_manager.block_pool.get_num_free_blocks() - needed >= reserve

    def _blocks_to_grow(self, request: Request, headroom: int, block_size: int) -> int:
        """The most blocks ``request`` holds from now until it has grown ``headroom`` tokens (or reached its end):
        its tokens so far (the whole prompt, from the step that admits it) less what its route removes, plus the
        growth; a routed request not compacted yet first holds its whole prompt."""
        plan = self.hr_plans.get(request.request_id)
        grown = cdiv(request.num_tokens - (0 if plan is None else plan.removed)
                     + min(headroom, request.max_tokens - request.num_output_tokens), block_size)
        if plan is not None and request.request_id not in self.hr_removed:
            return max(cdiv(request.num_tokens, block_size), grown)
        return grown

    # ---- shortening -----------------------------------------------------------------------------
    def _update_after_schedule(self, scheduler_output) -> None:
        super()._update_after_schedule(scheduler_output)  # advances num_computed_tokens
        # Marked at schedule time, so it stays right under async scheduling: from the next step on, this
        # request's KV is shorter (the worker compacts right after this step's forward).
        for req_id in scheduler_output.num_scheduled_tokens:
            plan = self.hr_plans.get(req_id)
            if plan is None or req_id in self.hr_removed:
                continue
            request = self.requests[req_id]
            if request.num_computed_tokens >= plan.probe_end:
                self.hr_removed[req_id] = plan.removed
                self._hr_routed.add(req_id)
                self._hr_tail_free[req_id] = request.num_computed_tokens - plan.removed

    def update_from_output(self, scheduler_output, model_runner_output):
        # before super(), which frees the requests that finish in this step
        for req_id, seconds in (getattr(model_runner_output, "headrouter_probe_seconds", None) or {}).items():
            usage = self._hr_usage.get(req_id)
            if usage is not None:  # None: aborted while this step ran
                usage["probe_seconds"] = (usage["probe_seconds"] or 0.0) + seconds  # adds up re-prefills
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for req_id in [r for r in self._hr_tail_free if r in scheduler_output.num_scheduled_tokens]:
            keep_tokens = self._hr_tail_free.pop(req_id)
            request = self.requests.get(req_id)
            if request is not None and request.status == RequestStatus.RUNNING:
                self._free_tail(request, keep_tokens)
        for engine_outputs in outputs.values():
            for out in engine_outputs.outputs:
                _, usage = self._hr_finished_usage.pop(out.request_id, (None, None))
                if usage is not None and out.finish_reason is not None and out.kv_transfer_params is None:
                    out.kv_transfer_params = {REPORT_KEY: usage}
        # Requests aborted since the last step (a client gone, or a stop string: vLLM matches those in the front
        # end and aborts the request here) get no output from vLLM. Their report goes out on an output of its
        # own, so the front end's metrics count them; vLLM's output processor skips outputs of requests it no
        # longer tracks. A server's engine loop runs one more step after an abort (freed requests are
        # "finished" work), this one; the offline LLM steps only inside generate(), so there the report goes
        # out with the next call's first step.
        for req_id, (client, usage) in self._hr_finished_usage.items():
            batch = outputs.get(client)
            if batch is None:
                batch = outputs[client] = EngineCoreOutputs()
            batch.outputs.append(EngineCoreOutput(request_id=req_id, new_token_ids=[], finish_reason=FinishReason.ABORT,
                                                  kv_transfer_params={REPORT_KEY: {**usage, "aborted": True}}))
        self._hr_finished_usage.clear()
        return outputs

    def _free_tail(self, request: Request, keep_tokens: int) -> None:
        before = after = 0
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            blocks = manager.req_to_blocks.get(request.request_id)
            if not blocks:
                continue
            keep = cdiv(keep_tokens, manager.block_size)
            tail = blocks[keep:]
            before, after = len(blocks), keep
            del blocks[keep:]
            manager.block_pool.free_blocks(reversed(tail))
        plan = self.hr_plans[request.request_id]
        record = RouteRecord(request.request_id, plan.task, plan.retention, plan.audio_tokens, plan.kept_tokens,
                             before, after)
        self.hr_records.append(record)
        if request.request_id in self._hr_usage:
            self._hr_usage[request.request_id]["kv_blocks_freed"] = record.blocks_freed
        logger.info("headrouter routed request_id=%s task=%s retention=%.3f audio_tokens=%d kept_tokens=%d "
                    "blocks_before=%d blocks_after=%d", record.request_id, record.task, record.retention,
                    record.audio_tokens, record.kept_tokens, record.blocks_before, record.blocks_after)

    def _forget(self, request_id: str) -> None:
        self.hr_removed.pop(request_id, None)
        self._hr_tail_free.pop(request_id, None)

    def _preempt_request(self, request: Request, *args, **kwargs):
        # Recompute preemption frees every block; the request is re-prefilled at full length and compacted again.
        self._forget(request.request_id)
        return super()._preempt_request(request, *args, **kwargs)

    def _free_request(self, request: Request, *args, **kwargs):
        out = super()._free_request(request, *args, **kwargs)
        routed = request.request_id in self._hr_routed
        self._hr_routed.discard(request.request_id)
        self._forget(request.request_id)
        self.hr_plans.pop(request.request_id, None)
        usage = self._hr_usage.pop(request.request_id, None)
        if usage is not None:
            if usage["task"] is not None and not routed:  # aborted before its probe step: nothing was pruned
                usage.update(kept_audio_tokens=usage["audio_tokens"], task=None, policy=None, retention=1.0,
                             semantics=None, probe_seconds=0.0, kv_blocks_freed=0)
            if usage["probe_seconds"] is not None:
                usage["probe_seconds"] = round(usage["probe_seconds"], 6)
            self._hr_finished_usage[request.request_id] = (request.client_index, usage)
        return out

    # ---- introspection (tests, demo) -------------------------------------------------------------
    def num_blocks_of(self, request_id: str) -> int:
        return sum(len(m.req_to_blocks.get(request_id, ()))
                   for m in self.kv_cache_manager.coordinator.single_type_managers)
