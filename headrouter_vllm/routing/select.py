"""Choosing the kept audio tokens from probe scores."""

from __future__ import annotations

import torch


def select_shared(head_scores: torch.Tensor, keep: int,
                  head_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, float | None]:
    """``shared`` selection: one kept set for every head.

    Args:
        head_scores: ``[num_heads, N]`` attention mass of each query head on each audio token, averaged
            over the probe's query rows.
        keep: how many of the N tokens to keep (1 <= keep <= N).
        head_weights: ``[num_heads]`` routed head weights summing to 1; ``None`` = uniform.

    Returns:
        The kept token indices in ascending order, and the score margin at the top-K boundary (how far
        the last kept token is above the first dropped one; ``None`` when nothing is dropped).
    """
    num_heads, n = head_scores.shape
    if not 1 <= keep <= n:
        raise ValueError(f"keep must be in [1, {n}], got {keep}")
    if head_weights is None:
        score = head_scores.float().mean(dim=0)
    else:
        score = (head_weights.float()[:, None] * head_scores.float()).sum(dim=0)
    top = torch.topk(score, min(keep + 1, n))
    kept = top.indices[:keep].sort().values
    margin = float(top.values[keep - 1] - top.values[keep]) if keep < n else None
    return kept, margin
