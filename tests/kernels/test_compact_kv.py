"""KV compaction: the Triton kernel against the torch gather-then-scatter reference (bit-exact: it only moves
data), on overlapping moves, in the skip layout (each head's kept slots at the front of its own column) and the
packed one (the heads' kept slots one after another, spilling across columns, in a region of the mean count); then
attention over the compacted cache against attention over the original one."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from headrouter_vllm.kernels.compact_kv import reference, triton
from headrouter_vllm.kernels.head_sparse_paged_attention import reference as attention
from headrouter_vllm.kernels.head_sparse_paged_attention import triton as attention_triton
from tests.kernels.conftest import DEVICE
from tests.kernels.paged import PagedCache

DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.float16, torch.bfloat16)]
TOLERANCES = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    total_len: tuple[int, ...]  # KV length per sequence before compaction
    span_start: tuple[int, ...]
    span_len: tuple[int, ...]
    counts: tuple[tuple[int, ...], ...]  # kept slots per (sequence, KV head)
    b_max: int  # W, the width of kept_slots
    choice: str = "random"  # which slots are kept: "random", "first" (maximal overlap) or "last"
    # "skip": region_slots and offsets omitted; "packed": offsets = running sum of the counts (exclusive);
    # "packed_reversed": the last head's cells first
    layout: str = "skip"
    region_slots: tuple[int, ...] | None = None  # packed: default ceil(sum of counts / Hkv), the mean count

    def region(self, s: int) -> tuple[int, list[int]]:
        """(region_slots, offsets) of sequence s."""
        counts = self.counts[s]
        if self.layout == "skip":
            return self.b_max, [g * self.b_max for g in range(len(counts))]
        slots = -(-sum(counts) // len(counts)) if self.region_slots is None else self.region_slots[s]
        order = range(len(counts)) if self.layout == "packed" else reversed(range(len(counts)))
        offsets, cell = [0] * len(counts), 0
        for g in order:
            offsets[g], cell = cell, cell + counts[g]
        return slots, offsets


CASES = {
    "random": Case((70, 40), (5, 17), (40, 20), ((0, 12, 5), (12, 3, 1)), b_max=12),
    # kept slots right at the span start: destinations equal sources or overlap the tile just read
    "overlap_first": Case((90,), (3,), (60,), ((20, 1, 0),), b_max=20, choice="first"),
    # kept slots at the span end: the longest moves, crossing several tiles and blocks
    "overlap_last": Case((100,), (13,), (70,), ((33, 0, 7),), b_max=33, choice="last"),
    "keep_all": Case((50,), (9,), (25,), ((25, 25, 25),), b_max=25),  # no move at all
    "keep_none": Case((50, 30), (9, 2), (25, 10), ((0, 0, 0), (0, 0, 0)), b_max=0),
    "one_audio_token": Case((20, 21), (4, 19), (1, 1), ((1, 0, 1), (0, 0, 1)), b_max=1),
    "no_suffix": Case((45,), (5,), (40,), ((3, 10, 7),), b_max=10),
    "span_mid_block_long_suffix": Case((150, 64), (13, 31), (30, 16), ((4, 9, 2), (8, 8, 1)), b_max=9),
    # packed: seq 0: head 0 keeps nothing, head 1 spills from column 0 into column 1 (region 6, 17 of 18 cells)
    "packed_random": Case((70, 40), (5, 17), (40, 20), ((0, 12, 5), (12, 3, 1)), b_max=12, layout="packed"),
    # 21 cells, the last head's ends at Hkv * region_slots; cells written over slots other heads read from
    "packed_overlap_first": Case((90,), (3,), (60,), ((20, 1, 0),), b_max=20, choice="first", layout="packed"),
    "packed_overlap_last": Case((100,), (13,), (70,), ((33, 0, 7),), b_max=33, choice="last", layout="packed"),
    "packed_mid_block_long_suffix": Case((150, 64), (13, 31), (30, 16), ((4, 9, 2), (8, 8, 1)), b_max=9,
                                         layout="packed"),
    "packed_reversed": Case((70, 40), (5, 17), (40, 20), ((10, 12, 5), (12, 3, 1)), b_max=12,
                            layout="packed_reversed"),
    # head 2's kept slots go to the same slots of column 0: a move to its own slot in another column is a move
    "packed_reversed_first": Case((70,), (5,), (40,), ((10, 12, 5),), b_max=12, choice="first",
                                  layout="packed_reversed"),
    # a region wider than the mean: trailing cells no head is given
    "packed_wide_region": Case((70,), (5,), (40,), ((12, 2, 7),), b_max=12, layout="packed", region_slots=(10,)),
    # every head keeps all: packed offsets are the skip layout's, every kept slot is already in place
    "packed_keep_all": Case((50,), (9,), (25,), ((25, 25, 25),), b_max=25, layout="packed"),
    "packed_keep_none": Case((50, 30), (9, 2), (25, 10), ((0, 0, 0), (0, 0, 0)), b_max=0, layout="packed"),
}


def make_inputs(case: Case, dtype: torch.dtype, block_size: int, head_size: int, num_kv_heads: int = 3):
    cache = PagedCache(list(case.total_len), block_size, num_kv_heads, head_size, dtype, DEVICE, seed=1)
    kept = torch.full((len(case.total_len), num_kv_heads, case.b_max), -1, dtype=torch.int32)
    for s, counts in enumerate(case.counts):
        for g, count in enumerate(counts):
            span = torch.arange(case.span_start[s], case.span_start[s] + case.span_len[s], dtype=torch.int32)
            if case.choice == "first":
                chosen = span[:count]
            elif case.choice == "last":
                chosen = span[span.numel() - count:]
            else:
                chosen = span[torch.randperm(span.numel(), generator=cache.generator)[:count]].sort().values
            kept[s, g, :count] = chosen
    as_int = {"dtype": torch.int32, "device": DEVICE}
    args = (cache.block_table, torch.tensor(case.span_start, **as_int), torch.tensor(case.span_len, **as_int),
            torch.tensor(case.total_len, **as_int), kept.to(DEVICE))
    return cache, args


def layout_args(case: Case) -> dict[str, torch.Tensor]:
    """``region_slots`` and ``offsets`` as passed to ``compact_kv`` (none in the skip layout)."""
    if case.layout == "skip":
        return {}
    as_int = {"dtype": torch.int32, "device": DEVICE}
    regions = [case.region(s) for s in range(len(case.total_len))]
    return {"region_slots": torch.tensor([r for r, _ in regions], **as_int),
            "offsets": torch.tensor([o for _, o in regions], **as_int)}


def read_cells(case: Case, s: int, g: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots, columns) the head-sparse kernels read for KV head g of sequence s after compaction."""
    region_slots, offsets = case.region(s)
    new_len = case.total_len[s] - case.span_len[s] + region_slots
    return attention.head_cells(new_len, case.span_start[s], region_slots, g, case.counts[s][g], offsets[g])


def check(case: Case, dtype: torch.dtype, block_size: int, head_size: int, tile: int | None = 16,
          suffix_given: bool = False) -> None:
    cache, args = make_inputs(case, dtype, block_size, head_size)
    layout = layout_args(case)
    expected = cache.storage.clone()
    reference.compact_kv(*expected.transpose(1, 2).split(head_size, dim=-1), *args, **layout)
    # as the runner calls it: the longest suffix from the host, no sync
    suffixes = [t - a - n for t, a, n in zip(case.total_len, case.span_start, case.span_len, strict=True)]
    suffix = max(suffixes) if suffix_given else None
    triton.compact_kv(cache.key_cache, cache.value_cache, *args, **layout, tile=tile, max_suffix_len=suffix)
    # bit-exact, NaN (never written slots) included
    assert torch.equal(cache.storage.isnan(), expected.isnan())
    assert torch.equal(cache.storage.nan_to_num(0.0), expected.nan_to_num(0.0))
    # the compacted sequence is finite where the head-sparse kernel reads it
    for s in range(len(case.total_len)):
        for g in range(len(case.counts[s])):
            slots, columns = read_cells(case, s, g)
            blocks = args[0][s].cpu().long()[slots // block_size]
            assert torch.isfinite(cache.key_cache[blocks, slots % block_size, columns]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_cases(name: str, dtype: torch.dtype) -> None:
    check(CASES[name], dtype, block_size=16, head_size=32)


@pytest.mark.parametrize("head_size", [32, 64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("block_size", [16, 32], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("tile", [16, 64], ids=lambda t: f"tile{t}")
def test_layouts(block_size: int, head_size: int, tile: int) -> None:
    check(CASES["overlap_last"], torch.float16, block_size, head_size, tile)


@pytest.mark.parametrize("head_size", [32, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("block_size", [16, 32], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("tile", [16, 64], ids=lambda t: f"tile{t}")
def test_packed_layouts(block_size: int, head_size: int, tile: int) -> None:
    check(CASES["packed_overlap_last"], torch.float16, block_size, head_size, tile)


@pytest.mark.parametrize("name", ["random", "overlap_last", "keep_none", "span_mid_block_long_suffix",
                                  "packed_random", "packed_mid_block_long_suffix"])
def test_default_tile_and_suffix_given(name: str) -> None:
    check(CASES[name], torch.bfloat16, block_size=16, head_size=32, tile=None, suffix_given=True)


def test_explicit_skip_layout_equals_the_default() -> None:
    """``region_slots = W`` and ``offsets = g * W`` given are what omitting them does; ``region_slots`` alone
    defaults the offsets to ``g * region_slots``."""
    case = CASES["span_mid_block_long_suffix"]
    cache, args = make_inputs(case, torch.float32, 16, 32)
    before = cache.storage.clone()
    triton.compact_kv(cache.key_cache, cache.value_cache, *args)
    omitted = cache.storage.clone()
    num_seqs, num_kv_heads, width = args[4].shape
    region_slots = torch.full((num_seqs,), width, dtype=torch.int32, device=DEVICE)
    offsets = (torch.arange(num_kv_heads, device=DEVICE) * width).repeat(num_seqs, 1).to(torch.int32)
    for layout in ({"region_slots": region_slots, "offsets": offsets}, {"region_slots": region_slots},
                   {"offsets": offsets}):
        cache.storage.copy_(before)
        triton.compact_kv(cache.key_cache, cache.value_cache, *args, **layout)
        assert torch.equal(cache.storage.view(torch.int32), omitted.view(torch.int32))  # bits, NaN included


def test_rejects_bad_layout_arguments() -> None:
    case = CASES["packed_random"]
    cache, args = make_inputs(case, torch.float32, 16, 32)
    layout = layout_args(case)
    region_slots, offsets = layout["region_slots"], layout["offsets"]
    bad = [({"region_slots": region_slots.long(), "offsets": offsets}, "region_slots must be int32"),
           ({"region_slots": region_slots[:1], "offsets": offsets}, "region_slots must be a contiguous"),
           ({"region_slots": region_slots, "offsets": offsets.long()}, "offsets must be int32"),
           ({"region_slots": region_slots, "offsets": offsets[:, :2]}, r"offsets must be \[num_seqs, Hkv\]"),
           ({"region_slots": region_slots, "offsets": offsets.t().contiguous().t()}, "contiguous in its last")]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            triton.compact_kv(cache.key_cache, cache.value_cache, *args, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["skip", "packed"])
def test_attention_after_compaction_matches_attention_over_the_kept_set(layout: str, dtype: torch.dtype) -> None:
    """Decode over the compacted cache (shorter sequence, per-head kept counts) sees exactly the original
    prefix, each head's kept audio and the suffix: the end-to-end contract of compact-and-shorten. Packed: in a
    region of the mean count, at offsets = the running sum of the counts. Every cell the attention must not read
    afterwards (region cells no head was given, slots past the new length) is poisoned with NaN first."""
    case = dataclasses.replace(CASES["span_mid_block_long_suffix"], layout=layout)
    head_size, block_size, num_heads = 32, 16, 6
    cache, args = make_inputs(case, dtype, block_size, head_size)
    block_table, span_start, span_len, total_len, kept_slots = args
    num_kv_heads = kept_slots.shape[1]
    query = torch.randn(len(case.total_len), num_heads, head_size, generator=cache.generator).to(dtype).to(DEVICE)
    cu = torch.arange(len(case.total_len) + 1, dtype=torch.int32, device=DEVICE)
    # before: dense attention over the kept set, gathered from the original cache
    expected = torch.empty_like(query)
    group = num_heads // num_kv_heads
    for s in range(len(case.total_len)):
        for g in range(num_kv_heads):
            kept = kept_slots[s, g][kept_slots[s, g] >= 0].long().cpu()
            slots = torch.cat([torch.arange(case.span_start[s]), kept,
                               torch.arange(case.span_start[s] + case.span_len[s], case.total_len[s])])
            k = attention.gather_slots(cache.key_cache[:, :, g], block_table[s], slots).float()
            v = attention.gather_slots(cache.value_cache[:, :, g], block_table[s], slots).float()
            q = query[s, g * group:(g + 1) * group].float()
            probs = torch.softmax(q @ k.T * head_size ** -0.5, dim=-1)
            expected[s, g * group:(g + 1) * group] = (probs @ v).to(dtype)
    as_int = {"dtype": torch.int32, "device": DEVICE}
    region_slots = torch.tensor([case.region(s)[0] for s in range(len(case.total_len))], **as_int)
    offsets = torch.tensor([case.region(s)[1] for s in range(len(case.total_len))], **as_int)
    packed = {} if layout == "skip" else {"region_slots": region_slots, "offsets": offsets}
    triton.compact_kv(cache.key_cache, cache.value_cache, *args, **packed)
    counts = (kept_slots >= 0).sum(-1).to(torch.int32)
    new_lens = (total_len - span_len + region_slots).to(torch.int32)
    if layout == "packed":
        assert (region_slots < kept_slots.shape[-1]).all() and (counts > region_slots[:, None]).any()  # it spills
    live = torch.zeros(cache.storage.shape[:3], dtype=torch.bool)  # [block, column, slot in block]
    for s in range(len(case.total_len)):
        for g in range(num_kv_heads):
            slots, columns = read_cells(case, s, g)
            live[block_table[s].cpu().long()[slots // block_size], columns, slots % block_size] = True
    cache.storage[~live.to(DEVICE)] = float("nan")
    for implementation in (attention, attention_triton):
        out = implementation.head_sparse_paged_attention(query, cache.key_cache, cache.value_cache, block_table, cu,
                                                         new_lens, head_size ** -0.5, span_start, region_slots,
                                                         counts, packed.get("offsets"))
        torch.testing.assert_close(out.float(), expected.float(), atol=TOLERANCES[dtype], rtol=TOLERANCES[dtype])
