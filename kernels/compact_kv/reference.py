"""KV compaction in plain torch (the semantics of the Triton kernel and its test oracle).

After the prompt step of a routed request, in one layer, per sequence s, in place:

* audio: KV head g's kept slots ``kept_slots[s, g, :count]`` (ascending absolute slot indices inside
  ``[span_start, span_start + span_len)``, read from head g's column, padded with -1) move to the cells
  ``[offsets[s, g], offsets[s, g] + count)`` of the new region ``[span_start, span_start + region_slots[s])``,
  whose ``Hkv * region_slots`` cells are numbered column by column (cell c: column ``c // region_slots``, slot
  ``span_start + c % region_slots``), the layout the head-sparse attention kernel reads;
* suffix: the slots ``[span_start + span_len, total_len)`` move, in every column, to start at
  ``span_start + region_slots``.

Defaults (``region_slots`` and ``offsets`` omitted): ``region_slots = b_max = kept_slots.shape[-1]`` and
``offsets = g * b_max``, each head's kept slots at the front of its own column (the skip layout). Passing the running
sum of the counts as ``offsets`` packs the heads one after another (phase B), so the region needs only the mean
count in slots. Cells no head was given and everything at or past the new length
``total_len - span_len + region_slots`` are left as they were (stale; never read by the attention kernels).
"""

from __future__ import annotations

import torch

from ..head_sparse_paged_attention.reference import region_cells


def head_moves(span_start: int, span_len: int, total_len: int, kept_slots: torch.Tensor, kv_head: int,
               region_slots: int, offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(source slots, destination slots, destination columns) of one (sequence, KV head); sources are in the
    head's own column."""
    kept = kept_slots[kept_slots >= 0].long().cpu()
    if region_slots > span_len or region_slots < 0:
        raise ValueError(f"region_slots ({region_slots}) must be in [0, span_len {span_len}]")
    cell_slots, cell_columns = region_cells(offset + torch.arange(kept.numel()), span_start, region_slots)
    suffix = torch.arange(span_start + span_len, total_len)
    src = torch.cat([kept, suffix])
    dst = torch.cat([cell_slots, suffix - span_len + region_slots])
    columns = torch.cat([cell_columns, torch.full_like(suffix, kv_head)])
    return src, dst, columns


def compact_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
               span_start: torch.Tensor, span_len: torch.Tensor, total_len: torch.Tensor,
               kept_slots: torch.Tensor, region_slots: torch.Tensor | None = None,
               offsets: torch.Tensor | None = None) -> None:
    """Compact each sequence's audio span per KV head and move its suffix down, in place.

    Args:
        key_cache, value_cache: ``[num_blocks, block_size, Hkv, d]`` (may be strided views of one tensor).
        block_table: int32 ``[num_seqs, max_blocks]``.
        span_start, span_len: int32 ``[num_seqs]``: the audio span ``[span_start, span_start + span_len)``.
        total_len: int32 ``[num_seqs]``: KV length before compaction (span and suffix included).
        kept_slots: int32 ``[num_seqs, Hkv, W]``: ascending kept slot indices per head, -1 padded.
        region_slots: int32 ``[num_seqs]``: slots of the compacted region (default: ``W`` for every sequence).
        offsets: int32 ``[num_seqs, Hkv]``: each head's first cell in the region (default: ``g * region_slots``).
    """
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    width = kept_slots.shape[-1]
    for s in range(block_table.shape[0]):
        blocks = block_table[s].long()
        slots_s = width if region_slots is None else int(region_slots[s])
        moves = []
        for g in range(num_kv_heads):
            offset = g * slots_s if offsets is None else int(offsets[s, g])
            count = int((kept_slots[s, g] >= 0).sum())
            if offset < 0 or offset + count > num_kv_heads * slots_s:
                raise ValueError(f"head {g}'s cells [{offset}, {offset + count}) are outside the region's "
                                 f"{num_kv_heads} x {slots_s} cells")
            moves.append(head_moves(int(span_start[s]), int(span_len[s]), int(total_len[s]), kept_slots[s, g], g,
                                    slots_s, offset))
        for cache in (key_cache, value_cache):  # gather every head's moves, then scatter: moves cross columns
            rows = []
            for g, (src, _, _) in enumerate(moves):
                src = src.to(blocks.device)
                rows.append(cache[blocks[src // block_size], src % block_size, g].clone())
            for (_, dst, columns), row in zip(moves, rows, strict=True):
                dst = dst.to(blocks.device)
                cache[blocks[dst // block_size], dst % block_size, columns.to(blocks.device)] = row
