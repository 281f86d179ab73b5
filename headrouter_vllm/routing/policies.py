"""Selection policies behind one interface: HeadRouter and the baselines it is compared with.

Every policy maps what the probe measured on one audio span (:class:`SpanProbe`) and a budget to the kept
tokens (:class:`Selection`). Like a kvpress "press", a policy is a scorer plus a budget rule; the engine and
the offline references call the same :func:`select`.

| policy | scores | debias | head weights |
|---|---|---|---|
| ``headrouter`` | mean attention of the rows after the audio | yes | routed from profiles (uniform without) |
| ``oracle`` | as headrouter | yes | the true task's group profile (no input routing) |
| ``coverage`` | as headrouter, then spread over windows (settings per group: profile file) | yes | routed |
| ``fastv`` | the last prompt row's attention | no | uniform |
| ``random`` | seeded permutation | - | - |
| ``uniform`` | evenly spaced tokens | - | - |
| ``similarity`` | drop near-duplicates first (cosine of value vectors, DART-like) | - | - |
| ``region`` | evenly spaced over the windows the request names (``headrouter_focus``) | - | - |

``region`` is the "oracle spread" of the quality benchmark (the windows are the suite's ground truth: where the
speech, the beeps or the event is); served, it lets a client that knows where to listen (a voice activity
detector, a timestamped transcript) say so.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from headrouter_vllm.routing.budgets import per_head_budgets
from headrouter_vllm.routing.profiles import ProfileSet
from headrouter_vllm.routing.router import route
from headrouter_vllm.routing.scores import calibrated_position_prior, debias, fallback_position_prior, selectivity
from headrouter_vllm.routing.select import (
    Coverage,
    select_coverage,
    select_per_head,
    select_region,
    select_shared,
    uniform_indices,
)
from headrouter_vllm.routing.tasks import BUILTIN_TASKS, GROUPS, group_prior, task_prior

POLICIES = ("headrouter", "oracle", "coverage", "fastv", "random", "uniform", "similarity", "region")


@dataclasses.dataclass(frozen=True)
class SpanProbe:
    """What the probe measured on one audio span of N tokens (float32)."""

    head_scores: torch.Tensor  # [Hq, N]: each query head's attention on each audio token, mean over probe rows
    last_row: torch.Tensor  # [Hq, N]: the last prompt row's attention (FastV's signal)
    num_kv_heads: int
    values: torch.Tensor | None = None  # [N, Hkv, d]: value vectors at the probe layer (similarity only)


@dataclasses.dataclass(frozen=True)
class RouteSettings:
    policy: str = "headrouter"
    mode: str = "shared"
    task: str = "auto"
    seed: int = 0
    b_min_fraction: float = 0.0  # per_head: budget bounds as fractions of N
    b_max_fraction: float = 1.0
    b_max: int | None = None  # per_head: an absolute cap (the engine's plan); overrides b_max_fraction
    focus: tuple[tuple[int, int], ...] | None = None  # region: [start, end) token windows of the span


@dataclasses.dataclass
class Selection:
    kept: torch.Tensor  # shared: ascending indices into the span; per_head: the union over KV heads
    per_head: list[torch.Tensor] | None = None  # per_head mode: ascending indices per KV head
    head_weights: torch.Tensor | None = None
    alpha: dict[str, float] | None = None
    margin: float | None = None


def select(probe: SpanProbe, keep: int, settings: RouteSettings, profiles: ProfileSet | None = None) -> Selection:
    """Keep ``keep`` of the span's N tokens (``shared``), or ``keep * G`` KV-head slots in all (``per_head``)."""
    n = probe.head_scores.shape[-1]
    if not 1 <= keep <= n:
        raise ValueError(f"keep must be in [1, {n}], got {keep}")
    if settings.policy not in POLICIES:
        raise ValueError(f"unknown policy {settings.policy!r}; choose one of {POLICIES}")
    if settings.policy in ("headrouter", "oracle", "coverage"):
        return _routed(probe, keep, settings, profiles)
    if settings.mode == "per_head":
        raise ValueError(f"policy {settings.policy!r} has no per-head scores; use mode 'shared'")
    if settings.policy == "fastv":
        kept, margin = select_shared(probe.last_row, keep)
        return Selection(kept, margin=margin)
    if settings.policy == "random":
        gen = torch.Generator().manual_seed(settings.seed)
        return Selection(torch.randperm(n, generator=gen)[:keep].sort().values)
    if settings.policy == "uniform":
        return Selection(uniform_indices(n, keep))
    if settings.policy == "region":
        if settings.focus is None:
            raise ValueError("policy 'region' needs the focus windows (the request's headrouter_focus)")
        return Selection(select_region(n, keep, settings.focus))
    return Selection(_dissimilar(probe, keep))


def _routed(probe: SpanProbe, keep: int, settings: RouteSettings, profiles: ProfileSet | None) -> Selection:
    n = probe.head_scores.shape[-1]
    if profiles is not None and profiles.position_prior is not None:
        prior = calibrated_position_prior(profiles.position_prior, n)
    else:
        prior = fallback_position_prior(probe.head_scores)
    scores = debias(probe.head_scores, prior)
    weights, alpha = None, None
    if profiles is not None:
        if settings.policy == "oracle":
            group = settings.task if settings.task in GROUPS else BUILTIN_TASKS.get(settings.task)
            if group is None:
                group = max(profiles.tasks.get(settings.task, {"mixed": 1.0}).items(), key=lambda kv: kv[1])[0]
            alpha = group_prior(group, weight=1.0)
            weights = profiles.profiles[group].weights.float()
        else:
            alpha, weights = route(selectivity(scores), profiles.profiles,
                                   task_prior(settings.task, profiles.tasks), profiles.tau)
    if settings.policy == "coverage":
        if settings.mode != "shared":
            raise ValueError("policy 'coverage' has no per-head mode; use mode 'shared'")
        w = weights if weights is not None else torch.full((scores.shape[0],), 1.0 / scores.shape[0])
        params = Coverage()
        if profiles is not None and profiles.coverage:
            params = Coverage.mix(profiles.coverage, alpha or {})
        kept = select_coverage((w.float()[:, None] * scores.float()).sum(dim=0), keep, params.segments, params.floor)
        return Selection(kept, head_weights=weights, alpha=alpha)
    if settings.mode == "shared":
        kept, margin = select_shared(scores, keep, weights)
        return Selection(kept, head_weights=weights, alpha=alpha, margin=margin)
    num_kv = probe.num_kv_heads
    q_weights = weights if weights is not None else torch.full((scores.shape[0],), 1.0 / scores.shape[0])
    kv_weights = q_weights.view(num_kv, -1).sum(dim=1)
    b_min = min(keep, int(settings.b_min_fraction * n))
    b_max = settings.b_max if settings.b_max is not None else min(n, math.ceil(settings.b_max_fraction * n))
    b_max = max(keep, min(n, b_max))
    budgets = per_head_budgets(kv_weights, keep * num_kv, b_min, b_max)
    per_head = select_per_head(scores, budgets, weights)
    union = torch.unique(torch.cat(per_head)) if per_head else torch.empty(0, dtype=torch.long)
    return Selection(union, per_head=per_head, head_weights=weights, alpha=alpha)


def _dissimilar(probe: SpanProbe, keep: int) -> torch.Tensor:
    """Duplicate removal (DART-like): start from the pivot with the largest value-vector L1 norm, then repeatedly
    add the token least similar (cosine of value vectors) to everything kept so far. Near-duplicates of kept
    tokens are therefore the last to be kept. O(keep * N * d)."""
    if probe.values is None:
        raise ValueError("the similarity policy needs the probe layer's value vectors")
    v = probe.values.float().reshape(probe.values.shape[0], -1)
    n = v.shape[0]
    if keep >= n:
        return torch.arange(n)
    unit = torch.nn.functional.normalize(v, dim=1)
    chosen = torch.zeros(n, dtype=torch.bool)
    pivot = int(torch.argmax(v.abs().sum(dim=1)))
    closest = torch.full((n,), float("-inf"))
    for _ in range(keep):
        chosen[pivot] = True
        closest = torch.maximum(closest, unit @ unit[pivot])
        closest[chosen] = float("inf")
        pivot = int(torch.argmin(closest))
    return torch.nonzero(chosen).flatten()
