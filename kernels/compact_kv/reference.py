"""KV compaction in plain torch (the semantics of the Triton kernel and its test oracle).

After the prompt step of a routed request, in one layer, per (sequence s, KV head g), in place:

* audio: the head's kept slots ``kept_slots[s, g, :count]`` (ascending absolute slot indices inside
  ``[span_start, span_start + span_len)``, padded with -1) move to ``[span_start, span_start + count)``;
* suffix: the slots ``[span_start + span_len, total_len)`` move to start at ``span_start + b_max``
  (``b_max = kept_slots.shape[-1]``, the same for every head).

Slots ``[span_start + count, span_start + b_max)`` and everything at or past the new length
``total_len - span_len + b_max`` are left as they were (stale; never read by the head-sparse kernels).
"""

from __future__ import annotations

import torch


def compaction_moves(span_start: int, span_len: int, total_len: int, kept_slots: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(source slots, destination slots) of one (sequence, KV head); ``kept_slots`` is its ``[b_max]`` row."""
    b_max = kept_slots.shape[-1]
    if span_len < b_max:
        raise ValueError(f"b_max ({b_max}) exceeds the span length ({span_len})")
    kept = kept_slots[kept_slots >= 0].long().cpu()
    suffix = torch.arange(span_start + span_len, total_len)
    src = torch.cat([kept, suffix])
    dst = torch.cat([span_start + torch.arange(kept.numel()), suffix - span_len + b_max])
    return src, dst


def compact_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
               span_start: torch.Tensor, span_len: torch.Tensor, total_len: torch.Tensor,
               kept_slots: torch.Tensor) -> None:
    """Compact each sequence's audio span per KV head and move its suffix down, in place.

    Args:
        key_cache, value_cache: ``[num_blocks, block_size, Hkv, d]`` (may be strided views of one tensor).
        block_table: int32 ``[num_seqs, max_blocks]``.
        span_start, span_len: int32 ``[num_seqs]``: the audio span ``[span_start, span_start + span_len)``.
        total_len: int32 ``[num_seqs]``: KV length before compaction (span and suffix included).
        kept_slots: int32 ``[num_seqs, Hkv, b_max]``: ascending kept slot indices per head, -1 padded.
    """
    block_size = key_cache.shape[1]
    for s in range(block_table.shape[0]):
        blocks = block_table[s].long()
        for g in range(key_cache.shape[2]):
            src, dst = compaction_moves(int(span_start[s]), int(span_len[s]), int(total_len[s]), kept_slots[s, g])
            src, dst = src.to(blocks.device), dst.to(blocks.device)
            for cache in (key_cache, value_cache):
                rows = cache[blocks[src // block_size], src % block_size, g].clone()  # gather everything, then scatter
                cache[blocks[dst // block_size], dst % block_size, g] = rows
