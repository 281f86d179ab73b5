"""KV compaction in Triton: one program per (sequence, KV head) moves that head's kept audio slots to the front of
its span and the sequence's suffix down behind ``span_start + b_max``, in place.

Why in place is safe: every move goes down (destination <= source) and sources ascend, so walking tiles in
ascending order, a tile's destinations lie below the sources of every later tile (kept: ``dst_i = start + i <=
src_i < src_k`` for ``k > i``; suffix: a constant shift down). Inside one tile a destination may equal an earlier
element's source, and on a GPU the warps of a program are not in lockstep, so each tile is loaded completely, then a
barrier, then stored: no store can overtake a load of the same or an earlier tile. Programs touch disjoint memory
(other KV heads, other sequences' blocks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _move_tile(k_ptr, v_ptr, table_row_ptr, kv_head, src, dst, valid, dims,
               stride_k_blk, stride_k_slot, stride_k_head, stride_v_blk, stride_v_slot, stride_v_head,
               BLOCK_SIZE: tl.constexpr):
    src_block = tl.load(table_row_ptr + src // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    dst_block = tl.load(table_row_ptr + dst // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    src_k = src_block * stride_k_blk + (src % BLOCK_SIZE) * stride_k_slot + kv_head * stride_k_head
    src_v = src_block * stride_v_blk + (src % BLOCK_SIZE) * stride_v_slot + kv_head * stride_v_head
    dst_k = dst_block * stride_k_blk + (dst % BLOCK_SIZE) * stride_k_slot + kv_head * stride_k_head
    dst_v = dst_block * stride_v_blk + (dst % BLOCK_SIZE) * stride_v_slot + kv_head * stride_v_head
    k = tl.load(k_ptr + src_k[:, None] + dims[None, :], mask=valid[:, None])
    v = tl.load(v_ptr + src_v[:, None] + dims[None, :], mask=valid[:, None])
    tl.debug_barrier()  # the whole tile is read before any of it is overwritten
    tl.store(k_ptr + dst_k[:, None] + dims[None, :], k, mask=valid[:, None])
    tl.store(v_ptr + dst_v[:, None] + dims[None, :], v, mask=valid[:, None])


@triton.jit
def _compact_kv_kernel(k_ptr, v_ptr, block_table_ptr, span_start_ptr, span_len_ptr, total_len_ptr, kept_slots_ptr,
                       stride_k_blk, stride_k_slot, stride_k_head, stride_v_blk, stride_v_slot, stride_v_head,
                       stride_table_seq, stride_kept_seq, stride_kept_head, b_max,
                       BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, TILE: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    span_start = tl.load(span_start_ptr + seq)
    span_len = tl.load(span_len_ptr + seq)
    total_len = tl.load(total_len_ptr + seq)
    table_row_ptr = block_table_ptr + seq * stride_table_seq
    kept_row_ptr = kept_slots_ptr + seq * stride_kept_seq + kv_head * stride_kept_head
    dims = tl.arange(0, HEAD_SIZE)
    offsets = tl.arange(0, TILE)

    # the head's kept audio slots, to the front of the span (padding -1: nothing to move)
    for tile_start in range(0, b_max, TILE):
        index = tile_start + offsets
        src = tl.load(kept_row_ptr + index, mask=index < b_max, other=-1)
        _move_tile(k_ptr, v_ptr, table_row_ptr, kv_head, src, span_start + index, src >= 0, dims,
                   stride_k_blk, stride_k_slot, stride_k_head, stride_v_blk, stride_v_slot, stride_v_head,
                   BLOCK_SIZE)

    # the suffix after the span, down to span_start + b_max
    suffix_start = span_start + span_len
    for tile_start in range(suffix_start, total_len, TILE):
        src = tile_start + offsets
        _move_tile(k_ptr, v_ptr, table_row_ptr, kv_head, src, src - span_len + b_max, src < total_len, dims,
                   stride_k_blk, stride_k_slot, stride_k_head, stride_v_blk, stride_v_slot, stride_v_head,
                   BLOCK_SIZE)


def compact_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
               span_start: torch.Tensor, span_len: torch.Tensor, total_len: torch.Tensor,
               kept_slots: torch.Tensor, *, tile: int = 32) -> None:
    """Triton version of :func:`..reference.compact_kv` (same arguments; in place). Requires ``b_max <= span_len``
    and kept slots ascending inside the span (not checked on the device). ``tile``: slots moved per step."""
    _, block_size, num_kv_heads, head_size = key_cache.shape
    num_seqs = block_table.shape[0]
    b_max = kept_slots.shape[-1]
    if value_cache.shape != key_cache.shape:
        raise ValueError("key_cache and value_cache must have the same shape")
    if key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError("the caches must be contiguous in their last dimension")
    if head_size & (head_size - 1) or tile & (tile - 1):
        raise ValueError(f"head_size ({head_size}) and tile ({tile}) must be powers of two")
    if kept_slots.shape[:2] != (num_seqs, num_kv_heads) or kept_slots.stride(-1) != 1:
        raise ValueError("kept_slots must be [num_seqs, Hkv, b_max], contiguous in its last dimension")
    for name, t in (("block_table", block_table), ("span_start", span_start), ("span_len", span_len),
                    ("total_len", total_len), ("kept_slots", kept_slots)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    if num_seqs == 0:
        return
    _compact_kv_kernel[(num_seqs, num_kv_heads)](
        key_cache, value_cache, block_table, span_start, span_len, total_len, kept_slots,
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_table.stride(0), kept_slots.stride(0), kept_slots.stride(1), b_max,
        BLOCK_SIZE=block_size, HEAD_SIZE=head_size, TILE=tile,
    )
