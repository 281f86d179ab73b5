"""Probe scores: per query head, the attention mass that a few query rows put on chosen key columns."""

from __future__ import annotations

import torch


def probe_scores(query: torch.Tensor, keys: torch.Tensor, query_positions: torch.Tensor,
                 columns: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax attention of ``query`` rows over ``keys``, summed over rows, at ``columns``.

    Args:
        query: ``[R, Hq, d]`` post-RoPE query rows.
        keys: ``[T, Hkv, d]`` post-RoPE keys of positions ``0..T-1`` (``Hq`` a multiple of ``Hkv``: GQA).
        query_positions: ``[R]`` position of each row; row r sees keys ``<= query_positions[r]``.
        columns: ``[C]`` key positions whose probability is returned.
        scale: softmax scale (the layer's, usually ``d ** -0.5``).

    Returns:
        ``[Hq, C]`` float32: sum over the R rows of ``softmax(q k^T * scale)`` at the columns.
    """
    num_heads, num_kv_heads = query.shape[1], keys.shape[1]
    k = keys.float().repeat_interleave(num_heads // num_kv_heads, dim=1)
    logits = torch.einsum("rhd,thd->hrt", query.float(), k) * scale
    future = torch.arange(keys.shape[0], device=keys.device)[None, :] > query_positions[:, None]
    logits.masked_fill_(future[None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return probs[:, :, columns].sum(dim=1)


def paged_probe_scores(query: torch.Tensor, cu_rows: torch.Tensor, row_positions: torch.Tensor,
                       key_cache: torch.Tensor, block_table: torch.Tensor, span_start: torch.Tensor,
                       span_len: torch.Tensor, scale: float, max_span_len: int | None = None) -> torch.Tensor:
    """:func:`probe_scores` over a paged key cache, for several sequences at once, on each sequence's audio span.

    Args:
        query: ``[R, Hq, d]`` post-RoPE query rows; those of sequence s are ``cu_rows[s]:cu_rows[s+1]``.
        cu_rows: int32 ``[num_seqs + 1]``.
        row_positions: int32 ``[R]``: row r sees the key slots ``<= row_positions[r]`` of its sequence.
        key_cache: ``[num_blocks, block_size, Hkv, d]`` (may be a strided view); block_table: int32
            ``[num_seqs, max_blocks]``.
        span_start, span_len: int32 ``[num_seqs]``: the columns are slots ``span_start .. span_start + span_len - 1``.
        scale: softmax scale.
        max_span_len: width of the result (default: ``span_len.max()``).

    Returns:
        ``[num_seqs, Hq, max_span_len]`` float32: per sequence, the probability mass of each query head on each
        span key, summed over that sequence's rows (softmax over all keys ``0..position``); 0 past ``span_len``.
    """
    if max_span_len is None:
        max_span_len = int(span_len.max()) if span_len.numel() else 0
    block_size = key_cache.shape[1]
    out = torch.zeros(block_table.shape[0], query.shape[1], max_span_len, dtype=torch.float32, device=query.device)
    cu = cu_rows.tolist()
    for s in range(block_table.shape[0]):
        rows = slice(cu[s], cu[s + 1])
        if cu[s] == cu[s + 1] or int(span_len[s]) == 0:
            continue
        positions = row_positions[rows].long()
        slots = torch.arange(int(positions.max()) + 1, device=key_cache.device)
        keys = key_cache[block_table[s].long()[slots // block_size], slots % block_size]  # only slots <= positions
        columns = torch.arange(int(span_start[s]), int(span_start[s]) + int(span_len[s]), device=query.device)
        columns = columns[columns < keys.shape[0]]  # span keys that no row can see get 0
        out[s, :, :columns.numel()] = probe_scores(query[rows], keys, positions, columns, scale)
    return out
