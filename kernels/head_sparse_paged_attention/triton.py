"""Head-sparse paged attention in Triton: vLLM-style causal paged attention over ``[num_blocks, block_size, Hkv, d]``
caches, where each KV head reads a sequence's audio region ``[span_start, span_start + span_slots)`` its own way:
``kept[s, g]`` region cells from ``offsets[s, g]`` (cells numbered column by column, see ``reference.py``; default
``g * span_slots``, the skip layout), every other slot from its own column.

One program per (sequence, tile of query tokens, KV head[, KV split]). Its rows are the query tokens of the tile
times the query heads sharing that KV head (as in vLLM's unified attention), so one K/V tile load serves the whole
GQA group and both matmuls are ``tl.dot`` with every dimension >= 16. The program walks the keys it needs as a
single "virtual" range of slots: the slots before the region, the head's region cells, then the slots after the
region, each virtual slot mapped to its (slot, KV-head column); region cells it does not read are never loaded
(loads are masked per slot). Each loop iteration reads ``TILE_BLOCKS * block_size`` virtual slots (one physical
block id per slot, as vLLM's unified attention does), so that small KV blocks still give large loads in flight;
without a region the virtual slots are the slots and the tiles are whole blocks. With ``num_kv_splits > 1`` (long
decode) the virtual range is cut into equal parts, each writing an unnormalised partial result (running max, sum,
accumulator) that a second kernel combines.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Finite stand-in for -inf as the running max: exp(m_old - m_new) then never sees (-inf) - (-inf).
_NEG_BIG = tl.constexpr(-1.0e30)  # kernels may only read constexpr globals


@triton.jit
def _head_sparse_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr,
    block_table_ptr, cu_seqlens_q_ptr, seq_lens_ptr, span_start_ptr, span_slots_ptr, kept_ptr, offsets_ptr,
    scale,
    stride_q_tok, stride_q_head, stride_k_blk, stride_k_slot, stride_k_head, stride_v_blk, stride_v_slot,
    stride_v_head, stride_out_tok, stride_out_head, stride_table_seq, stride_kept_seq, stride_offsets_seq,
    NUM_KV_HEADS: tl.constexpr, QUERIES_PER_KV: tl.constexpr, QUERIES_PER_KV_PADDED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    TILE_BLOCKS: tl.constexpr, HAS_OFFSETS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2) % NUM_KV_HEADS
    split = tl.program_id(2) // NUM_KV_HEADS
    BLOCK_Q: tl.constexpr = BLOCK_M // QUERIES_PER_KV_PADDED
    NUM_HEADS: tl.constexpr = NUM_KV_HEADS * QUERIES_PER_KV

    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:  # the grid covers the longest sequence's query tiles
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    # rows = (query token of the tile) x (query head of the GQA group), heads padded to a power of two
    rows = tl.arange(0, BLOCK_M)
    token = q_tile * BLOCK_Q + rows // QUERIES_PER_KV_PADDED
    head_in_group = rows % QUERIES_PER_KV_PADDED
    head = kv_head * QUERIES_PER_KV + head_in_group
    row_valid = (token < q_len) & (head_in_group < QUERIES_PER_KV)
    position = context_len + token
    dims = tl.arange(0, HEAD_SIZE)
    q = tl.load(q_ptr + (q_start + token)[:, None].to(tl.int64) * stride_q_tok + head[:, None] * stride_q_head
                + dims[None, :], mask=row_valid[:, None], other=0.0)

    # this KV head's region cells [first_cell, first_cell + kept) (no region: span_slots == 0)
    span_slots = tl.load(span_slots_ptr + seq)
    span_start = tl.load(span_start_ptr + seq)
    kept = tl.load(kept_ptr + seq * stride_kept_seq + kv_head)
    first_cell = tl.load(offsets_ptr + seq * stride_offsets_seq + kv_head) if HAS_OFFSETS else kv_head * span_slots
    has_region = span_slots > 0
    region_end = span_start + span_slots
    cells_per_column = tl.maximum(span_slots, 1)

    # keys this tile can see end at the position of its last query token. Virtual slots: [0, num_before) are the
    # slots before the region, then num_cells region cells, then num_after slots from region_end on.
    kv_end = context_len + tl.minimum((q_tile + 1) * BLOCK_Q, q_len)
    num_before = tl.where(has_region, tl.minimum(span_start, kv_end), kv_end)
    num_cells = tl.where(has_region & (kv_end > span_start), kept, 0)
    num_after = tl.where(has_region, tl.maximum(kv_end - region_end, 0), 0)
    num_virtual = num_before + num_cells + num_after

    TILE: tl.constexpr = TILE_BLOCKS * BLOCK_SIZE
    num_tiles = tl.cdiv(num_virtual, TILE)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    tile_offsets = tl.arange(0, TILE)
    m_i = tl.full([BLOCK_M], _NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_SIZE], dtype=tl.float32)
    for tile in range(tile_lo, tile_hi):
        virtual = tile * TILE + tile_offsets
        is_cell = (virtual >= num_before) & (virtual < num_before + num_cells)
        cell = first_cell + (virtual - num_before)
        cell_column = cell // cells_per_column
        own_slot = tl.where(virtual < num_before, virtual, virtual - num_before - num_cells + region_end)
        slot = tl.where(is_cell, span_start + cell - cell_column * cells_per_column, own_slot)
        column = tl.where(is_cell, cell_column, kv_head)
        # masked loads: unread cells and slots past the visible end are never read (they may hold garbage)
        slot_valid = (virtual < num_virtual) & (slot < kv_end)
        physical = tl.load(block_table_ptr + seq * stride_table_seq + slot // BLOCK_SIZE, mask=slot_valid,
                           other=0).to(tl.int64)
        slot_in_block = slot % BLOCK_SIZE
        k = tl.load(k_ptr + physical[None, :] * stride_k_blk + column[None, :] * stride_k_head
                    + slot_in_block[None, :] * stride_k_slot + dims[:, None], mask=slot_valid[None, :], other=0.0)
        v = tl.load(v_ptr + physical[:, None] * stride_v_blk + column[:, None] * stride_v_head
                    + slot_in_block[:, None] * stride_v_slot + dims[None, :], mask=slot_valid[:, None], other=0.0)
        scores = tl.dot(q, k, input_precision=DOT_PRECISION) * scale
        visible = slot_valid[None, :] & (slot[None, :] <= position[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # a row that sees no key gives 0
        tl.store(out_ptr + (q_start + token)[:, None].to(tl.int64) * stride_out_tok + head[:, None] * stride_out_head
                 + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])
    else:
        part = ((q_start + token).to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + split
        tl.store(part_max_ptr + part, m_i, mask=row_valid)
        tl.store(part_sum_ptr + part, l_i, mask=row_valid)
        tl.store(part_acc_ptr + part[:, None] * HEAD_SIZE + dims[None, :], acc, mask=row_valid[:, None])


@triton.jit
def _combine_splits_kernel(out_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr, stride_out_tok, stride_out_head,
                           NUM_HEADS: tl.constexpr, HEAD_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    part = (token * NUM_HEADS + head) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, HEAD_SIZE)
    m = tl.load(part_max_ptr + part)
    l_split = tl.load(part_sum_ptr + part)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_SIZE + dims[None, :])
    weight = tl.exp(m - tl.max(m, axis=0))
    total = tl.sum(weight * l_split, axis=0)
    out = tl.sum(weight[:, None] * acc, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + token * stride_out_tok + head * stride_out_head + dims, out.to(out_ptr.dtype.element_ty))


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# Defaults from the kernel benchmark on an H200 (benchmarks/results/nvidia-h200/gpu-check): decode reads 128 key slots
# per iteration and splits long contexts until ~2048 programs run (1.19x faster than 64 slots / 512 programs, geometric
# mean over the grid; 1.40x than one 16-slot block per iteration). Prefill (64 query rows per program on a GPU): 32
# slots, the fastest of 16/32/64/128 in 6 of 8 prefill configurations there; under the interpreter (CPU tests) larger
# tiles only save Python work, so 64.
DECODE_TILE_SLOTS = 128
PREFILL_TILE_SLOTS = 32
INTERPRETER_PREFILL_TILE_SLOTS = 64
DEFAULT_TARGET_PROGRAMS = 2048


def default_num_kv_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, block_size: int,
                          target_programs: int = DEFAULT_TARGET_PROGRAMS) -> int:
    """Splits for a decode-only batch: enough programs to fill a large GPU (``target_programs``), each split >= 128
    key slots."""
    programs = num_seqs * num_kv_heads
    if programs >= target_programs:
        return 1
    by_occupancy = triton.next_power_of_2(triton.cdiv(target_programs, programs))
    by_length = max(1, max_seq_len // 128)
    splits = min(by_occupancy, 16, by_length)
    return 1 << (splits.bit_length() - 1)  # power of two: the combine kernel's arange


def head_sparse_paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                block_table: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                                scale: float, span_start: torch.Tensor, span_slots: torch.Tensor, kept: torch.Tensor,
                                offsets: torch.Tensor | None = None, out: torch.Tensor | None = None, *,
                                max_query_len: int | None = None, max_seq_len: int | None = None,
                                num_kv_splits: int | None = None, block_m: int | None = None,
                                tile_slots: int | None = None) -> torch.Tensor:
    """Triton version of :func:`..reference.head_sparse_paged_attention` (same arguments and result). Region cells
    are not bounds-checked on the device: each head's ``[offsets, offsets + kept)`` must lie in the region's
    ``Hkv * span_slots`` cells (and ``kept <= span_slots`` without ``offsets``).

    ``out`` (``[num_tokens, Hq, d]``, may be strided on the first two dims) is written in place when given.
    ``max_query_len`` / ``max_seq_len`` avoid a host sync when passed (CUDA graphs need them passed).
    ``num_kv_splits`` (a power of two) splits the key range per program; default: 1, or
    :func:`default_num_kv_splits` for a decode-only batch on a GPU. ``block_m`` (rows per program = query tokens x
    padded GQA group, a power of two >= 16) defaults to 16 for decode, 64 for prefill on a GPU. ``tile_slots`` (key
    slots read per loop iteration: a power-of-two multiple of the block size) defaults to ``DECODE_TILE_SLOTS`` for
    decode-only batches, ``PREFILL_TILE_SLOTS`` otherwise (on a GPU), or one block where blocks are larger.
    """
    num_tokens, num_heads, head_size = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    num_seqs = seq_lens.shape[0]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if not (_is_power_of_two(head_size) and head_size >= 16 and _is_power_of_two(block_size) and block_size >= 16):
        raise ValueError(f"head_size ({head_size}) and block_size ({block_size}) must be powers of two >= 16")
    if not query.dtype == key_cache.dtype == value_cache.dtype:
        raise ValueError(f"query and caches must share a dtype (tl.dot), got {query.dtype} and {key_cache.dtype}")
    if value_cache.shape != key_cache.shape or key_cache.shape[3] != head_size:
        raise ValueError("key_cache and value_cache must both be [num_blocks, block_size, Hkv, head_size]")
    for name, t in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    for name, t in (("block_table", block_table), ("cu_seqlens_q", cu_seqlens_q), ("seq_lens", seq_lens),
                    ("span_start", span_start), ("span_slots", span_slots), ("kept", kept)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    if block_table.stride(1) != 1 or kept.stride(1) != 1:
        raise ValueError("block_table and kept must be contiguous in their last dimension")
    if offsets is not None:
        if offsets.dtype != torch.int32:
            raise ValueError(f"offsets must be int32, got {offsets.dtype}")
        if offsets.shape != kept.shape or offsets.stride(1) != 1:
            raise ValueError(f"offsets must be [num_seqs, Hkv] like kept ({tuple(kept.shape)}), contiguous in its "
                             f"last dimension, got {tuple(offsets.shape)}")
    if out is None:
        out = torch.empty_like(query)
    if num_tokens == 0:
        return out
    if max_query_len is None:
        max_query_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    queries_per_kv = num_heads // num_kv_heads
    queries_per_kv_padded = triton.next_power_of_2(queries_per_kv)
    if block_m is None:
        prefill_rows = 64 if query.is_cuda and max_query_len > 1 else 16
        block_m = max(prefill_rows, queries_per_kv_padded)
    if not (_is_power_of_two(block_m) and block_m >= max(16, queries_per_kv_padded)):
        raise ValueError(f"block_m ({block_m}) must be a power of two >= max(16, padded GQA group)")
    if num_kv_splits is None:
        # splits fill a GPU; under the interpreter every extra program only costs time
        if max_query_len == 1 and query.is_cuda:
            if max_seq_len is None:
                max_seq_len = int(seq_lens.max())
            num_kv_splits = default_num_kv_splits(num_seqs, num_kv_heads, max_seq_len, block_size)
        else:
            num_kv_splits = 1
    if not _is_power_of_two(num_kv_splits):
        raise ValueError(f"num_kv_splits ({num_kv_splits}) must be a power of two")
    if tile_slots is None:
        prefill_tile = PREFILL_TILE_SLOTS if query.is_cuda else INTERPRETER_PREFILL_TILE_SLOTS
        tile_slots = max(DECODE_TILE_SLOTS if max_query_len == 1 else prefill_tile, block_size)
    if not (tile_slots % block_size == 0 and _is_power_of_two(tile_slots // block_size)):
        raise ValueError(f"tile_slots ({tile_slots}) must be a power-of-two multiple of the block size ({block_size})")

    block_q = block_m // queries_per_kv_padded
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads * num_kv_splits)
    if num_kv_splits > 1:
        part_max = torch.empty(num_tokens, num_heads, num_kv_splits, dtype=torch.float32, device=query.device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty(num_tokens, num_heads, num_kv_splits, head_size, dtype=torch.float32,
                               device=query.device)
    else:
        part_max = part_sum = part_acc = out  # unused
    _head_sparse_attention_kernel[grid](
        query, key_cache, value_cache, out, part_max, part_sum, part_acc,
        block_table, cu_seqlens_q, seq_lens, span_start, span_slots, kept, kept if offsets is None else offsets,
        scale,
        query.stride(0), query.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), out.stride(0), out.stride(1),
        block_table.stride(0), kept.stride(0), 0 if offsets is None else offsets.stride(0),
        NUM_KV_HEADS=num_kv_heads, QUERIES_PER_KV=queries_per_kv, QUERIES_PER_KV_PADDED=queries_per_kv_padded,
        BLOCK_M=block_m, BLOCK_SIZE=block_size, HEAD_SIZE=head_size, NUM_SPLITS=num_kv_splits,
        TILE_BLOCKS=tile_slots // block_size, HAS_OFFSETS=offsets is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
    )
    if num_kv_splits > 1:
        _combine_splits_kernel[(num_tokens, num_heads)](
            out, part_max, part_sum, part_acc, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_SIZE=head_size, NUM_SPLITS=num_kv_splits,
        )
    return out
