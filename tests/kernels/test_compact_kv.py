"""KV compaction: the Triton kernel against the torch gather-then-scatter reference (bit-exact: it only moves
data), on overlapping moves; then attention over the compacted cache against attention over the original one."""

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


@dataclasses.dataclass(frozen=True)
class Case:
    total_len: tuple[int, ...]  # KV length per sequence before compaction
    span_start: tuple[int, ...]
    span_len: tuple[int, ...]
    counts: tuple[tuple[int, ...], ...]  # kept slots per (sequence, KV head)
    b_max: int
    choice: str = "random"  # which slots are kept: "random", "first" (maximal overlap) or "last"


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


def check(case: Case, dtype: torch.dtype, block_size: int, head_size: int, tile: int | None = 16,
          suffix_given: bool = False) -> None:
    cache, args = make_inputs(case, dtype, block_size, head_size)
    expected = cache.storage.clone()
    reference.compact_kv(*expected.transpose(1, 2).split(head_size, dim=-1), *args)
    # as the runner calls it: the longest suffix from the host, no sync
    suffixes = [t - a - n for t, a, n in zip(case.total_len, case.span_start, case.span_len, strict=True)]
    suffix = max(suffixes) if suffix_given else None
    triton.compact_kv(cache.key_cache, cache.value_cache, *args, tile=tile, max_suffix_len=suffix)
    # bit-exact, NaN (never written slots) included
    assert torch.equal(cache.storage.isnan(), expected.isnan())
    assert torch.equal(cache.storage.nan_to_num(0.0), expected.nan_to_num(0.0))
    # the compacted sequence is finite where the head-sparse kernel reads it
    for s in range(len(case.total_len)):
        new_len = case.total_len[s] - case.span_len[s] + case.b_max
        for g, count in enumerate(case.counts[s]):
            start = case.span_start[s]
            slots = torch.cat([torch.arange(start + count), torch.arange(start + case.b_max, new_len)])
            blocks = args[0][s].cpu().long()[slots // block_size]
            assert torch.isfinite(cache.key_cache[blocks, slots % block_size, g]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_cases(name: str, dtype: torch.dtype) -> None:
    check(CASES[name], dtype, block_size=16, head_size=32)


@pytest.mark.parametrize("head_size", [32, 64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("block_size", [16, 32], ids=lambda b: f"bs{b}")
@pytest.mark.parametrize("tile", [16, 64], ids=lambda t: f"tile{t}")
def test_layouts(block_size: int, head_size: int, tile: int) -> None:
    check(CASES["overlap_last"], torch.float16, block_size, head_size, tile)


@pytest.mark.parametrize("name", ["random", "overlap_last", "keep_none", "span_mid_block_long_suffix"])
def test_default_tile_and_suffix_given(name: str) -> None:
    check(CASES[name], torch.bfloat16, block_size=16, head_size=32, tile=None, suffix_given=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_after_compaction_matches_attention_over_the_kept_set(dtype: torch.dtype) -> None:
    """Decode over the compacted cache (shorter sequence, per-head kept counts) sees exactly the original
    prefix, each head's kept audio and the suffix: the end-to-end contract of compact-and-shorten."""
    case = CASES["span_mid_block_long_suffix"]
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
    triton.compact_kv(cache.key_cache, cache.value_cache, *args)
    counts = (kept_slots >= 0).sum(-1).to(torch.int32)
    new_lens = (total_len - span_len + case.b_max).to(torch.int32)
    b_max = torch.full_like(span_len, case.b_max)
    tolerance = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}[dtype]
    for implementation in (attention, attention_triton):
        out = implementation.head_sparse_paged_attention(query, cache.key_cache, cache.value_cache, block_table, cu,
                                                         new_lens, head_size ** -0.5, span_start, b_max, counts)
        torch.testing.assert_close(out.float(), expected.float(), atol=tolerance, rtol=tolerance)
