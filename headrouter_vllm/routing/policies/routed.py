"""The routed policies: the probe rows' attention, debiased by the position prior, weighted per head by the
router (head profiles mixed by the input's behaviour and the task's prior). ``headrouter`` keeps the top-K,
``oracle`` uses the true task's group profile instead of routing, ``coverage`` spreads the routed score over
windows of the clip."""

from __future__ import annotations

import functools
import math

import torch

from headrouter_vllm.names import BUILTIN_TASKS, GROUPS
from headrouter_vllm.routing.budgets import per_head_budgets
from headrouter_vllm.routing.policies.base import Policy, RouteSettings, Selection, SpanProbe
from headrouter_vllm.routing.profiles import ProfileSet
from headrouter_vllm.routing.router import route
from headrouter_vllm.routing.scores import calibrated_position_prior, debias, fallback_position_prior, selectivity
from headrouter_vllm.routing.select import Coverage, select_coverage, select_per_head, select_shared
from headrouter_vllm.routing.tasks import group_prior, task_group, task_prior


def routed_scores(probe: SpanProbe, settings: RouteSettings, profiles: ProfileSet | None, oracle: bool = False):
    """Debiased scores ``[Hq, N]``, the head weights (``None`` without profiles) and the routing mix; ``oracle``:
    the weights of the true task's group instead of routing.

    A request of task ``auto`` whose probe read the first token's row is routed by the profile file's group router
    when it has one (else, and for named tasks, by :func:`route`). At probe point ``routed`` the scores are then the
    rows the probe point of the request's group names (the router's heaviest group; a named task's own group): the
    prompt rows' (``probe.prompt_scores``, debiased as at probe point ``prompt``) or the first token's."""
    n = probe.head_scores.shape[-1]
    if profiles is not None and profiles.position_prior is not None:
        prior = calibrated_position_prior(profiles.position_prior, n)
    else:
        prior = fallback_position_prior(probe.head_scores)
    scores = debias(probe.head_scores, prior)
    if profiles is None:
        return scores, None, None
    if oracle:
        group = settings.task if settings.task in GROUPS else BUILTIN_TASKS.get(settings.task)
        if group is None:
            group = max(profiles.tasks.get(settings.task, {"mixed": 1.0}).items(), key=lambda kv: kv[1])[0]
        weights, alpha = profiles.profiles[group].weights.float(), group_prior(group, weight=1.0)
    elif profiles.router is not None and profiles.router.routes(settings.task, settings.probe_point):
        alpha, weights = profiles.router.route(selectivity(scores), profiles.profiles)
        group = max(GROUPS, key=lambda g: (alpha[g], -GROUPS.index(g)))  # the heaviest (ties: the first)
    else:
        alpha, weights = route(selectivity(scores), profiles.profiles, task_prior(settings.task, profiles.tasks),
                               profiles.tau)
        group = task_group(settings.task, profiles.tasks)  # a named task's rows are its group's
    if probe.prompt_scores is not None and profiles.group_probe_point(group) == "prompt":
        prompt_prior = prior if profiles.position_prior is not None else fallback_position_prior(probe.prompt_scores)
        scores = debias(probe.prompt_scores, prompt_prior)
    return scores, weights, alpha


def _equal_weights(scores: torch.Tensor) -> torch.Tensor:
    return torch.full((scores.shape[0],), 1.0 / scores.shape[0])


def select_top_k(probe: SpanProbe, keep: int, settings: RouteSettings, profiles: ProfileSet | None,
                 oracle: bool = False) -> Selection:
    """``headrouter`` and ``oracle``: the top-K of the head-weighted score; per KV head in ``per_head`` mode, with
    budgets from the routed weights between ``b_min`` and ``b_max``."""
    scores, weights, alpha = routed_scores(probe, settings, profiles, oracle)
    if settings.mode == "shared":
        kept, margin = select_shared(scores, keep, weights)
        return Selection(kept, head_weights=weights, alpha=alpha, margin=margin)
    per_head = select_per_head(scores, _kv_budgets(scores, weights, keep, settings, probe.num_kv_heads), weights)
    return _per_head_selection(per_head, weights, alpha)


def _kv_budgets(scores: torch.Tensor, weights: torch.Tensor | None, keep: int, settings: RouteSettings,
                num_kv: int) -> torch.Tensor:
    """``per_head`` budgets ``[G]``: ``keep * G`` slots in all, shared by the KV heads' routed weights, each between
    ``b_min`` and ``b_max`` (the settings' fractions of N, or the engine plan's cap). With ``kv_shards`` > 1 every
    group of ``G / kv_shards`` consecutive heads shares ``keep`` slots per head of its own."""
    n = scores.shape[-1]
    kv_weights = (weights if weights is not None else _equal_weights(scores)).view(num_kv, -1).sum(dim=1)
    b_min = min(keep, int(settings.b_min_fraction * n))
    b_max = settings.b_max if settings.b_max is not None else min(n, math.ceil(settings.b_max_fraction * n))
    if num_kv % settings.kv_shards:
        raise ValueError(f"{num_kv} KV heads do not split into {settings.kv_shards} shards")
    per_shard = num_kv // settings.kv_shards
    return torch.cat([per_head_budgets(shard, keep * per_shard, b_min, max(keep, min(n, b_max)))
                      for shard in kv_weights.split(per_shard)])


def _per_head_selection(per_head: list[torch.Tensor], weights, alpha) -> Selection:
    union = torch.unique(torch.cat(per_head)) if per_head else torch.empty(0, dtype=torch.long)
    return Selection(union, per_head=per_head, head_weights=weights, alpha=alpha)


def select_spread(probe: SpanProbe, keep: int, settings: RouteSettings, profiles: ProfileSet | None) -> Selection:
    """``coverage``: window budgets from the routed score mass (with a floor), evenly spaced inside each window;
    settings per task group from the profile file, mixed by the routing weights. ``per_head`` mode: each KV head
    spreads its own budget (as ``headrouter``'s per-head budgets) by its own query heads' routed mass; where every
    KV head has the same score and budget, each keeps the shared selection."""
    scores, weights, alpha = routed_scores(probe, settings, profiles)
    w = weights if weights is not None else _equal_weights(scores)
    params = Coverage.mix(profiles.coverage, alpha or {}) if profiles is not None and profiles.coverage else Coverage()
    if settings.mode == "per_head":
        budgets = _kv_budgets(scores, weights, keep, settings, probe.num_kv_heads)
        per_head = select_per_head(scores, budgets, weights, pick=functools.partial(
            select_coverage, segments=params.segments, floor=params.floor))
        return _per_head_selection(per_head, weights, alpha)
    kept = select_coverage((w.float()[:, None] * scores.float()).sum(dim=0), keep, params.segments, params.floor)
    return Selection(kept, head_weights=weights, alpha=alpha)


HEADROUTER = Policy("headrouter", select_top_k, "routed top-K of the debiased probe attention", per_head=True)
ORACLE = Policy("oracle", functools.partial(select_top_k, oracle=True),
                "top-K with the true task group's profile (no input routing)", per_head=True, needs_true_task=True)
COVERAGE = Policy("coverage", select_spread, "the routed score spread over windows of the clip", per_head=True)
