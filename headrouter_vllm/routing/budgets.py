"""``per_head`` budgets: how many audio tokens each KV head keeps."""

from __future__ import annotations

import torch


def per_head_budgets(kv_weights: torch.Tensor, total: int, b_min: int, b_max: int) -> torch.Tensor:
    """Integer budgets ``[G]`` proportional to ``kv_weights``, each in ``[b_min, b_max]``, summing to ``total``.

    Proportional shares are clamped to the bounds and the scale is found by bisection so the clamped shares
    sum to ``total``; rounding then hands the remainder to the largest fractional parts (ties: lower index).
    """
    g = kv_weights.numel()
    if not 0 <= b_min <= b_max:
        raise ValueError(f"need 0 <= b_min <= b_max, got {b_min}, {b_max}")
    if not g * b_min <= total <= g * b_max:
        raise ValueError(f"total {total} is outside [{g * b_min}, {g * b_max}] for {g} heads")
    w = kv_weights.double().clamp_min(0.0)
    w = w + 1e-12 if float(w.sum()) == 0.0 else w

    def shares(scale: float) -> torch.Tensor:
        return (w * scale).clamp(b_min, b_max)

    lo, hi = 0.0, 1.0
    while float(shares(hi).sum()) < total:
        hi *= 2.0
        if hi > 1e300:
            break
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(shares(mid).sum()) < total else (lo, mid)
    exact = shares(hi)
    budgets = exact.floor().long().clamp(b_min, b_max)
    remainder = total - int(budgets.sum())
    order = sorted(range(g), key=lambda i: (-(float(exact[i]) - int(budgets[i])), i))
    while remainder != 0:
        step = 1 if remainder > 0 else -1
        for i in order if step > 0 else reversed(order):
            if remainder == 0:
                break
            if b_min <= int(budgets[i]) + step <= b_max:
                budgets[i] += step
                remainder -= step
    return budgets
