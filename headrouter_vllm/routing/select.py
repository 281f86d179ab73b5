"""Choosing the kept audio tokens from probe scores."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch


@dataclasses.dataclass(frozen=True)
class Coverage:
    """Settings of :func:`select_coverage`. ``floor`` 1.0 spreads by length only (exactly ``uniform``); 0.0 spreads
    by the score mass only. The profile file holds one per task group, tuned on validation clips."""

    segments: int = 8
    floor: float = 0.5

    def __post_init__(self):
        if not isinstance(self.segments, int) or isinstance(self.segments, bool) or self.segments < 1:
            raise ValueError(f"coverage segments must be a positive integer, got {self.segments!r}")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"coverage floor must be in [0, 1], got {self.floor!r}")

    @staticmethod
    def mix(by_group: dict[str, Coverage], alpha: dict[str, float]) -> Coverage:
        """The routed mixture: floor is alpha-weighted, segments come from the group with the largest weight."""
        total = sum(alpha.get(g, 0.0) for g in by_group) or 1.0
        floor = sum(alpha.get(g, 0.0) * c.floor for g, c in by_group.items()) / total
        top = max(by_group, key=lambda g: alpha.get(g, 0.0))
        return Coverage(by_group[top].segments, min(1.0, max(0.0, floor)))


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


def select_coverage(score: torch.Tensor, keep: int, segments: int = 8, floor: float = 0.5) -> torch.Tensor:
    """Coverage-aware ``shared`` selection: the span is cut into ``segments`` equal windows; each window's budget
    is ``floor`` of the tokens spread by length plus the rest by the window's share of the (non-negative) score
    mass; inside a window the kept tokens are evenly spaced. Top-K on a smooth score keeps contiguous clumps and
    loses the rest of the clip; this keeps every part covered and puts more tokens where the score is.
    Returns ascending indices (exactly ``keep``)."""
    n = score.numel()
    if not 1 <= keep <= n:
        raise ValueError(f"keep must be in [1, {n}], got {keep}")
    if floor >= 1.0:  # spread by length alone: every-k-th token
        return uniform_indices(n, keep)
    segments = max(1, min(segments, keep))
    edges = torch.linspace(0, n, segments + 1, dtype=torch.float64).round().long()
    lengths = edges[1:] - edges[:-1]
    cum = torch.cat([score.new_zeros(1, dtype=torch.float64), score.double().clamp_min(0).cumsum(0)])
    mass = cum[edges[1:]] - cum[edges[:-1]]
    share = mass / mass.sum() if float(mass.sum()) > 0 else lengths.double() / n
    want = keep * (floor * lengths.double() / n + (1 - floor) * share)
    budgets = torch.minimum(want.floor().long(), lengths)
    while int(budgets.sum()) < keep:  # largest remainder first, never past a window's length
        room = budgets < lengths
        gap = torch.where(room, want - budgets.double(), torch.full_like(want, -float("inf")))
        budgets[int(torch.argmax(gap))] += 1
    kept = [edges[i] + ((torch.arange(int(b), dtype=torch.float64) + 0.5) * int(lengths[i]) / int(b)).floor().long()
            for i, b in enumerate(budgets.tolist()) if b]
    return torch.cat(kept)


def select_region(n: int, keep: int, windows: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """The ``region`` policy: ``keep`` tokens evenly spaced over the tokens inside ``windows`` (``[start, end)``
    token ranges, clamped to the span, overlaps merged); when the windows hold fewer than ``keep`` tokens, all of
    them plus the rest evenly spaced over the tokens outside. Windows that miss the span: evenly spaced over all
    of it (``uniform``). Returns ascending indices (exactly ``keep``)."""
    if not 1 <= keep <= n:
        raise ValueError(f"keep must be in [1, {n}], got {keep}")
    inside = torch.zeros(n, dtype=torch.bool)
    for start, end in windows:
        inside[max(0, start):max(0, min(n, end))] = True
    focus, rest = torch.nonzero(inside).flatten(), torch.nonzero(~inside).flatten()
    if keep <= focus.numel():
        return focus[uniform_indices(focus.numel(), keep)]
    return torch.cat([focus, rest[uniform_indices(rest.numel(), keep - focus.numel())]]).sort().values


def uniform_indices(n: int, keep: int) -> torch.Tensor:
    """``keep`` evenly spaced indices in ``[0, n)``: the centre of each of ``keep`` equal segments."""
    return ((torch.arange(keep, dtype=torch.float64) + 0.5) * n / keep).floor().long().clamp_max(n - 1)


def top_k_indices(score: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` highest-scoring indices, ascending."""
    return torch.topk(score, keep).indices.sort().values


def select_per_head(head_scores: torch.Tensor, budgets: torch.Tensor, head_weights: torch.Tensor | None = None,
                    pick: Callable[[torch.Tensor, int], torch.Tensor] = top_k_indices) -> list[torch.Tensor]:
    """``per_head`` selection: KV head g keeps ``pick(score_g, budgets[g])`` (its own top-K, or a coverage spread),
    ``score_g`` the weighted sum of the query heads that share it (GQA). Returns one ascending index tensor per KV
    head."""
    num_heads, n = head_scores.shape
    num_kv = budgets.numel()
    group = num_heads // num_kv
    weights = torch.full((num_heads,), 1.0 / num_heads) if head_weights is None else head_weights.float()
    per_query = weights[:, None] * head_scores.float()
    kept = []
    for g in range(num_kv):
        rows = slice(g * group, (g + 1) * group)
        score = per_query[rows].sum(dim=0)
        if float(weights[rows].sum()) == 0.0:  # a head the router switched off still ranks by attention
            score = head_scores[rows].float().mean(dim=0)
        b = int(budgets[g])
        kept.append(pick(score, b) if b else torch.empty(0, dtype=torch.long))
    return kept
