"""Head-sparse paged attention in plain torch: the semantics of the Triton kernel and its test oracle.

Like vLLM's unified paged attention (causal, GQA, varlen queries over a paged KV cache), plus a per
(sequence, KV head) skipped range of key slots: ``[span_start + kept[s, g], span_start + span_slots[s])``.
Only the slots a head attends to are gathered, so poisoned (NaN) skipped or unused slots are never read.
"""

from __future__ import annotations

import torch


def visible_slots(seq_len: int, span_start: int, span_slots: int, kept: int) -> torch.Tensor:
    """Key slots ``0..seq_len-1`` that one KV head attends to (the skipped range removed), ascending."""
    slots = torch.arange(seq_len)
    if span_slots <= 0:
        return slots
    skipped = (slots >= span_start + kept) & (slots < span_start + span_slots)
    return slots[~skipped]


def gather_slots(cache: torch.Tensor, block_ids: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows of a paged cache ``[num_blocks, block_size, ...]`` at token slots of one sequence."""
    block_size = cache.shape[1]
    slots = slots.to(cache.device)
    return cache[block_ids.to(cache.device).long()[slots // block_size], slots % block_size]


def head_sparse_paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                block_table: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                                scale: float, span_start: torch.Tensor, span_slots: torch.Tensor,
                                kept: torch.Tensor) -> torch.Tensor:
    """Causal paged attention; KV head g of sequence s skips ``[span_start + kept[s, g], span_start + span_slots)``.

    Args:
        query: ``[num_tokens, Hq, d]``; the tokens of sequence s are rows ``cu_seqlens_q[s]:cu_seqlens_q[s+1]``.
        key_cache, value_cache: ``[num_blocks, block_size, Hkv, d]`` (may be strided views).
        block_table: int32 ``[num_seqs, max_blocks]``; slot p of sequence s is in block ``block_table[s, p // bs]``.
        cu_seqlens_q: int32 ``[num_seqs + 1]``.
        seq_lens: int32 ``[num_seqs]``, KV length including this step's tokens; query i of a sequence with
            q_len tokens has position ``seq_len - q_len + i`` and sees the slots ``<=`` it.
        scale: softmax scale.
        span_start, span_slots: int32 ``[num_seqs]`` (``span_slots == 0``: nothing skipped).
        kept: int32 ``[num_seqs, Hkv]``.

    Returns:
        ``[num_tokens, Hq, d]`` in the query's dtype. A row that sees no key at all is 0.
    """
    num_heads, num_kv_heads = query.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros_like(query)
    cu = cu_seqlens_q.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        q = query[cu[s]:cu[s + 1]].float()
        q_len = q.shape[0]
        if q_len == 0:
            continue
        positions = torch.arange(seq_len - q_len, seq_len, device=query.device)
        for g in range(num_kv_heads):
            slots = visible_slots(seq_len, int(span_start[s]), int(span_slots[s]), int(kept[s, g]))
            k = gather_slots(key_cache[:, :, g], block_table[s], slots).float()
            v = gather_slots(value_cache[:, :, g], block_table[s], slots).float()
            heads = slice(g * group, (g + 1) * group)
            logits = torch.einsum("qhd,kd->hqk", q[:, heads], k) * scale
            visible = slots.to(query.device)[None, :] <= positions[:, None]
            logits = logits.masked_fill(~visible[None], float("-inf"))
            probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows that see nothing: 0
            out[cu[s]:cu[s + 1], heads] = torch.einsum("hqk,kd->qhd", probs, v).to(query.dtype)
    return out
