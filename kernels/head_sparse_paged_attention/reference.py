"""Head-sparse paged attention in plain torch: the semantics of the Triton kernel and its test oracle.

Like vLLM's unified paged attention (causal, GQA, varlen queries over a paged KV cache), plus a per-sequence audio
*region* ``[span_start, span_start + span_slots)`` that the KV heads read in their own way.

The region's ``Hkv * span_slots`` cells are numbered column by column: cell ``c`` is KV-head column
``c // span_slots`` of slot ``span_start + c % span_slots``. KV head g of sequence s reads the region's cells
``[offsets[s, g], offsets[s, g] + kept[s, g])``, in that order, and every slot outside the region from its own
column. Two layouts are this one rule:

* **skip** (``offsets`` omitted: ``g * span_slots``): each head reads its own column's first ``kept`` slots and
  skips the rest of the region (``kept <= span_slots``);
* **packed** (phase B): the heads' kept keys are packed one after another (``offsets`` = the running sum of
  ``kept``), so a head keeping more than ``span_slots`` spills into the next column and the region needs only the
  *mean* budget in slots.

A key is visible to a query at position p when the slot it is stored in is ``<= p``. Only the cells and slots a head
reads are gathered, so poisoned (NaN) unread cells, slots and blocks are never touched.
"""

from __future__ import annotations

import torch


def region_cells(cells: torch.Tensor, span_start: int, span_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots, KV-head columns) of region cells: cell c is column ``c // span_slots`` of slot
    ``span_start + c % span_slots``."""
    per_column = max(span_slots, 1)
    return span_start + cells % per_column, cells // per_column


def head_cells(seq_len: int, span_start: int, span_slots: int, kv_head: int, kept: int,
               offset: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots, columns) that KV head ``kv_head`` reads, in order: the slots before the region, its ``kept`` region
    cells from ``offset`` (default: its own column, ``kv_head * span_slots``), the slots after the region; only
    slots ``< seq_len`` (a sequence may end inside its region)."""
    slots = torch.arange(seq_len)
    columns = torch.full_like(slots, kv_head)
    if span_slots <= 0:
        return slots, columns
    if offset is None:
        offset = kv_head * span_slots
    cell_slots, cell_columns = region_cells(torch.arange(offset, offset + kept), span_start, span_slots)
    slots = torch.cat([slots[:span_start], cell_slots, slots[span_start + span_slots:]])
    columns = torch.cat([columns[:span_start], cell_columns, columns[span_start + span_slots:]])
    inside = slots < seq_len
    return slots[inside], columns[inside]


def gather_slots(cache: torch.Tensor, block_ids: torch.Tensor, slots: torch.Tensor,
                 columns: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of a paged cache ``[num_blocks, block_size, ...]`` at token slots of one sequence (and, with
    ``columns``, of a ``[num_blocks, block_size, Hkv, d]`` cache: the KV-head column of each slot)."""
    block_size = cache.shape[1]
    slots = slots.to(cache.device)
    blocks = block_ids.to(cache.device).long()[slots // block_size]
    if columns is None:
        return cache[blocks, slots % block_size]
    return cache[blocks, slots % block_size, columns.to(cache.device)]


def head_sparse_paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                block_table: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                                scale: float, span_start: torch.Tensor, span_slots: torch.Tensor,
                                kept: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Causal paged attention where KV head g of sequence s reads its ``kept[s, g]`` region cells from
    ``offsets[s, g]`` (see the module docstring; default: the skip layout).

    Args:
        query: ``[num_tokens, Hq, d]``; the tokens of sequence s are rows ``cu_seqlens_q[s]:cu_seqlens_q[s+1]``.
        key_cache, value_cache: ``[num_blocks, block_size, Hkv, d]`` (may be strided views).
        block_table: int32 ``[num_seqs, max_blocks]``; slot p of sequence s is in block ``block_table[s, p // bs]``.
        cu_seqlens_q: int32 ``[num_seqs + 1]``.
        seq_lens: int32 ``[num_seqs]``, KV length including this step's tokens; query i of a sequence with
            q_len tokens has position ``seq_len - q_len + i`` and sees the slots ``<=`` it.
        scale: softmax scale.
        span_start, span_slots: int32 ``[num_seqs]`` (``span_slots == 0``: no region, every slot read).
        kept: int32 ``[num_seqs, Hkv]``: region cells each head reads.
        offsets: int32 ``[num_seqs, Hkv]``: each head's first region cell, or None (``g * span_slots``).

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
            offset = None if offsets is None else int(offsets[s, g])
            slots, columns = head_cells(seq_len, int(span_start[s]), int(span_slots[s]), g, int(kept[s, g]), offset)
            k = gather_slots(key_cache, block_table[s], slots, columns).float()
            v = gather_slots(value_cache, block_table[s], slots, columns).float()
            heads = slice(g * group, (g + 1) * group)
            logits = torch.einsum("qhd,kd->hqk", q[:, heads], k) * scale
            visible = slots.to(query.device)[None, :] <= positions[:, None]
            logits = logits.masked_fill(~visible[None], float("-inf"))
            probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows that see nothing: 0
            out[cu[s]:cu[s + 1], heads] = torch.einsum("hqk,kd->qhd", probs, v).to(query.dtype)
    return out
