"""The packed per_head layout as the runner prepares it (``attention/kv_store.py``), on the kernels' torch references:
a two-clip request with text between its clips, KV heads of unequal budgets. After compaction each head reads, in
order, the prefix, its own kept audio and the text between the clips, and the suffix; nothing it reads is poisoned."""

from __future__ import annotations

import types

import torch

from headrouter_vllm.attention.kernels import torch_kernels
from headrouter_vllm.attention.kv_store import _PagedCompaction, region_slots
from headrouter_vllm.config import HeadRouterConfig
from headrouter_vllm.kernels.head_sparse_paged_attention.reference import gather_slots, head_cells
from headrouter_vllm.options import RouteOptions
from headrouter_vllm.plan import make_plan
from headrouter_vllm.route_state import RouteState
from tests.kernels.paged import PagedCache

NUM_KV_HEADS, HEAD_SIZE, BLOCK = 4, 32, 16


def two_clip_state() -> tuple[RouteState, int]:
    """Clips at [5, 45) and [50, 71), text between them and after; r = 0.3; the heads' budgets per clip sum to
    keep x heads, as ``per_head_budgets`` makes them (head 0 keeps 1.5x the mean, head 3 a quarter of it)."""
    config = HeadRouterConfig(retention=0.3, mode="per_head", attention="torch")
    plan = make_plan(RouteOptions(), config, [(5, 40), (50, 21)], 90)
    assert [sp.keep for sp in plan.spans] == [12, 6]
    budgets = [(18, 13, 14, 3), (9, 6, 7, 2)]  # per clip, summing to 4 x 12 and 4 x 6
    generator = torch.Generator().manual_seed(0)
    heads = []
    for g in range(NUM_KV_HEADS):
        kept = [sp.start + torch.randperm(sp.length, generator=generator)[:b[g]].sort().values
                for sp, b in zip(plan.spans, budgets, strict=True)]
        heads.append(torch.cat(kept))
    state = RouteState(plan, kept=torch.unique(torch.cat(heads)), kept_per_head=heads)
    return state, 90


def test_packed_region_holds_the_mean_budget_and_each_head_reads_its_own_sequence():
    state, computed = two_clip_state()
    plan = state.plan
    kept_slots, counts, offsets, slots = region_slots(state, NUM_KV_HEADS)
    assert slots == (71 - 5) - plan.removed == 12 + 6 + 5  # the mean budget of both clips and the text between
    assert counts.tolist() == [18 + 9 + 5, 13 + 6 + 5, 14 + 7 + 5, 3 + 2 + 5] and int(counts.sum()) == 4 * slots
    assert offsets.tolist() == [0, 32, 56, 82]

    cache = PagedCache([computed], BLOCK, NUM_KV_HEADS, HEAD_SIZE, torch.float32, "cpu", seed=3)
    original_k = cache.key_cache.clone()
    compaction = _PagedCompaction(torch_kernels(), state, computed, NUM_KV_HEADS, "cpu")
    layer = types.SimpleNamespace(impl=types.SimpleNamespace(head_size=HEAD_SIZE))
    table = cache.block_table[0].long()
    compaction.apply(layer, cache.storage, table)
    compaction.poison(layer, cache.storage, table, float("nan"))

    new_len = computed - plan.removed
    text_between = torch.arange(45, 50)
    for g in range(NUM_KV_HEADS):
        read, columns = head_cells(new_len, 5, slots, g, int(counts[g]), int(offsets[g]))
        got = gather_slots(cache.key_cache, cache.block_table[0], read, columns)
        expected_slots = torch.cat([torch.arange(5), torch.cat([state.kept_per_head[g], text_between]).sort().values,
                                    torch.arange(71, computed)])
        expected = gather_slots(original_k[:, :, g], cache.block_table[0], expected_slots)
        assert torch.isfinite(got).all()
        assert torch.equal(got, expected)
    # head 0 keeps more than the region's slots: its last cells are in head 1's column
    assert int(counts[0]) > slots and int(offsets[1]) // slots == 1
