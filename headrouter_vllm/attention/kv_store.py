"""Where a routed request's KV lives, and what HeadRouter does to it there: read, probe, compact.

The runner picks one store per engine from the cache layout of the attention backend that serves the decoder
layers (:data:`STORES`), so no runner method asks which backend it runs on:

* :class:`CpuAttnPages`: vLLM's CPU attention (CPU_ATTN). Its pages are packed per CPU ISA, so slots are read
  and moved in torch through the offsets the backend's own cache write reveals (``cpu_kv.py``).
* :class:`PagedKv`: vLLM 0.32's standard paged layout, a logical ``[num_blocks, Hkv, block_size, 2 * d]`` tensor
  per layer whose K and V halves are strided views (``split_kv_cache``). FLASH_ATTN, FLASHINFER and TRITON_ATTN
  allocate it, and so does HeadRouter's own backend (vLLM's CUSTOM slot). The probe and the compaction are
  HeadRouter's kernels: Triton on a GPU; on CPU the Triton interpreter or the kernels' torch references.

In every backend listed, this step's K and V are in the cache before the attention impl runs
(``forward_includes_kv_cache_update = False``), which is what the probe reads.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from typing import TYPE_CHECKING

import torch

from headrouter_vllm.attention.cpu_kv import CpuAttnLayer
from headrouter_vllm.attention.kernels import split_kv_cache
from headrouter_vllm.kernels.head_sparse_paged_attention.reference import gather_slots, region_cells
from headrouter_vllm.kernels.probe_scores import probe_scores
from headrouter_vllm.plan import RoutePlan, compaction_moves
from headrouter_vllm.route_state import ProbeItem, RouteState

if TYPE_CHECKING:
    from types import SimpleNamespace


# vLLM 0.32 backend name -> the store that reads its cache. Any other backend is refused at startup.
CPU_ATTN = "CPU_ATTN"
STANDARD_LAYOUT_BACKENDS = ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN", "CUSTOM")  # CUSTOM: HeadRouter's backend
STOCK_GPU_BACKENDS = ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN")


def audio_columns(plan: RoutePlan) -> torch.Tensor:
    """The absolute positions of every audio token of the plan's spans, ascending."""
    return torch.cat([torch.arange(sp.start, sp.end) for sp in plan.spans])


@dataclasses.dataclass
class ProbeMass:
    """What the probe layer's attention measured for one routed request in this step."""

    mass: torch.Tensor  # [Hq, audio tokens]: attention mass of this step's rows after the audio, summed over rows
    last_row: torch.Tensor | None  # [Hq, audio tokens]: the last prompt row's alone (final step only: FastV)
    seconds: float


class Compaction(abc.ABC):
    """One request's compaction, prepared once and applied to every layer's cache."""

    # per KV head: the region's surviving slots and its first cell, and the region's slots after compaction (per_head
    # requests' attention layout)
    counts: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    region_slots: int | None = None

    @abc.abstractmethod
    def apply(self, layer, kv_cache: torch.Tensor, table: torch.Tensor) -> None:
        """Close the gaps left by the dropped audio in this layer, in the request's blocks ``table``."""

    @abc.abstractmethod
    def poison(self, layer, kv_cache: torch.Tensor, table: torch.Tensor, value: float) -> None:
        """Tests only: fill every slot the request gave up (and stale per-head slots) with ``value``."""


class KvStore(abc.ABC):
    """Read, probe and compact one engine's KV caches (all layers share one layout)."""

    name: str

    def keys(self, layer, item: ProbeItem, key, value, kv_cache, upto: int,
             values: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """K (and V) ``[upto, Hkv, d]`` of prompt positions ``[0, upto)`` in this layer."""
        if item.computed == 0:  # the whole prompt is in this step
            rows = slice(item.token_start, item.token_start + upto)
            return key[rows], (value[rows] if values else None)
        # chunked prefill: earlier chunks' keys are in the pages (this step's were written before impl.forward)
        slots = torch.arange(upto)
        return (self.read(layer, kv_cache, item.block_ids, slots),
                self.read(layer, kv_cache, item.block_ids, slots, values=True) if values else None)

    def values_at(self, layer, item: ProbeItem, value, kv_cache, positions: torch.Tensor) -> torch.Tensor:
        """V ``[len(positions), Hkv, d]`` of prompt positions (this step's or earlier)."""
        if item.computed == 0:
            return value[item.token_start + positions]
        return self.read(layer, kv_cache, item.block_ids, positions, values=True)

    @abc.abstractmethod
    def read(self, layer, kv_cache, block_ids: torch.Tensor, slots: torch.Tensor,
             values: bool = False) -> torch.Tensor:
        """K (or V) of the given slots: ``[len(slots), Hkv, d]``."""

    @abc.abstractmethod
    def probe(self, layer, query, key, value, kv_cache, items: list[ProbeItem]) -> list[ProbeMass]:
        """The probe layer's attention mass on the audio keys for each routed request of this step."""

    @abc.abstractmethod
    def compaction(self, state: RouteState, computed: int, num_kv_heads: int, device) -> Compaction:
        """Prepare the compaction of a request with ``computed`` tokens of KV and its kept set selected."""


class CpuAttnPages(KvStore):
    """vLLM's CPU attention pages: probe and compaction in torch."""

    name = "cpu_attn_pages"

    @staticmethod
    def _layer(layer, kv_cache) -> CpuAttnLayer:
        return CpuAttnLayer(kv_cache, layer.isa, layer.impl.kv_cache_dtype)

    def read(self, layer, kv_cache, block_ids, slots, values=False):
        return self._layer(layer, kv_cache).read(block_ids, slots, values=values)

    def probe(self, layer, query, key, value, kv_cache, items):
        masses = []
        for item in items:
            t0 = time.perf_counter()
            plan = item.state.plan
            rows_start, rows_end = plan.probe_rows
            hi = min(item.computed + item.num_tokens, rows_end)
            positions = torch.arange(max(rows_start, item.computed), hi)
            q = query[item.token_start + positions - item.computed]
            k, _ = self.keys(layer, item, key, value, kv_cache, upto=hi)
            columns = audio_columns(plan)
            mass = probe_scores(q, k, positions, columns, layer.impl.scale)
            # the last prompt row is in the final step (FastV's signal)
            last_row = probe_scores(q[-1:], k, positions[-1:], columns, layer.impl.scale) if item.final else None
            masses.append(ProbeMass(mass, last_row, time.perf_counter() - t0))
        return masses

    def compaction(self, state, computed, num_kv_heads, device):
        return _CpuAttnCompaction(self, *compaction_moves(state.plan, state.kept, computed),
                                  torch.arange(computed - state.plan.removed, computed))


@dataclasses.dataclass
class _CpuAttnCompaction(Compaction):
    store: CpuAttnPages
    src: torch.Tensor
    dst: torch.Tensor
    vacated: torch.Tensor

    def apply(self, layer, kv_cache, table):
        if self.src.numel():
            self.store._layer(layer, kv_cache).move(table, self.src, self.dst)

    def poison(self, layer, kv_cache, table, value):
        self.store._layer(layer, kv_cache).fill(table, self.vacated, value)


class PagedKv(KvStore):
    """vLLM's standard paged layout: HeadRouter's probe and compaction kernels (``kernels``: Triton, interpreted
    Triton or the torch references, see ``attention/kernels.py``)."""

    name = "paged_kv"

    def __init__(self, kernels: SimpleNamespace):
        self.kernels = kernels

    def read(self, layer, kv_cache, block_ids, slots, values=False):
        key_cache, value_cache = split_kv_cache(kv_cache, layer.impl.head_size)
        return gather_slots(value_cache if values else key_cache, block_ids, slots)

    def probe(self, layer, query, key, value, kv_cache, items):
        """One ``paged_probe_scores`` kernel for every routed request in the step, over the keys in the paged cache
        (this step's included). Each request is one sequence with its rows after the audio in this step; requests
        finishing their prompt add one more with only their last row (FastV's signal). The kernel's span is the
        region from the first audio span to the end of the last."""
        t0 = time.perf_counter()
        key_cache, _ = split_kv_cache(kv_cache, layer.impl.head_size)
        rows, positions, regions, tables = [], [], [], []
        finals = [item for item in items if item.final]
        for index, item in enumerate([*items, *finals]):
            plan = item.state.plan
            rows_start, rows_end = plan.probe_rows
            hi = min(item.computed + item.num_tokens, rows_end)
            last_row_only = index >= len(items)
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
        mass = self.kernels.paged_probe_scores(query[row_index].contiguous(), cu_rows,
                                               torch.cat(positions).to(**int32), key_cache, block_table,
                                               span_start, span_len, layer.impl.scale,
                                               max_rows_per_seq=max(len(p) for p in positions)).cpu()
        seconds = (time.perf_counter() - t0) / len(items)
        out = []
        for index, item in enumerate(items):
            plan = item.state.plan
            columns = audio_columns(plan) - plan.spans[0].start
            last_row = mass[len(items) + finals.index(item)][:, columns] if item.final else None
            out.append(ProbeMass(mass[index][:, columns], last_row, seconds))
        return out

    def compaction(self, state, computed, num_kv_heads, device):
        return _PagedCompaction(self.kernels, state, computed, num_kv_heads, device)


def region_slots(state: RouteState, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``compact_kv``'s layout of the region from the first audio span to the end of the last: per KV head its
    surviving slots (its kept audio and the text between spans, ascending; the same for every head in shared mode) as
    kept slots ``[1, Hkv, W]`` (int32, -1 padded), their counts ``[Hkv]`` (int32), each head's first cell ``[Hkv]``
    (int32) and the region's slots after compaction.

    The region keeps the mean budget's slots, ``S = region length - removed``; its ``Hkv * S`` cells take the heads'
    surviving slots one head after another (per_head: a head that keeps more than S spills into the next head's
    column, phase B; shared: every head fills exactly its own column)."""
    plan = state.plan
    first, region_end = plan.spans[0].start, plan.probe_start
    region_slots_after = region_end - first - plan.removed
    between = torch.ones(region_end - first, dtype=torch.bool)
    for sp in plan.spans:
        between[sp.start - first:sp.end - first] = False
    text = torch.nonzero(between).flatten() + first
    heads = state.kept_per_head if state.kept_per_head is not None else [state.kept] * num_kv_heads
    surviving = [torch.cat([kept, text]).sort().values for kept in heads]
    counts = torch.tensor([slots.numel() for slots in surviving], dtype=torch.int32)
    if int(counts.sum()) > num_kv_heads * region_slots_after:
        raise RuntimeError(f"HeadRouter: the KV heads keep {int(counts.sum())} slots, more than the region's "
                           f"{num_kv_heads} x {region_slots_after} cells")
    kept_slots = torch.full((1, num_kv_heads, int(counts.max())), -1, dtype=torch.int32)
    for g, slots in enumerate(surviving):
        kept_slots[0, g, :slots.numel()] = slots
    offsets = (counts.cumsum(0) - counts).to(torch.int32)
    return kept_slots, counts, offsets, region_slots_after


class _PagedCompaction(Compaction):
    """``compact_kv`` with the region from the first audio span to the end of the last as its span, each KV head's
    surviving slots in it as its kept slots, packed from ``offsets`` into the region's mean-budget slots; the suffix
    moves to the region's start + its slots."""

    def __init__(self, kernels, state: RouteState, computed: int, num_kv_heads: int, device):
        plan = state.plan
        self.kernels, self.plan, self.computed = kernels, plan, computed
        kept_slots, self.counts, self.offsets, self.region_slots = region_slots(state, num_kv_heads)
        int32 = dict(dtype=torch.int32, device=device)
        first, region_len = plan.spans[0].start, plan.probe_start - plan.spans[0].start
        self.region_args = (torch.tensor([first], **int32), torch.tensor([region_len], **int32),
                            torch.tensor([computed], **int32), kept_slots.to(device))
        self.layout = dict(region_slots=torch.tensor([self.region_slots], **int32),
                           offsets=self.offsets[None].to(device))
        self.suffix_len = computed - plan.probe_start  # the question after the last audio span, moved down
        self.device = device
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None  # (the block list, its int32 device copy)

    def apply(self, layer, kv_cache, table):
        if self._table is None or self._table[0] is not table:  # one copy per KV cache group
            self._table = (table, table.to(dtype=torch.int32, device=self.device)[None])
        key_cache, value_cache = split_kv_cache(kv_cache, layer.impl.head_size)
        self.kernels.compact_kv(key_cache, value_cache, self._table[1], *self.region_args, **self.layout,
                                max_suffix_len=self.suffix_len)

    def poison(self, layer, kv_cache, table, value):
        plan, block_size = self.plan, kv_cache.shape[2]
        key_cache, value_cache = split_kv_cache(kv_cache, layer.impl.head_size)
        device = key_cache.device
        vacated = torch.arange(self.computed - plan.removed, self.computed)
        first, num_kv_heads, slots = plan.spans[0].start, key_cache.shape[2], self.region_slots
        unused = torch.ones(num_kv_heads * slots, dtype=torch.bool)  # region cells no head was given
        for offset, count in zip(self.offsets.tolist(), self.counts.tolist(), strict=True):
            unused[offset:offset + count] = False
        stale, columns = region_cells(torch.nonzero(unused).flatten(), first, slots)
        for cache in (key_cache, value_cache):
            cache[table[vacated // block_size].to(device), (vacated % block_size).to(device)] = value
            cache[table[stale // block_size].to(device), (stale % block_size).to(device), columns.to(device)] = value


def store_for(backend_name: str, kernels: SimpleNamespace | None) -> KvStore:
    """The store for the caches of the backend named ``backend_name`` (vLLM's ``get_name()``)."""
    if backend_name == CPU_ATTN:
        return CpuAttnPages()
    if backend_name in STANDARD_LAYOUT_BACKENDS:
        return PagedKv(kernels)
    raise ValueError(f"HeadRouter cannot read the KV cache of attention backend {backend_name}: it supports "
                     f"{(CPU_ATTN, *STANDARD_LAYOUT_BACKENDS)}")
