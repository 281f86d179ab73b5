"""Head-sparse paged attention: the Triton kernel against the torch reference, and the reference against plain
masked dense attention, in the skip layout (``offsets`` omitted) and the packed one (``offsets`` given: heads keeping
more than ``span_slots`` spill into the next column). Every cell and slot a kernel must not read (region cells no head
reads, slots past each sequence's length, unused blocks) holds NaN."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from headrouter_vllm.kernels.head_sparse_paged_attention import reference, triton
from tests.kernels.conftest import DEVICE
from tests.kernels.paged import PagedCache

# bf16: the interpreter truncates fp32 -> bf16, so one ulp (2^-7 relative) on O(1) outputs
TOLERANCES = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in TOLERANCES]
PACKED = "packed"  # Case.offsets: each sequence's running sum of kept (exclusive), the heads one after another


@dataclasses.dataclass(frozen=True)
class Case:
    """Sequences of one batch: query and KV lengths, the audio span, and the kept count per KV head."""

    q_lens: tuple[int, ...]
    seq_lens: tuple[int, ...]
    span_start: tuple[int, ...]
    span_slots: tuple[int, ...]  # 0: no span
    kept: tuple[tuple[int, ...], ...]  # [seq][kv head]
    num_heads: int = 8
    num_kv_heads: int = 2
    num_kv_splits: int | None = None
    offsets: tuple[tuple[int, ...], ...] | str | None = None  # [seq][kv head], PACKED, or None: the skip layout

    def offset_rows(self) -> list[list[int]] | None:
        if self.offsets == PACKED:
            return [[sum(row[:g]) for g in range(len(row))] for row in self.kept]
        return None if self.offsets is None else [list(row) for row in self.offsets]


CASES = {
    # decode; per head: kept 0, partial, all; one sequence without a span
    "decode": Case((1, 1, 1), (40, 17, 70), (3, 0, 20), (30, 0, 40), ((5, 0), (0, 0), (17, 40))),
    "decode_split_kv": Case((1, 1, 1), (40, 17, 90), (3, 0, 20), (30, 0, 40), ((5, 0), (0, 0), (17, 40)),
                            num_kv_splits=4),
    # more splits than tiles to read: empty splits must not disturb the result
    "decode_split_kv_short": Case((1, 1), (20, 5), (2, 1), (15, 2), ((3, 0), (1, 2)), num_kv_splits=8),
    "mixed_prefill_decode": Case((5, 1, 20), (40, 17, 70), (3, 0, 20), (30, 0, 40), ((5, 0), (0, 0), (17, 40))),
    "mixed_split_kv": Case((5, 1, 20), (40, 17, 70), (3, 0, 20), (30, 0, 40), ((5, 0), (0, 0), (17, 40)),
                           num_kv_splits=2),
    # whole prompt in one step, the queries inside and after the span (in_prompt semantics)
    "prefill_over_span": Case((50,), (50,), (6,), (33,), ((4, 33),)),
    "one_audio_token": Case((1, 3), (9, 12), (4, 7), (1, 1), ((0, 1), (1, 0))),
    # span starting mid-block and crossing several block edges, most of it skipped
    "span_mid_block": Case((2,), (120,), (13,), (90,), ((7, 0),)),
    # rows that see no key at all (span from slot 0, nothing kept) give 0
    "no_visible_key": Case((4,), (6,), (0,), (6,), ((0, 2),)),
    "more_heads_than_tokens": Case((2, 1), (3, 2), (1, 0), (1, 1), ((0, 1, 0, 1), (1, 1, 0, 0)),
                                   num_heads=16, num_kv_heads=4),
    "gqa_group_of_7": Case((1, 6), (33, 45), (5, 10), (20, 30), ((3,), (30,)), num_heads=7, num_kv_heads=1),
    "mha": Case((1, 3), (33, 45), (5, 10), (20, 30), ((3, 0, 20, 9), (30, 1, 2, 0)), num_heads=4, num_kv_heads=4),
    # packed layout. Seq 0: head 0 keeps 30 of 20 slots (its column and 10 cells of head 1's), head 1 the last 10,
    # ending at Hkv * span_slots; seq 1 has no region; seq 2: head 0 keeps nothing, head 1 spills, 15 unused cells
    "packed_decode": Case((1, 1, 1), (40, 17, 70), (3, 0, 20), (20, 0, 20), ((30, 10), (0, 0), (0, 25)),
                          offsets=PACKED),
    "packed_split_kv": Case((1, 1, 1), (40, 17, 90), (3, 0, 20), (20, 0, 20), ((30, 10), (0, 0), (0, 25)),
                            offsets=PACKED, num_kv_splits=4),
    # queries inside and after the region: causality by the slot a cell is stored in, not the cell number
    "packed_prefill_over_region": Case((50, 1), (50, 40), (6, 3), (30, 20), ((45, 15), (12, 28)), offsets=PACKED),
    # region starting mid-block and crossing several block edges; decode and a tile of queries after it
    "packed_mid_block": Case((2, 9), (120, 80), (13, 21), (45, 35), ((70, 20), (5, 40)), offsets=PACKED),
    # a sequence still being written ends inside its region: cells stored at slots >= seq_len are not read
    "packed_ends_inside_region": Case((4,), (30,), (10,), (30,), ((45, 15),), offsets=PACKED),
    # not the running sum: head 1's cells first, head 0's after them (spilling into the next column)
    "packed_reversed": Case((1, 3), (60, 33), (8, 5), (20, 10), ((25, 15), (6, 9)), offsets=((15, 0), (9, 0))),
    "packed_mha": Case((1, 3), (33, 45), (5, 10), (20, 30), ((30, 0, 30, 20), (3, 57, 20, 40)), num_heads=4,
                       num_kv_heads=4, offsets=PACKED),
    "packed_gqa_group_of_2": Case((1, 4), (33, 45), (5, 10), (20, 30), ((35, 5, 0, 40), (60, 0, 30, 30)),
                                  num_heads=8, num_kv_heads=4, offsets=PACKED),
    "packed_gqa_group_of_7": Case((1, 6), (33, 45), (5, 10), (20, 30), ((29, 11), (30, 30)), num_heads=14,
                                  offsets=PACKED),
}
PACKED_CASES = [name for name, case in CASES.items() if case.offsets is not None]


def region_cells_read(case: Case, s: int) -> torch.Tensor:
    """``[Hkv, span_slots]`` bools: the region cells of sequence s that some KV head reads (column, slot - start)."""
    span_slots, offsets = case.span_slots[s], case.offset_rows()
    read = torch.zeros(case.num_kv_heads * span_slots, dtype=torch.bool)
    for g, kept in enumerate(case.kept[s]):
        first = g * span_slots if offsets is None else offsets[s][g]
        assert first >= 0 and first + kept <= read.numel(), "a case's cells must lie inside its region"
        read[first:first + kept] = True
    return read.view(case.num_kv_heads, span_slots)


def make_inputs(case: Case, dtype: torch.dtype, block_size: int, head_size: int, seed: int = 0):
    """The attention arguments (``offsets`` last: None in the skip layout) and the cache, every unread region cell
    NaN."""
    cache = PagedCache(list(case.seq_lens), block_size, case.num_kv_heads, head_size, dtype, DEVICE, seed=seed)
    as_int = {"dtype": torch.int32, "device": DEVICE}
    span_start = torch.tensor(case.span_start, **as_int)
    span_slots = torch.tensor(case.span_slots, **as_int)
    kept = torch.tensor(case.kept, **as_int)
    for s in range(len(case.seq_lens)):
        if case.span_slots[s]:
            blocks, in_block = cache.slots(s, case.span_start[s], case.span_start[s] + case.span_slots[s])
            columns, slots = (~region_cells_read(case, s)).nonzero(as_tuple=True)
            for half in (cache.key_cache, cache.value_cache):
                half[blocks[slots], in_block[slots], columns.to(DEVICE)] = float("nan")
    cu = torch.tensor([0] + torch.tensor(case.q_lens).cumsum(0).tolist(), **as_int)
    query = torch.randn(int(cu[-1]), case.num_heads, head_size, generator=cache.generator).to(dtype).to(DEVICE)
    offsets = None if case.offsets is None else torch.tensor(case.offset_rows(), **as_int)
    args = (query, cache.key_cache, cache.value_cache, cache.block_table, cu, torch.tensor(case.seq_lens, **as_int),
            head_size ** -0.5, span_start, span_slots, kept, offsets)
    return cache, args


def check(case: Case, dtype: torch.dtype, block_size: int, head_size: int) -> None:
    _, args = make_inputs(case, dtype, block_size, head_size)
    expected = reference.head_sparse_paged_attention(*args)
    assert torch.isfinite(expected).all()
    out = triton.head_sparse_paged_attention(*args, num_kv_splits=case.num_kv_splits)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), expected.float(), atol=TOLERANCES[dtype], rtol=TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_cases(name: str, dtype: torch.dtype) -> None:
    check(CASES[name], dtype, block_size=16, head_size=32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_size", [32, 64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("block_size", [16, 32], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("num_kv_splits", [1, 2], ids=lambda n: f"splits{n}")
def test_layouts(block_size: int, head_size: int, dtype: torch.dtype, num_kv_splits: int) -> None:
    case = dataclasses.replace(CASES["mixed_prefill_decode"], num_kv_splits=num_kv_splits)
    check(case, dtype, block_size, head_size)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("num_kv_splits", [1, 2], ids=lambda n: f"splits{n}")
def test_packed_layouts(block_size: int, dtype: torch.dtype, num_kv_splits: int) -> None:
    case = dataclasses.replace(CASES["packed_mid_block"], num_kv_splits=num_kv_splits)
    check(case, dtype, block_size, head_size=64)


@pytest.mark.parametrize("tile_blocks", [1, 2, 8], ids=lambda n: f"tile{n}blocks")
@pytest.mark.parametrize("name", ["span_mid_block", "decode_split_kv", "mixed_split_kv", "gqa_group_of_7",
                                  "packed_mid_block", "packed_split_kv", "packed_prefill_over_region"])
def test_tile_sizes(name: str, tile_blocks: int) -> None:
    """Loop iterations of one KV block, several, or more than a sequence has: the same result (tiles straddle the
    region, the columns a head's cells spill into and the end of the visible keys)."""
    case = CASES[name]
    _, args = make_inputs(case, torch.float32, 16, 32)
    expected = reference.head_sparse_paged_attention(*args)
    out = triton.head_sparse_paged_attention(*args, num_kv_splits=case.num_kv_splits, tile_slots=16 * tile_blocks)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_default_splits_and_strided_output() -> None:
    """Small decode batches over long contexts split the key range by default; ``out`` may be a strided view."""
    assert triton.default_num_kv_splits(1, 4, 16384, 16) == 16  # Qwen2.5-Omni, one long request
    assert triton.default_num_kv_splits(128, 32, 16384, 16) == 1  # enough programs already
    assert triton.default_num_kv_splits(2, 2, 100, 16) == 1  # too short to split
    case = CASES["decode"]
    _, args = make_inputs(case, torch.float32, 16, 32)
    expected = reference.head_sparse_paged_attention(*args)
    for splits in (None, 2):
        storage = torch.zeros(3, case.num_heads, 2, 32, device=DEVICE)
        out = triton.head_sparse_paged_attention(*args, out=storage[:, :, 1], num_kv_splits=splits)
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
        assert storage[:, :, 0].eq(0).all()


def test_explicit_skip_offsets_equal_the_default() -> None:
    """``offsets = g * span_slots`` is the skip layout: bit for bit what omitting them gives."""
    case = CASES["mixed_split_kv"]
    _, args = make_inputs(case, torch.float32, 16, 32)
    span_slots = args[8]
    default = triton.head_sparse_paged_attention(*args, num_kv_splits=2)
    offsets = (torch.arange(case.num_kv_heads, device=DEVICE)[None] * span_slots[:, None]).to(torch.int32)
    explicit = triton.head_sparse_paged_attention(*args[:10], offsets, num_kv_splits=2)
    assert torch.equal(default, explicit)


@pytest.mark.parametrize("name", ["mixed_prefill_decode", *PACKED_CASES])
def test_reference_equals_masked_dense_attention(name: str) -> None:
    """The reference (gather only the cells and slots a head reads, in its order) equals dense attention over every
    (slot, KV-head column) of a sequence, with an explicit mask of the cells each head reads."""
    case = CASES[name]
    cache, args = make_inputs(case, torch.float32, 16, 32)
    query, _, _, block_table, cu, seq_lens, scale, span_start, span_slots, kept, offsets = args
    out = reference.head_sparse_paged_attention(*args)
    group = case.num_heads // case.num_kv_heads
    columns = torch.arange(case.num_kv_heads)
    for s, seq_len in enumerate(case.seq_lens):
        slots = torch.arange(seq_len)
        blocks = block_table[s].cpu().long()[slots // 16]
        k_all = cache.key_cache[blocks, slots % 16].cpu()  # [T, Hkv, d]
        v_all = cache.value_cache[blocks, slots % 16].cpu()
        q = query[cu[s]:cu[s + 1]].cpu()
        positions = torch.arange(seq_len - q.shape[0], seq_len)
        start, size = case.span_start[s], case.span_slots[s]
        in_region = (slots >= start) & (slots < start + size) & (size > 0)  # [T]
        cell = columns[None] * size + slots[:, None] - start  # [T, Hkv]: the cell number, inside the region
        for g in range(case.num_kv_heads):
            first = g * size if offsets is None else int(offsets[s, g])
            reads = torch.where(in_region[:, None], (cell >= first) & (cell < first + int(kept[s, g])),
                                columns[None] == g)  # [T, Hkv]
            k = torch.where(reads[..., None], k_all, 0.0)  # unread cells may hold NaN
            v = torch.where(reads[..., None], v_all, 0.0)
            heads = slice(g * group, (g + 1) * group)
            logits = torch.einsum("qhd,tcd->hqtc", q[:, heads], k) * scale  # [group, q, T, Hkv]
            mask = reads[None, None] & (slots[None, None, :, None] <= positions[None, :, None, None])
            logits = logits.masked_fill(~mask, float("-inf"))
            probs = torch.softmax(logits.flatten(2), dim=-1).nan_to_num(0.0).view(logits.shape)  # nothing seen: 0
            dense = torch.einsum("hqtc,tcd->qhd", probs, v)
            torch.testing.assert_close(out[cu[s]:cu[s + 1], heads].cpu(), dense, atol=1e-5, rtol=1e-5)


def test_reference_skip_layout_equals_masked_dense_attention() -> None:
    """The skip layout against dense attention with the skipped ranges masked, head by head."""
    case = CASES["mixed_prefill_decode"]
    cache, args = make_inputs(case, torch.float32, 16, 32)
    query, _, _, block_table, cu, seq_lens, scale, span_start, span_slots, kept, _ = args
    out = reference.head_sparse_paged_attention(*args)
    group = case.num_heads // case.num_kv_heads
    for s, seq_len in enumerate(case.seq_lens):
        slots = torch.arange(seq_len)
        blocks = block_table[s].cpu().long()[slots // 16]
        k = cache.key_cache[blocks, slots % 16].cpu().repeat_interleave(group, dim=1)  # [T, Hq, d]
        v = cache.value_cache[blocks, slots % 16].cpu().repeat_interleave(group, dim=1)
        q = query[cu[s]:cu[s + 1]].cpu()
        positions = torch.arange(seq_len - q.shape[0], seq_len)
        kept_per_head = kept[s].cpu().repeat_interleave(group)
        skipped = ((slots[None] >= span_start[s].cpu() + kept_per_head[:, None])
                   & (slots[None] < span_start[s].cpu() + span_slots[s].cpu()))  # [Hq, T]
        mask = (slots[None, None] <= positions[None, :, None]) & ~skipped[:, None]  # [Hq, q, T]
        v = torch.where(skipped.T[..., None], 0.0, v)  # skipped slots hold NaN
        logits = torch.einsum("qhd,thd->hqt", q, torch.where(skipped.T[..., None], 0.0, k)) * scale
        probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
        dense = torch.einsum("hqt,thd->qhd", probs, v)
        torch.testing.assert_close(out[cu[s]:cu[s + 1]].cpu(), dense, atol=1e-5, rtol=1e-5)


def test_rejects_shapes_that_do_not_compile_on_gpu() -> None:
    _, args = make_inputs(CASES["decode"], torch.float32, 16, 32)
    kept = args[9]
    with pytest.raises(ValueError, match="offsets must be int32"):
        triton.head_sparse_paged_attention(*args[:10], kept.long())
    with pytest.raises(ValueError, match=r"offsets must be \[num_seqs, Hkv\]"):
        triton.head_sparse_paged_attention(*args[:10], kept[:, :1].contiguous())
    with pytest.raises(ValueError, match="contiguous"):
        triton.head_sparse_paged_attention(*args[:10], kept.t().contiguous().t())
    with pytest.raises(ValueError, match="block_m"):
        triton.head_sparse_paged_attention(*args, block_m=8)
    with pytest.raises(ValueError, match="num_kv_splits"):
        triton.head_sparse_paged_attention(*args, num_kv_splits=3)
    with pytest.raises(ValueError, match="tile_slots"):
        triton.head_sparse_paged_attention(*args, tile_slots=48)
