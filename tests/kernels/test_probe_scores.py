"""Paged probe scores: the Triton kernel against the paged torch reference, which gathers the keys and calls the
dense ``probe_scores`` the CPU engine uses. Slots past each sequence's last probe row and unused blocks are NaN."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from headrouter_vllm.kernels.probe_scores import reference, triton
from tests.kernels.conftest import DEVICE
from tests.kernels.paged import PagedCache

# results are probabilities (<= 1) summed over a few rows; the kernel keeps them in fp32, only the dot inputs are
# low precision (the reference's logits are from the same rounded inputs)
TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in TOLERANCES]


@dataclasses.dataclass(frozen=True)
class Case:
    positions: tuple[tuple[int, ...], ...]  # probe row positions per sequence
    span_start: tuple[int, ...]
    span_len: tuple[int, ...]
    num_heads: int = 6
    num_kv_heads: int = 2


CASES = {
    "two_sequences": Case(((50, 60, 69, 45), (38, 39)), (5, 17), (40, 20)),
    # 20 rows x group of 4 -> three row chunks of 16 rows
    "many_rows": Case((tuple(range(60, 80)),), (3,), (50,), num_heads=8, num_kv_heads=2),
    "one_audio_token": Case(((10, 11), (4,)), (7, 3), (1, 1)),
    # rows inside the span: span keys after a row's position get nothing from it
    "rows_inside_span": Case(((20, 35, 47),), (13,), (40,)),
    "span_from_slot_0": Case(((40, 41),), (0,), (33,)),
    "gqa_group_of_7": Case(((30, 31), (44,)), (2, 16), (20, 17), num_heads=7, num_kv_heads=1),
    "mha": Case(((30, 31), (44,)), (2, 16), (20, 17), num_heads=4, num_kv_heads=4),
    "sequence_without_rows": Case(((30, 31), ()), (2, 16), (20, 17)),
}


def make_inputs(case: Case, dtype: torch.dtype, block_size: int, head_size: int):
    lengths = [max(p, default=0) + 1 for p in case.positions]  # only slots <= the last row exist
    cache = PagedCache(lengths, block_size, case.num_kv_heads, head_size, dtype, DEVICE, seed=2)
    as_int = {"dtype": torch.int32, "device": DEVICE}
    positions = torch.tensor([p for rows in case.positions for p in rows], **as_int)
    cu = torch.tensor([0] + torch.tensor([len(r) for r in case.positions]).cumsum(0).tolist(), **as_int)
    query = torch.randn(positions.numel(), case.num_heads, head_size, generator=cache.generator).to(dtype)
    return (query.to(DEVICE), cu, positions, cache.key_cache, cache.block_table,
            torch.tensor(case.span_start, **as_int), torch.tensor(case.span_len, **as_int), head_size ** -0.5)


def check(case: Case, dtype: torch.dtype, block_size: int, head_size: int, **launch) -> None:
    args = make_inputs(case, dtype, block_size, head_size)
    expected = reference.paged_probe_scores(*args)
    out = triton.paged_probe_scores(*args, **launch)
    assert out.shape == expected.shape == (len(case.positions), case.num_heads, max(case.span_len))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=TOLERANCES[dtype], rtol=TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_cases(name: str, dtype: torch.dtype) -> None:
    check(CASES[name], dtype, block_size=16, head_size=32)


@pytest.mark.parametrize("head_size", [32, 64, 128], ids=lambda d: f"d{d}")
@pytest.mark.parametrize("block_size", [16, 32], ids=lambda b: f"bs{b}")
def test_layouts(block_size: int, head_size: int) -> None:
    check(CASES["two_sequences"], torch.float16, block_size, head_size)


# (rows per chunk, keys per iteration, parallel row groups): the GPU defaults, one group looping over its chunks,
# groups that each loop over several chunks, key tiles of several blocks (edges past the table masked)
LAUNCHES = {
    "rows16_tile1block_groups64": dict(block_m=16, tile_slots=16, max_row_groups=64),
    "rows64_tile4blocks": dict(block_m=64, tile_slots=64),
    "rows16_one_group": dict(block_m=16, tile_slots=16, max_row_groups=1),
    "rows16_tile2blocks_two_groups": dict(block_m=16, tile_slots=32, max_row_groups=2),
    "rows32_tile8blocks_rows_given": dict(block_m=32, tile_slots=128, rows_given=True),
}


@pytest.mark.parametrize("launch", list(LAUNCHES))
@pytest.mark.parametrize("name", ["many_rows", "two_sequences", "gqa_group_of_7", "sequence_without_rows"])
def test_launch_variants(name: str, launch: str) -> None:
    case, options = CASES[name], dict(LAUNCHES[launch])
    if options.pop("rows_given", False):  # as the runner calls it: no host sync for the grid
        options["max_rows_per_seq"] = max(len(rows) for rows in case.positions)
    check(case, torch.bfloat16, block_size=16, head_size=32, **options)


def test_paged_reference_matches_dense_probe_scores() -> None:
    """One sequence whose blocks are in order: the paged reference is the dense function on the same keys."""
    case = CASES["rows_inside_span"]
    query, cu, positions, key_cache, block_table, span_start, span_len, scale = make_inputs(case, torch.float32, 16, 32)
    slots = torch.arange(48)
    keys = key_cache[block_table[0].cpu().long()[slots // 16], slots % 16].cpu()
    columns = torch.arange(13, 53).clamp(max=47)[:35]
    dense = reference.probe_scores(query.cpu(), keys, positions.cpu().long(), columns, scale)
    paged = reference.paged_probe_scores(query, cu, positions, key_cache, block_table, span_start, span_len, scale)
    torch.testing.assert_close(paged[0, :, :35].cpu(), dense)
    assert paged[0, :, 35:].eq(0).all()  # span keys after the last row
