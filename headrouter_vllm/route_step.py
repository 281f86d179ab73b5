"""One engine step's routed requests: probe -> select -> compact, with no vLLM glue (that is ``runner.py``).

Per routed request (its plan computed from the same inputs as the scheduler's):

1. In every step that holds prompt rows after the audio, the probe layer's attention (the wrapped ``impl.forward``
   calls :meth:`RouteStep.probe`) adds those rows' per-head attention mass on each audio key to an accumulator
   (chunked prefill: rows may straddle chunks; causality makes the sum exact).
2. In the step that finishes the prompt the kept audio tokens are selected. With ``in_prompt`` semantics (or the
   ``first_token`` and ``routed`` probe points, which select in the first decode step) the probe rows are then
   recomputed in every later layer with only the kept audio visible (:meth:`RouteStep.attend_kept_only`).
3. After that step's forward, every layer's KV is compacted (:meth:`RouteStep.compact`): kept audio and everything
   after the audio move down to close the gaps.

Where the KV lives and how it is read and moved is the engine's :class:`~headrouter_vllm.attention.kv_store.KvStore`.

Tensor parallelism: each rank probes its own query heads. Before selecting, the ranks all-gather the per-head probe
scores (and, for ``similarity``, the values), a few hundred KB per routed request, so every rank selects from all
heads exactly as one rank would, and gets the same kept set; in ``per_head`` mode each rank then compacts its own
KV heads' share.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator

import torch

from headrouter_vllm.attention.kv_store import Compaction, KvStore, audio_columns
from headrouter_vllm.config import HeadRouterConfig
from headrouter_vllm.plan import focus_tokens
from headrouter_vllm.route_state import ProbeItem, ProbeLog
from headrouter_vllm.routing.policies import RouteSettings, SpanProbe, select
from headrouter_vllm.routing.policies import policy as policy_named


@dataclasses.dataclass
class RouteContext:
    """What every step needs from the engine; fixed when the runner installs its hooks."""

    config: HeadRouterConfig
    adapter: object  # the model family's adapter (models/)
    profiles: object | None  # the profile file's ProfileSet
    store: KvStore
    num_kv_heads: int  # this rank's KV heads
    kv_heads: slice  # this rank's share of the model's KV heads
    tp_size: int
    gather_heads: Callable[[torch.Tensor | None, int], torch.Tensor | None]  # tensor parallel: every rank's heads
    upper_layers: frozenset[str]  # attention layers above the probe layer
    poison: float | None = None  # tests: fill vacated KV slots with this value after compaction
    prefill: object | None = None  # PrefillShortener, with semantics "prefill"


@dataclasses.dataclass
class LayerCaches:
    """One KV cache group's layers, for compaction: the request's blocks and every distinct layer cache."""

    block_size: int
    table: torch.Tensor  # the request's block ids in this group (int64)
    layers: list[tuple[str, object, torch.Tensor]]  # (layer name, layer, kv cache)


class RouteStep:
    """The routed requests of one engine step (empty in most steps)."""

    def __init__(self, items: list[ProbeItem], context: RouteContext | None):
        self.items = items
        self.context = context

    def __iter__(self) -> Iterator[ProbeItem]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def runs_python_in_the_model(self) -> bool:
        """The probe (and, in the selecting step, the kept-only attention above it) must run inside the forward:
        this step cannot replay a full CUDA graph."""
        return bool(self.items)

    # ---- inside the forward ----------------------------------------------------------------------
    @torch.inference_mode()
    def probe(self, layer, query, key, value, kv_cache, attn_metadata) -> None:
        """The probe layer, before its attention kernel: accumulate each request's mass; select on its final step."""
        if attn_metadata is None or not self.items:
            return
        store = self.context.store
        for item, measured in zip(self.items, store.probe(layer, query, key, value, kv_cache, self.items),
                                  strict=True):
            route = item.state
            plan = route.plan
            prompt_scores = None
            if item.final and plan.probe_point == "routed":
                # the prompt rows' mass (earlier steps) and the first token's row stay apart: the router picks which
                # of them selects. The scheduler ends a chunk at the prompt's end, also when a preempted request is
                # re-prefilled, so this step holds that row alone
                if item.computed != plan.num_prompt_tokens or route.head_mass is None:
                    raise RuntimeError(f"HeadRouter: request {item.req_id} reached its first token's row without "
                                       "its prompt rows' probe mass")
                prompt_scores = route.head_mass / (plan.num_prompt_tokens - plan.probe_start)
                route.head_mass, rows = measured.mass, 1
            else:
                route.head_mass = measured.mass if route.head_mass is None else route.head_mass + measured.mass
                rows = plan.probe_rows[1] - plan.probe_rows[0]
            route.seconds += measured.seconds
            if item.final:
                t0 = time.perf_counter()
                values = None
                if policy_named(plan.policy).needs_values:
                    values = store.values_at(layer, item, value, kv_cache, audio_columns(plan)).cpu()
                self.select(item, route.head_mass / rows, measured.last_row, values, kv_cache.shape[1],
                            measured.seconds + time.perf_counter() - t0, prompt_scores)
                route.seconds += time.perf_counter() - t0

    def select(self, item: ProbeItem, head_scores, last_row, values, num_kv_heads: int, probe_s: float,
               prompt_scores=None) -> None:
        """``prompt_scores``: probe point ``routed``, the prompt rows' scores beside ``head_scores`` (the first
        token's row)."""
        context, plan = self.context, item.state.plan
        if context.tp_size > 1:  # every rank calls this for the same requests in the same order
            head_scores, last_row = context.gather_heads(head_scores, 0), context.gather_heads(last_row, 0)
            values = context.gather_heads(values, 1)  # [N, Hkv, d]
            prompt_scores = context.gather_heads(prompt_scores, 0)
            num_kv_heads *= context.tp_size
        kept, per_head, margins, alphas, probes, offset = [], [], [], [], [], 0
        focus = focus_tokens(plan.focus, context.adapter.audio_tokens_per_second)  # each clip's own windows
        for sp in plan.spans:
            settings = RouteSettings(policy=plan.policy, mode=plan.mode, task=plan.task, seed=context.config.seed,
                                     b_max=sp.head_cap, kv_shards=context.tp_size, focus=focus,
                                     probe_point=plan.probe_point)
            cols = slice(offset, offset + sp.length)
            probe = SpanProbe(head_scores[:, cols], last_row[:, cols], num_kv_heads,
                              None if values is None else values[cols],
                              None if prompt_scores is None else prompt_scores[:, cols])
            selection = select(probe, sp.keep, settings, context.profiles)
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
            item.state.kept_per_head = all_heads[context.kv_heads]
        known = [m for m in margins if m is not None]
        item.log = ProbeLog(item.req_id, item.state.kept.tolist(), min(known) if known else None, probe_s,
                            alpha=alphas, probes=probes if context.config.record_probes else None,
                            kept_per_head=None if all_heads is None else [k.tolist() for k in all_heads])

    @torch.inference_mode()
    def attend_kept_only(self, layer, query, key, value, kv_cache, attn_metadata, output) -> None:
        """Above the probe layer, in the step that selects, recompute the probe rows with the dropped audio keys
        masked: the prompt rows after the audio (``in_prompt``) or the first generated token's row
        (``first_token`` and ``routed``)."""
        if attn_metadata is None:
            return
        for item in self.items:
            plan = item.state.plan
            if not item.final or (plan.semantics != "in_prompt" and not plan.selects_at_first_token):
                continue
            t0 = time.perf_counter()
            kept = item.state.kept
            first = plan.num_prompt_tokens
            rows_start, length = (first, first + 1) if plan.selects_at_first_token else plan.probe_rows
            assert item.computed <= rows_start, "probe rows split across chunks"
            positions = torch.arange(rows_start, length)
            rows = item.token_start + positions - item.computed
            if self.context.prefill is not None:  # this layer may run the batch without another's dropped rows
                rows = self.context.prefill.translate(rows)
            q = query[rows].float()
            k, v = self.context.store.keys(layer, item, key, value, kv_cache, upto=length, values=True)
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

    # ---- after the forward ------------------------------------------------------------------------
    @torch.inference_mode()
    def compact(self, item: ProbeItem, groups: list[LayerCaches], device) -> Compaction:
        """Move the request's kept audio and everything after its audio down, in every layer's cache."""
        context, plan = self.context, item.state.plan
        if item.state.kept is None:
            raise RuntimeError(f"HeadRouter: the probe did not run for request {item.req_id}")
        compaction = context.store.compaction(item.state, item.computed + item.num_tokens, context.num_kv_heads,
                                              device)
        for group in groups:
            for name, layer, kv_cache in group.layers:
                if kv_cache.shape[2] != group.block_size:
                    raise RuntimeError("HeadRouter needs the kernel block size to equal the scheduler block size")
                # prefill semantics: the layers above the probe layer wrote the compacted layout already
                if not (plan.semantics == "prefill" and name in context.upper_layers):
                    compaction.apply(layer, kv_cache, group.table)
                if context.poison is not None:  # tests: vacated slots, incl. the blocks about to be freed
                    compaction.poison(layer, kv_cache, group.table, context.poison)
        return compaction
