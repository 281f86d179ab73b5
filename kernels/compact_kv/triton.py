"""KV compaction in Triton: per (sequence, KV head), that head's kept audio slots move to its cells of the new region
(``reference.py``: cells numbered column by column, possibly in another head's column) and the sequence's suffix
down behind ``span_start + region_slots``, in place, in two launches of one kernel.

Move ``i`` of a (sequence, KV head g): for ``i < W`` (``W = kept_slots.shape[-1]``) it reads the head's ``i``-th kept
slot (-1 padding: no move) from column g and writes region cell ``offsets[s, g] + i`` (column
``cell // region_slots``, slot ``span_start + cell % region_slots``); after that the suffix slot
``span_start + span_len + (i - W)`` of column g goes to ``span_start + region_slots + (i - W)`` of column g. Sources
and destinations overlap, also across columns, so the first launch gathers every moved slot into a scratch buffer
and the second scatters them to their destinations: the launch boundary orders every read before every write, and
each launch runs one program per (sequence, KV head, tile of moves), all in parallel. (The first version walked each
head's moves in order in one program, in place: on an H200 that was latency-bound, 50-610 GB/s,
``benchmarks/results/nvidia-h200/route-ops``.) Moves whose source is their destination (a kept slot already in place,
in its own column) are skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GPU_TILE, INTERPRETER_TILE = 64, 32  # moves per program (bench_route_ops.py on an H200)


@triton.jit
def _compact_kv_kernel(k_ptr, v_ptr, scratch_ptr, block_table_ptr, span_start_ptr, span_len_ptr, total_len_ptr,
                       kept_slots_ptr, region_slots_ptr, offsets_ptr, stride_k_blk, stride_k_slot, stride_k_head,
                       stride_v_blk, stride_v_slot, stride_v_head, stride_table_seq, stride_kept_seq,
                       stride_kept_head, stride_offsets_seq, width, max_moves,
                       NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr,
                       TILE: tl.constexpr, HAS_REGION_SLOTS: tl.constexpr, HAS_OFFSETS: tl.constexpr,
                       GATHER: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    index = tl.program_id(2) * TILE + tl.arange(0, TILE)
    span_start = tl.load(span_start_ptr + seq)
    suffix_start = span_start + tl.load(span_len_ptr + seq)
    suffix_len = tl.load(total_len_ptr + seq) - suffix_start
    region_slots = tl.load(region_slots_ptr + seq) if HAS_REGION_SLOTS else width
    first_cell = tl.load(offsets_ptr + seq * stride_offsets_seq + kv_head) if HAS_OFFSETS else kv_head * region_slots
    is_kept = index < width
    kept_src = tl.load(kept_slots_ptr + seq * stride_kept_seq + kv_head * stride_kept_head + index, mask=is_kept,
                       other=-1)
    cell = first_cell + index
    cells_per_column = tl.maximum(region_slots, 1)
    cell_column = cell // cells_per_column
    src = tl.where(is_kept, kept_src, suffix_start + index - width)
    region_dst = span_start + cell - cell_column * cells_per_column
    dst = tl.where(is_kept, region_dst, span_start + region_slots + index - width)
    dst_column = tl.where(is_kept, cell_column, kv_head)
    valid = tl.where(is_kept, kept_src >= 0, index - width < suffix_len) & ((src != dst) | (dst_column != kv_head))

    dims = tl.arange(0, HEAD_SIZE)
    scratch = scratch_ptr + (((seq * NUM_KV_HEADS + kv_head) * max_moves + index).to(tl.int64) * 2 * HEAD_SIZE)
    table_row_ptr = block_table_ptr + seq * stride_table_seq
    slot = src if GATHER else dst
    column = kv_head if GATHER else dst_column
    block = tl.load(table_row_ptr + slot // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    k_at = k_ptr + block * stride_k_blk + (slot % BLOCK_SIZE) * stride_k_slot + column * stride_k_head
    v_at = v_ptr + block * stride_v_blk + (slot % BLOCK_SIZE) * stride_v_slot + column * stride_v_head
    mask = valid[:, None]
    if GATHER:
        tl.store(scratch[:, None] + dims[None, :], tl.load(k_at[:, None] + dims[None, :], mask=mask), mask=mask)
        tl.store(scratch[:, None] + HEAD_SIZE + dims[None, :], tl.load(v_at[:, None] + dims[None, :], mask=mask),
                 mask=mask)
    else:
        tl.store(k_at[:, None] + dims[None, :], tl.load(scratch[:, None] + dims[None, :], mask=mask), mask=mask)
        tl.store(v_at[:, None] + dims[None, :], tl.load(scratch[:, None] + HEAD_SIZE + dims[None, :], mask=mask),
                 mask=mask)


def compact_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
               span_start: torch.Tensor, span_len: torch.Tensor, total_len: torch.Tensor,
               kept_slots: torch.Tensor, region_slots: torch.Tensor | None = None,
               offsets: torch.Tensor | None = None, *, tile: int | None = None,
               max_suffix_len: int | None = None) -> None:
    """Triton version of :func:`..reference.compact_kv` (same arguments; in place). Not checked on the device (the
    reference raises): ``region_slots <= span_len`` (``W <= span_len`` by default), kept slots inside the span,
    each head's cells ``[offsets, offsets + count)`` inside the region's ``Hkv * region_slots`` cells and the heads'
    cells disjoint. ``tile``: moves per program (default ``GPU_TILE`` on a GPU, ``INTERPRETER_TILE`` otherwise);
    ``max_suffix_len`` (the longest ``total_len - span_start - span_len``) avoids a host sync when passed."""
    _, block_size, num_kv_heads, head_size = key_cache.shape
    num_seqs = block_table.shape[0]
    width = kept_slots.shape[-1]
    if tile is None:
        tile = GPU_TILE if key_cache.is_cuda else INTERPRETER_TILE
    if value_cache.shape != key_cache.shape or value_cache.dtype != key_cache.dtype:
        raise ValueError("key_cache and value_cache must have the same shape and dtype")
    if key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError("the caches must be contiguous in their last dimension")
    if head_size & (head_size - 1) or tile & (tile - 1):
        raise ValueError(f"head_size ({head_size}) and tile ({tile}) must be powers of two")
    if kept_slots.shape[:2] != (num_seqs, num_kv_heads) or kept_slots.stride(-1) != 1:
        raise ValueError("kept_slots must be [num_seqs, Hkv, W], contiguous in its last dimension")
    if region_slots is not None and (region_slots.shape != (num_seqs,) or not region_slots.is_contiguous()):
        raise ValueError(f"region_slots must be a contiguous [num_seqs] ({num_seqs}), got {tuple(region_slots.shape)}")
    if offsets is not None and (offsets.shape != (num_seqs, num_kv_heads) or offsets.stride(-1) != 1):
        raise ValueError(f"offsets must be [num_seqs, Hkv] ({num_seqs}, {num_kv_heads}), contiguous in its last "
                         f"dimension, got {tuple(offsets.shape)}")
    for name, t in (("block_table", block_table), ("span_start", span_start), ("span_len", span_len),
                    ("total_len", total_len), ("kept_slots", kept_slots), ("region_slots", region_slots),
                    ("offsets", offsets)):
        if t is not None and t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    if num_seqs == 0:
        return
    if max_suffix_len is None:
        max_suffix_len = int((total_len - span_start - span_len).max())
    max_moves = width + max(max_suffix_len, 0)
    if max_moves == 0:
        return
    scratch = torch.empty(num_seqs, num_kv_heads, max_moves, 2, head_size, dtype=key_cache.dtype,
                          device=key_cache.device)
    grid = (num_seqs, num_kv_heads, triton.cdiv(max_moves, tile))
    for gather in (True, False):  # every read (first launch) before any write (second launch)
        _compact_kv_kernel[grid](
            key_cache, value_cache, scratch, block_table, span_start, span_len, total_len, kept_slots,
            span_len if region_slots is None else region_slots, span_len if offsets is None else offsets,
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
            block_table.stride(0), kept_slots.stride(0), kept_slots.stride(1),
            0 if offsets is None else offsets.stride(0), width, max_moves,
            NUM_KV_HEADS=num_kv_heads, BLOCK_SIZE=block_size, HEAD_SIZE=head_size, TILE=tile,
            HAS_REGION_SLOTS=region_slots is not None, HAS_OFFSETS=offsets is not None, GATHER=gather,
        )
