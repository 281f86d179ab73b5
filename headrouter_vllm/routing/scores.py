"""Probe-score transforms: position debiasing and per-head selectivity.

The paper confirms *that* probing is position-debiased and routing is driven by per-head selectivity, not
*how* (see docs/algorithm.md); the formulas here are our reconstruction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-12


def fallback_position_prior(head_scores: torch.Tensor, window_fraction: float = 0.125) -> torch.Tensor:
    """Built-in position prior when no calibrated one exists: this input's head-mean attention along the span,
    smoothed over a window of ``window_fraction * N`` tokens. It follows the slow trend (e.g. mass piling up
    at the span's tail) and not the local peaks, so dividing by it flattens the trend and keeps the peaks.
    Returns ``[N]``, positive."""
    n = head_scores.shape[-1]
    trend = head_scores.float().mean(dim=0)
    width = max(1, int(n * window_fraction)) | 1  # odd, so the window is centred
    if width > 1:
        pad = width // 2
        trend = F.avg_pool1d(F.pad(trend[None, None], (pad, pad), mode="replicate"), width, stride=1)[0, 0]
    return trend.clamp_min(EPS)


def calibrated_position_prior(bins: torch.Tensor, n: int) -> torch.Tensor:
    """A calibrated prior ``[Hq, B]`` over relative position bins, read at the N token positions: ``[Hq, N]``."""
    num_bins = bins.shape[-1]
    index = ((torch.arange(n, dtype=torch.float64) + 0.5) * num_bins / n).long().clamp_max(num_bins - 1)
    return bins.float()[:, index].clamp_min(EPS)


def debias(head_scores: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """Divide each head's scores by the position prior (``[N]`` or ``[Hq, N]``) and rescale each head back to
    its own total mass, so the debiased scores keep how much each head attends to audio."""
    scores = head_scores.float()
    flat = scores / prior
    return flat * (scores.sum(dim=-1, keepdim=True) / flat.sum(dim=-1, keepdim=True).clamp_min(EPS))


def selectivity(head_scores: torch.Tensor) -> torch.Tensor:
    """The input's head-behaviour vector ``[Hq]``: (1 - normalised entropy of the head's attention over the
    span) x (the head's audio mass relative to the most audio-attentive head). High for heads that attend to
    audio and to a few tokens of it."""
    mass = head_scores.float().sum(dim=-1)
    return focus(head_scores) * mass / mass.max().clamp_min(EPS)


def focus(head_scores: torch.Tensor) -> torch.Tensor:
    """``[Hq]``: 1 - the normalised entropy of each head's attention over the span (1 for N = 1)."""
    scores = head_scores.float()
    mass = scores.sum(dim=-1)
    n = scores.shape[-1]
    if n == 1:
        return torch.ones_like(mass)
    p = scores / mass[:, None].clamp_min(EPS)
    entropy = -(p * p.clamp_min(EPS).log()).sum(dim=-1)
    return (1.0 - entropy / torch.log(torch.tensor(float(n)))).clamp_min(0.0)
