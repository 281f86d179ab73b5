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
