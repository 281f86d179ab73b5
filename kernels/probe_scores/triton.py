"""Probe scores in Triton over a paged key cache: per sequence and query head, the softmax probability mass that
the sequence's probe rows put on each key of its audio span, summed over the rows.

One program per (sequence, KV head, row group); its rows are (probe row) x (query head of the GQA group), as in the
attention kernel, so both passes use ``tl.dot`` with dimensions >= 16. For each chunk of ``BLOCK_M`` rows: pass 1
walks all visible keys for the running max and sum of the softmax; pass 2 walks only the span's keys and adds
``exp(score - max) / sum`` into the result. Each iteration reads ``TILE_BLOCKS`` KV blocks (one physical block id per
slot). The rows x keys matrix is never materialised.

Why row groups: a request's probe rows are few (its question) but its keys many (the whole prompt), so one program
per (sequence, KV head) walked the prompt twice per row chunk, serially: on an H200 a 300 s clip took 21 ms for
Qwen2.5-Omni's 4 KV heads (``benchmarks/results/nvidia-h200/route-ops``). Row chunks now run in parallel, up to
``MAX_ROW_GROUPS`` per (sequence, KV head); each group writes its own slice of a partial result, summed over groups
in a fixed order afterwards (deterministic, no atomics). A group that owns several chunks adds them up with a plain
read-add-write of its own slice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_NEG_BIG = tl.constexpr(-1.0e30)  # kernels may only read constexpr globals
MAX_ROW_GROUPS = 64  # parallel row groups per (sequence, KV head); more chunks loop inside a group
# GPU defaults from bench_route_ops.py on an H200; the interpreter pays per program and per element, not per launch
GPU_BLOCK_M, GPU_TILE_SLOTS = 16, 128


@triton.jit
def _scores_tile(q, k_ptr, table_row_ptr, tile_start, kv_head, dims, offsets, position, kv_end, scale,
                 stride_k_blk, stride_k_slot, stride_k_head, BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    slot = tile_start + offsets
    valid = slot < kv_end
    physical = tl.load(table_row_ptr + slot // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    k = tl.load(k_ptr + physical[None, :] * stride_k_blk + kv_head * stride_k_head
                + (slot % BLOCK_SIZE)[None, :] * stride_k_slot + dims[:, None], mask=valid[None, :], other=0.0)
    scores = tl.dot(q, k, input_precision=DOT_PRECISION) * scale
    return tl.where(slot[None, :] <= position[:, None], scores, float("-inf")), slot


@triton.jit
def _probe_scores_kernel(q_ptr, k_ptr, out_ptr, cu_rows_ptr, row_positions_ptr, block_table_ptr, span_start_ptr,
                         span_len_ptr, scale, stride_q_row, stride_q_head, stride_k_blk, stride_k_slot, stride_k_head,
                         stride_table_seq, stride_out_group, stride_out_seq, stride_out_head,
                         QUERIES_PER_KV: tl.constexpr, QUERIES_PER_KV_PADDED: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, TILE_BLOCKS: tl.constexpr, HEAD_SIZE: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    group = tl.program_id(2)
    num_groups = tl.num_programs(2)
    BLOCK_Q: tl.constexpr = BLOCK_M // QUERIES_PER_KV_PADDED
    TILE: tl.constexpr = TILE_BLOCKS * BLOCK_SIZE
    row_start = tl.load(cu_rows_ptr + seq)
    num_rows = tl.load(cu_rows_ptr + seq + 1) - row_start
    span_start = tl.load(span_start_ptr + seq)
    span_end = span_start + tl.load(span_len_ptr + seq)
    table_row_ptr = block_table_ptr + seq * stride_table_seq
    rows = tl.arange(0, BLOCK_M)
    head_in_group = rows % QUERIES_PER_KV_PADDED
    head = kv_head * QUERIES_PER_KV + head_in_group
    dims = tl.arange(0, HEAD_SIZE)
    offsets = tl.arange(0, TILE)
    group_heads = tl.arange(0, QUERIES_PER_KV_PADDED)
    out_row_ptr = (out_ptr + group * stride_out_group + seq * stride_out_seq
                   + (kv_head * QUERIES_PER_KV + group_heads)[:, None] * stride_out_head)
    out_head_valid = group_heads < QUERIES_PER_KV

    for chunk_start in range(group * BLOCK_Q, num_rows, num_groups * BLOCK_Q):
        row = chunk_start + rows // QUERIES_PER_KV_PADDED
        row_valid = (row < num_rows) & (head_in_group < QUERIES_PER_KV)
        position = tl.load(row_positions_ptr + row_start + row, mask=row_valid, other=-1)
        q = tl.load(q_ptr + (row_start + row)[:, None].to(tl.int64) * stride_q_row + head[:, None] * stride_q_head
                    + dims[None, :], mask=row_valid[:, None], other=0.0)
        kv_end = tl.max(position, axis=0) + 1

        # pass 1: softmax max and sum over every key the rows see
        m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for tile_start in range(0, kv_end, TILE):
            scores, slot = _scores_tile(q, k_ptr, table_row_ptr, tile_start, kv_head, dims, offsets, position,
                                        kv_end, scale, stride_k_blk, stride_k_slot, stride_k_head, BLOCK_SIZE,
                                        DOT_PRECISION)
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(scores - m_new[:, None]), axis=1)
            m_i = m_new
        inv_sum = tl.where(row_valid & (l_i > 0), 1.0 / tl.where(l_i > 0, l_i, 1.0), 0.0)

        # pass 2: probabilities on the span's keys, summed over the chunk's rows per head
        for tile_start in range((span_start // TILE) * TILE, tl.minimum(span_end, kv_end), TILE):
            scores, slot = _scores_tile(q, k_ptr, table_row_ptr, tile_start, kv_head, dims, offsets, position,
                                        kv_end, scale, stride_k_blk, stride_k_slot, stride_k_head, BLOCK_SIZE,
                                        DOT_PRECISION)
            probs = tl.exp(scores - m_i[:, None]) * inv_sum[:, None]
            mass = tl.sum(tl.reshape(probs, [BLOCK_Q, QUERIES_PER_KV_PADDED, TILE]), axis=0)
            in_span = (slot >= span_start) & (slot < span_end)
            out_ptrs = out_row_ptr + (slot - span_start)[None, :]
            out_mask = out_head_valid[:, None] & in_span[None, :]
            tl.store(out_ptrs, tl.load(out_ptrs, mask=out_mask, other=0.0) + mass, mask=out_mask)
        # the group's next chunk reads back what this one stored, maybe in other threads: make the stores visible
        tl.debug_barrier()


def paged_probe_scores(query: torch.Tensor, cu_rows: torch.Tensor, row_positions: torch.Tensor,
                       key_cache: torch.Tensor, block_table: torch.Tensor, span_start: torch.Tensor,
                       span_len: torch.Tensor, scale: float, max_span_len: int | None = None, *,
                       block_m: int | None = None, tile_slots: int | None = None,
                       max_rows_per_seq: int | None = None, max_row_groups: int = MAX_ROW_GROUPS) -> torch.Tensor:
    """Triton version of :func:`.reference.paged_probe_scores` (same arguments and result). ``block_m``: rows per
    chunk (probe rows x padded GQA group), a power of two >= max(16, padded GQA group); ``tile_slots``: keys per
    iteration, a power-of-two multiple of the block size; ``max_row_groups``: row chunks run in parallel per
    (sequence, KV head). ``max_rows_per_seq`` (the most rows of one sequence) avoids a host sync when passed.
    Defaults: ``GPU_BLOCK_M`` / ``GPU_TILE_SLOTS`` on a GPU, 16 rows and one block otherwise."""
    num_rows, num_heads, head_size = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    num_seqs = block_table.shape[0]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if head_size & (head_size - 1) or head_size < 16 or block_size & (block_size - 1) or block_size < 16:
        raise ValueError(f"head_size ({head_size}) and block_size ({block_size}) must be powers of two >= 16")
    if query.dtype != key_cache.dtype:
        raise ValueError(f"query and key_cache must share a dtype (tl.dot), got {query.dtype} and {key_cache.dtype}")
    if query.stride(-1) != 1 or key_cache.stride(-1) != 1 or block_table.stride(1) != 1:
        raise ValueError("query, key_cache and block_table must be contiguous in their last dimension")
    for name, t in (("cu_rows", cu_rows), ("row_positions", row_positions), ("block_table", block_table),
                    ("span_start", span_start), ("span_len", span_len)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    queries_per_kv = num_heads // num_kv_heads
    queries_per_kv_padded = triton.next_power_of_2(queries_per_kv)
    if block_m is None:
        block_m = max(GPU_BLOCK_M if query.is_cuda else 16, queries_per_kv_padded)
    if block_m & (block_m - 1) or block_m < max(16, queries_per_kv_padded):
        raise ValueError(f"block_m ({block_m}) must be a power of two >= max(16, padded GQA group)")
    if tile_slots is None:
        tile_slots = max(GPU_TILE_SLOTS if query.is_cuda else block_size, block_size)
    tile_blocks = tile_slots // block_size
    if tile_slots % block_size or tile_blocks & (tile_blocks - 1):
        raise ValueError(f"tile_slots ({tile_slots}) must be a power-of-two multiple of the block size ({block_size})")
    if max_span_len is None:
        max_span_len = int(span_len.max()) if span_len.numel() else 0
    if max_rows_per_seq is None:
        max_rows_per_seq = int((cu_rows[1:] - cu_rows[:-1]).max()) if num_seqs else 0
    num_groups = max(1, min(max_row_groups, triton.cdiv(max_rows_per_seq, block_m // queries_per_kv_padded)))
    out = torch.zeros(num_groups, num_seqs, num_heads, max_span_len, dtype=torch.float32, device=query.device)
    if num_rows == 0 or max_span_len == 0:
        return out[0]
    _probe_scores_kernel[(num_seqs, num_kv_heads, num_groups)](
        query, key_cache, out, cu_rows, row_positions, block_table, span_start, span_len, scale,
        query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_table.stride(0), out.stride(0), out.stride(1), out.stride(2),
        QUERIES_PER_KV=queries_per_kv, QUERIES_PER_KV_PADDED=queries_per_kv_padded, BLOCK_M=block_m,
        BLOCK_SIZE=block_size, TILE_BLOCKS=tile_blocks, HEAD_SIZE=head_size,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
    )
    return out[0] if num_groups == 1 else out.sum(0)
