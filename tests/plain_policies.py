"""Plain, independent implementations of the selection policies, for the HF reference.

Why this exists: ``tests/hf_reference.py`` is what the engine tests compare the engine with ("the kept set equals
the reference"). If the reference chose its kept set with the engine's own
``headrouter_vllm.routing.policies.select()``, those tests would check the probe, the compaction and the decode,
but never the selection: a wrong policy would be wrong on both sides. So the reference selects with
:func:`plain_select` here, written from each policy's documented definition (``docs/algorithm.md``, the table in
``headrouter_vllm/routing/policies/__init__.py``, the docstrings), in float64 and plain loops, without calling or
copying the package's routing code. Only plain data is shared: the types ``SpanProbe``, ``RouteSettings``,
``ProfileSet``, ``Profile``, ``Coverage`` and the task tables (``GROUPS``, ``BUILTIN_TASKS``, the 0.8 task prior).

Equality with the engine is the test: ``tests/test_plain_policies.py`` checks ``plain_select == select`` on random
probes for every policy and mode, and the engine-vs-HF tests check it on real ones. :func:`plain_selection` also
gives the routing mix (``alpha``, which the calibration test compares with the engine's) and the top-K margin.
Details the definitions leave open, and what these functions do: top-K keeps the lower position on an exact tie
(``torch.topk``'s order among equal scores is unspecified, so there the engine may keep other, equally scored
tokens); ``coverage``'s window edges are ``i * N / segments`` rounded half to even, exactly (the engine's float
``linspace`` rounds some exact half-token edges up instead: a known difference, see the test); "evenly spaced" is
the centre of each of K equal segments, ``floor((i + 1/2) * n / K)``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from fractions import Fraction
from typing import NamedTuple

import torch

from headrouter_vllm.names import BUILTIN_TASKS, GROUPS
from headrouter_vllm.routing.policies.base import RouteSettings, SpanProbe
from headrouter_vllm.routing.profiles import ProfileSet
from headrouter_vllm.routing.tasks import TASK_PRIOR_WEIGHT

EPS = 1e-12  # the floor of a prior value, a probability or a mass before dividing by it
COS_EPS = 1e-8  # the floor of a vector's norm in a cosine (torch's cosine_similarity)
F64 = torch.float64


class Plain(NamedTuple):
    kept: torch.Tensor  # ascending; per_head: the union over KV heads
    per_head: list[torch.Tensor] | None = None
    alpha: dict[str, float] | None = None  # the routing mix over GROUPS (routed and oracle policies with profiles)
    margin: float | None = None  # shared top-K: the K-th score minus the (K+1)-th


def plain_select(probe: SpanProbe, keep: int, settings: RouteSettings,
                 profiles: ProfileSet | None = None) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """The kept tokens (ascending) and, in ``per_head`` mode, each KV head's: the engine's ``select``, plainly."""
    sel = plain_selection(probe, keep, settings, profiles)
    return sel.kept, sel.per_head


def plain_selection(probe: SpanProbe, keep: int, settings: RouteSettings, profiles: ProfileSet | None = None) -> Plain:
    """:func:`plain_select` with the routing mix and the top-K margin."""
    n = probe.head_scores.shape[-1]
    if not 1 <= keep <= n:
        raise ValueError(f"keep must be in [1, {n}], got {keep}")
    if settings.policy not in POLICIES:
        raise ValueError(f"unknown policy {settings.policy!r}")
    if settings.mode not in ("shared", "per_head"):
        raise ValueError(f"unknown mode {settings.mode!r}")
    if settings.mode == "per_head" and settings.policy not in ("headrouter", "oracle", "coverage"):
        raise ValueError(f"policy {settings.policy!r} has no per-head scores")
    return POLICIES[settings.policy](probe, keep, settings, profiles)


# ---- small pieces ------------------------------------------------------------------------------------------------

def ascending(positions) -> torch.Tensor:
    return torch.tensor(sorted(positions), dtype=torch.long)


def evenly(n: int, k: int) -> list[int]:
    """``k`` evenly spaced positions in ``[0, n)``: the centre of each of ``k`` equal segments, exactly."""
    return [(2 * i + 1) * n // (2 * k) for i in range(k)]


def best(score: torch.Tensor, k: int) -> list[int]:
    """The ``k`` highest-scoring positions, best first; an exact tie goes to the lower position."""
    values = score.tolist()
    return sorted(range(len(values)), key=lambda j: (-values[j], j))[:k]


def top_k(score: torch.Tensor, keep: int) -> Plain:
    """Shared top-K of one score per token, with the margin at the boundary."""
    order = best(score, keep + 1)
    margin = float(score[order[keep - 1]] - score[order[keep]]) if keep < score.numel() else None
    return Plain(ascending(order[:keep]), margin=margin)


# ---- the routed score: debiased probe attention, head weights from the profiles -------------------------------

def position_prior(probe: SpanProbe, profiles: ProfileSet | None) -> torch.Tensor:
    """``[Hq, N]``: the calibrated per-head prior read at each token's relative position (the bin holding the
    token's centre), or else this input's head-mean attention averaged over a centred window of about N/8 tokens
    (odd, the ends repeated)."""
    heads, n = probe.head_scores.shape
    if profiles is not None and profiles.position_prior is not None:
        bins = profiles.position_prior.to(F64)
        b = bins.shape[1]
        return bins[:, [min(b - 1, (2 * j + 1) * b // (2 * n)) for j in range(n)]].clamp_min(EPS)
    trend = probe.head_scores.to(F64).mean(dim=0).tolist()
    width = max(1, int(n * 0.125)) | 1
    half = width // 2
    padded = [trend[0]] * half + trend + [trend[-1]] * half
    running = [0.0, *itertools.accumulate(padded)]
    smooth = [(running[j + width] - running[j]) / width for j in range(n)]
    return torch.tensor(smooth, dtype=F64).clamp_min(EPS).expand(heads, n)


def debiased(probe: SpanProbe, profiles: ProfileSet | None) -> torch.Tensor:
    """``[Hq, N]``: each head's scores divided by the position prior, rescaled to the head's own audio mass."""
    raw = probe.head_scores.to(F64)
    flat = raw / position_prior(probe, profiles)
    return flat * (raw.sum(dim=1, keepdim=True) / flat.sum(dim=1, keepdim=True).clamp_min(EPS))


def selectivity(scores: torch.Tensor) -> list[float]:
    """Per head: (1 - entropy of its attention over the span / log N, at least 0; 1 when N = 1) x (its audio
    mass / the largest head's)."""
    n = scores.shape[1]
    masses = scores.sum(dim=1).tolist()
    out = []
    for row, mass in zip(scores.tolist(), masses, strict=True):
        p = [x / max(mass, EPS) for x in row]
        entropy = -sum(q * math.log(max(q, EPS)) for q in p)
        focus = 1.0 if n == 1 else max(0.0, 1.0 - entropy / math.log(n))
        out.append(focus * mass / max(max(masses), EPS))
    return out


def cosine(a: list[float], b: list[float]) -> float:
    norm = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    return sum(x * y for x, y in zip(a, b, strict=True)) / (max(norm[0], COS_EPS) * max(norm[1], COS_EPS))


def task_prior(task: str, profiles: ProfileSet) -> dict[str, float] | None:
    """``auto``: none; a task of the profile file: its mix; a group: all on it; a built-in task: 0.8 on its group,
    the rest spread evenly."""
    if task == "auto":
        return None
    if task in profiles.tasks:
        return profiles.tasks[task]
    if task in GROUPS:
        return {g: float(g == task) for g in GROUPS}
    if task in BUILTIN_TASKS:
        rest = (1.0 - TASK_PRIOR_WEIGHT) / (len(GROUPS) - 1)
        return {g: TASK_PRIOR_WEIGHT if g == BUILTIN_TASKS[task] else rest for g in GROUPS}
    raise ValueError(f"unknown task {task!r}")


def route(scores: torch.Tensor, task: str, profiles: ProfileSet) -> tuple[dict[str, float], torch.Tensor]:
    """``alpha = softmax_k(cos(selectivity, prototype_k) / tau + log max(prior_k, 1e-9))``, head weights
    ``sum_k alpha_k W_k``."""
    s, prior = selectivity(scores), task_prior(task, profiles)
    logits = [cosine(s, profiles.profiles[g].prototype.tolist()) / profiles.tau
              + (0.0 if prior is None else math.log(max(prior.get(g, 0.0), 1e-9))) for g in GROUPS]
    exps = [math.exp(x - max(logits)) for x in logits]
    alpha = {g: e / sum(exps) for g, e in zip(GROUPS, exps, strict=True)}
    return alpha, sum(alpha[g] * profiles.profiles[g].weights.to(F64) for g in GROUPS)


def group_route(scores: torch.Tensor, profiles: ProfileSet) -> tuple[dict[str, float], torch.Tensor]:
    """The group router: ``alpha_k = softmax_k(-sum_h ((s_h - mu_kh) / sigma_h)^2 / 2)`` over the groups it has a
    prototype for (the others 0), head weights ``sum_k alpha_k W_k``."""
    s, router = selectivity(scores), profiles.router
    logits = {g: -sum(((x - m) / sd) ** 2 for x, m, sd in zip(s, mu.tolist(), router.scale.tolist(), strict=True)) / 2
              for g, mu in router.prototypes.items()}
    exps = {g: math.exp(v - max(logits.values())) for g, v in logits.items()}
    alpha = {g: exps.get(g, 0.0) / sum(exps.values()) for g in GROUPS}
    return alpha, sum(alpha[g] * profiles.profiles[g].weights.to(F64) for g in GROUPS)


def rows_point(group: str, profiles: ProfileSet) -> str:
    """Probe point ``routed``: the rows a request routed to ``group`` selects with (its probe point in the file;
    ``prompt`` where it names none; ``routed`` itself is the first token's row)."""
    point = profiles.probe_point.get(group) if isinstance(profiles.probe_point, dict) else profiles.probe_point
    return {None: "prompt", "routed": "first_token"}.get(point, point)


def true_group(task: str, profiles: ProfileSet) -> str:
    """The oracle's group: a group's own name, a built-in task's group, a file task's heaviest group (ties: the
    first in GROUPS); anything else (``auto``) ``mixed``."""
    if task in GROUPS:
        return task
    if task in BUILTIN_TASKS:
        return BUILTIN_TASKS[task]
    if task in profiles.tasks:
        mix = profiles.tasks[task]
        return max(GROUPS, key=lambda g: (mix.get(g, 0.0), -GROUPS.index(g)))
    return "mixed"


def routed(probe: SpanProbe, settings: RouteSettings, profiles: ProfileSet | None, oracle: bool = False):
    """The debiased scores ``[Hq, N]``, the head weights ``[Hq]`` (equal without profiles) and the routing mix."""
    scores = debiased(probe, profiles)
    heads = scores.shape[0]
    if profiles is None:
        return scores, torch.full((heads,), 1.0 / heads, dtype=F64), None
    # probe point routed: the rows of the request's group (the group router's heaviest, the first in GROUPS on a
    # tie; else the task's own group)
    group = true_group(settings.task, profiles)
    if oracle:
        weights, alpha = profiles.profiles[group].weights.to(F64), {g: float(g == group) for g in GROUPS}
    elif (profiles.router is not None and settings.task == "auto"
          and settings.probe_point in ("first_token", "routed")):
        alpha, weights = group_route(scores, profiles)
        group = max(GROUPS, key=lambda g: (alpha[g], -GROUPS.index(g)))
    else:
        alpha, weights = route(scores, settings.task, profiles)
    if probe.prompt_scores is not None and rows_point(group, profiles) == "prompt":
        # the prompt rows, debiased as at probe point prompt (the built-in prior from their own attention)
        scores = debiased(dataclasses.replace(probe, head_scores=probe.prompt_scores), profiles)
    return scores, weights, alpha


# ---- per-head budgets ----------------------------------------------------------------------------------------

def clamped_shares(w: list[float], total: int, lo: int, hi: int) -> list[float]:
    """``clamp(w_g * c, lo, hi)`` at the scale ``c`` where they sum to ``total``: the sum is piecewise linear in
    ``c`` with a kink where a head reaches ``lo`` or ``hi``; find the piece, solve it. Where no scale is enough
    (heads of weight 0 stay at ``lo``), the limit: every weighted head at ``hi``."""
    def shares(c: float) -> list[float]:
        return [min(hi, max(lo, x * c)) for x in w]

    start = 0.0
    for kink in sorted({bound / x for x in w if x > 0 for bound in (lo, hi)}):
        if sum(shares(kink)) >= total:
            middle = (start + kink) / 2
            slope = sum(x for x in w if lo < x * middle < hi)
            if slope == 0:
                return shares(kink)
            return shares(start + (total - sum(shares(start))) / slope)
        start = kink
    return [hi if x > 0 else lo for x in w]


def budgets(kv_weights: list[float], total: int, lo: int, hi: int) -> list[int]:
    """Integer budgets proportional to the KV heads' weights, each in ``[lo, hi]``, summing to ``total``: the
    clamped shares floored, then one more token at a time to the largest fractional part first (ties: the lower
    head), round after round, never past ``hi``. Weights all 0: equal."""
    w = [max(0.0, x) for x in kv_weights]
    w = w if sum(w) > 0 else [1.0] * len(w)
    exact = clamped_shares(w, total, lo, hi)
    out = [math.floor(s) for s in exact]
    order = sorted(range(len(w)), key=lambda g: (-(exact[g] - out[g]), g))
    while sum(out) < total:
        for g in order:
            if sum(out) < total and out[g] < hi:
                out[g] += 1
    return out


def per_head_top_k(probe: SpanProbe, keep: int, settings: RouteSettings, scores: torch.Tensor,
                   weights: torch.Tensor, pick=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """KV head g keeps its own top ``budget_g`` tokens (or ``pick(score, budget_g)``'s positions) of the weighted
    sum of its query heads (a group the router gave no weight: their plain mean); budgets from the groups'
    weights, ``keep * G`` in all, each between ``b_min = min(keep, floor(b_min_fraction * N))`` and ``b_max``
    (``settings.b_max``, else ``ceil(b_max_fraction * N)``; at most N, at least keep). With ``kv_shards`` > 1 each
    run of ``G / kv_shards`` heads gets ``keep`` per head of its own (a tensor parallel rank's heads)."""
    pick = pick or best
    heads, n = scores.shape
    kv = probe.num_kv_heads
    groups = [range(g * heads // kv, (g + 1) * heads // kv) for g in range(kv)]
    group_weight = [sum(float(weights[q]) for q in rows) for rows in groups]
    cap = settings.b_max if settings.b_max is not None else math.ceil(settings.b_max_fraction * n)
    b_min, b_max = min(keep, math.floor(settings.b_min_fraction * n)), max(keep, min(n, cap))
    per_shard = kv // settings.kv_shards
    shard_budgets = [b for first in range(0, kv, per_shard)
                     for b in budgets(group_weight[first:first + per_shard], keep * per_shard, b_min, b_max)]
    kept = []
    for rows, weight, b in zip(groups, group_weight, shard_budgets, strict=True):
        if weight == 0.0:
            score = sum(scores[q] for q in rows) / len(rows)
        else:
            score = sum(float(weights[q]) * scores[q] for q in rows)
        kept.append(ascending(pick(score, b) if b else []))
    return ascending(set(itertools.chain.from_iterable(h.tolist() for h in kept))), kept


# ---- the policies ------------------------------------------------------------------------------------------------

def headrouter(probe, keep, settings, profiles, oracle: bool = False) -> Plain:
    """Top-K of the head-weighted debiased score (per KV head in ``per_head`` mode)."""
    scores, weights, alpha = routed(probe, settings, profiles, oracle)
    if settings.mode == "per_head":
        union, per_head = per_head_top_k(probe, keep, settings, scores, weights)
        return Plain(union, per_head, alpha)
    score = sum(float(w) * row for w, row in zip(weights, scores, strict=True))
    return top_k(score, keep)._replace(alpha=alpha)


def oracle(probe, keep, settings, profiles) -> Plain:
    """As headrouter, with the true task group's profile weights instead of routing."""
    return headrouter(probe, keep, settings, profiles, oracle=True)


def coverage_settings(profiles: ProfileSet | None, alpha: dict[str, float] | None) -> tuple[int, float]:
    """(segments, floor): 8 and 0.5 without the profile file's; else floor alpha-weighted over the groups, the
    segments of the group of largest alpha (ties: the first)."""
    if profiles is None or not profiles.coverage:
        return 8, 0.5
    a = alpha or {}
    total = sum(a.get(g, 0.0) for g in profiles.coverage) or 1.0
    floor = sum(a.get(g, 0.0) * c.floor for g, c in profiles.coverage.items()) / total
    heaviest = max(profiles.coverage, key=lambda g: a.get(g, 0.0))
    return profiles.coverage[heaviest].segments, min(1.0, max(0.0, floor))


def coverage(probe, keep, settings, profiles) -> Plain:
    """The routed score spread over ``segments`` equal windows (:func:`spread`); ``per_head`` mode: each KV head
    spreads its own budget (the per-head budgets of ``headrouter``) by its own query heads' weighted score."""
    scores, weights, alpha = routed(probe, settings, profiles)
    segments, floor = coverage_settings(profiles, alpha)
    if settings.mode == "per_head":
        union, per_head = per_head_top_k(probe, keep, settings, scores, weights,
                                         pick=lambda score, b: spread(score, b, segments, floor))
        return Plain(union, per_head, alpha)
    score = sum(float(w) * row for w, row in zip(weights, scores, strict=True))
    return Plain(ascending(spread(score, keep, segments, floor)), alpha=alpha)


def spread(score: torch.Tensor, keep: int, segments: int, floor: float) -> list[int]:
    """``segments`` equal windows: a window's budget is ``keep * (floor * its share of the length + (1 - floor) *
    its share of the non-negative score mass)``, floored, capped at its length, the rest one token at a time to the
    largest shortfall first (ties: the first window); evenly spaced inside. ``floor`` 1: uniform."""
    n = score.numel()
    score = score.clamp_min(0).tolist()
    if floor >= 1.0:
        return evenly(n, keep)
    segments = min(segments, keep)
    edges = [round(Fraction(i * n, segments)) for i in range(segments + 1)]  # half to even
    lengths = [b - a for a, b in itertools.pairwise(edges)]
    mass = [sum(score[a:b]) for a, b in itertools.pairwise(edges)]
    share = [m / sum(mass) for m in mass] if sum(mass) > 0 else [length / n for length in lengths]
    want = [keep * (floor * length / n + (1 - floor) * s) for length, s in zip(lengths, share, strict=True)]
    budget = [min(math.floor(x), length) for x, length in zip(want, lengths, strict=True)]
    while sum(budget) < keep:
        room = [i for i in range(segments) if budget[i] < lengths[i]]
        budget[max(room, key=lambda i: (want[i] - budget[i], -i))] += 1
    return [edges[i] + j for i in range(segments) if budget[i] for j in evenly(lengths[i], budget[i])]


def fastv(probe, keep, settings, profiles) -> Plain:
    """Top-K of the last prompt row's attention, head mean, no debias."""
    return top_k(probe.last_row.to(F64).mean(dim=0), keep)


def random(probe, keep, settings, profiles) -> Plain:
    """The first ``keep`` of torch's permutation of the N tokens seeded by ``settings.seed``."""
    n = probe.head_scores.shape[-1]
    return Plain(ascending(torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed))[:keep].tolist()))


def uniform(probe, keep, settings, profiles) -> Plain:
    return Plain(ascending(evenly(probe.head_scores.shape[-1], keep)))


def similarity(probe, keep, settings, profiles) -> Plain:
    """DART-like: start with the token of largest value-vector L1 norm, then again and again keep the token whose
    highest cosine similarity to the kept ones is lowest (ties: the lower position)."""
    if probe.values is None:
        raise ValueError("the similarity policy needs the probe layer's value vectors")
    v = probe.values.to(F64).reshape(probe.values.shape[0], -1)
    n = v.shape[0]
    l1 = v.abs().sum(dim=1).tolist()
    unit = v / v.norm(dim=1, keepdim=True).clamp_min(EPS)
    kept = {max(range(n), key=lambda j: (l1[j], -j))}
    nearest = (unit @ unit[min(kept)]).tolist()  # each token's highest similarity to a kept token
    while len(kept) < keep:
        nxt = min((j for j in range(n) if j not in kept), key=lambda j: (nearest[j], j))
        kept.add(nxt)
        nearest = [max(a, b) for a, b in zip(nearest, (unit @ unit[nxt]).tolist(), strict=True)]
    return Plain(ascending(kept))


def region(probe, keep, settings, profiles) -> Plain:
    """Evenly spaced over the tokens inside the focus windows (``[start, end)``, clamped, merged); when they hold
    fewer than ``keep``: all of them, and the rest evenly spaced over the tokens outside."""
    if settings.focus is None:
        raise ValueError("policy 'region' needs the focus windows")
    n = probe.head_scores.shape[-1]
    inside = sorted({j for start, end in settings.focus for j in range(max(0, start), min(n, end))})
    outside = sorted(set(range(n)) - set(inside))
    if keep <= len(inside):
        return Plain(ascending(inside[i] for i in evenly(len(inside), keep)))
    return Plain(ascending(inside + [outside[i] for i in evenly(len(outside), keep - len(inside))]))


POLICIES = {"headrouter": headrouter, "oracle": oracle, "coverage": coverage, "fastv": fastv, "random": random,
            "uniform": uniform, "similarity": similarity, "region": region}
