"""The baselines HeadRouter is compared with: one kept set for every head, no routing."""

from __future__ import annotations

import torch

from headrouter_vllm.routing.policies.base import Policy, RouteSettings, Selection, SpanProbe
from headrouter_vllm.routing.profiles import ProfileSet
from headrouter_vllm.routing.select import select_region, select_shared, uniform_indices


def select_fastv(probe: SpanProbe, keep: int, settings: RouteSettings, profiles: ProfileSet | None) -> Selection:
    """FastV: the top-K of the last prompt row's attention, all heads equal, no debiasing."""
    kept, margin = select_shared(probe.last_row, keep)
    return Selection(kept, margin=margin)


def select_random(probe: SpanProbe, keep: int, settings: RouteSettings, profiles: ProfileSet | None) -> Selection:
    gen = torch.Generator().manual_seed(settings.seed)
    return Selection(torch.randperm(probe.head_scores.shape[-1], generator=gen)[:keep].sort().values)


def select_uniform(probe: SpanProbe, keep: int, settings: RouteSettings, profiles: ProfileSet | None) -> Selection:
    return Selection(uniform_indices(probe.head_scores.shape[-1], keep))


def select_region_focus(probe: SpanProbe, keep: int, settings: RouteSettings,
                        profiles: ProfileSet | None) -> Selection:
    if settings.focus is None:
        raise ValueError("policy 'region' needs the focus windows (the request's headrouter_focus)")
    return Selection(select_region(probe.head_scores.shape[-1], keep, settings.focus))


def select_dissimilar(probe: SpanProbe, keep: int, settings: RouteSettings,
                      profiles: ProfileSet | None) -> Selection:
    """Duplicate removal (DART-like): start from the pivot with the largest value-vector L1 norm, then repeatedly
    add the token least similar (cosine of value vectors) to everything kept so far. Near-duplicates of kept
    tokens are therefore the last to be kept. O(keep * N * d)."""
    if probe.values is None:
        raise ValueError("the similarity policy needs the probe layer's value vectors")
    v = probe.values.float().reshape(probe.values.shape[0], -1)
    n = v.shape[0]
    if keep >= n:
        return Selection(torch.arange(n))
    unit = torch.nn.functional.normalize(v, dim=1)
    chosen = torch.zeros(n, dtype=torch.bool)
    pivot = int(torch.argmax(v.abs().sum(dim=1)))
    closest = torch.full((n,), float("-inf"))
    for _ in range(keep):
        chosen[pivot] = True
        closest = torch.maximum(closest, unit @ unit[pivot])
        closest[chosen] = float("inf")
        pivot = int(torch.argmin(closest))
    return Selection(torch.nonzero(chosen).flatten())


FASTV = Policy("fastv", select_fastv, "the last prompt row's attention, top-K (FastV)")
RANDOM = Policy("random", select_random, "a seeded random subset")
UNIFORM = Policy("uniform", select_uniform, "evenly spaced tokens")
SIMILARITY = Policy("similarity", select_dissimilar, "near-duplicates dropped first (cosine of value vectors)",
                    needs_values=True)
REGION = Policy("region", select_region_focus, "evenly spaced over the windows the request names",
                needs_focus=True)
