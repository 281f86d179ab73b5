"""Selection policies behind one interface: HeadRouter and the baselines it is compared with.

Every policy maps what the probe measured on one audio span (:class:`SpanProbe`) and a budget to the kept
tokens (:class:`Selection`). Like a kvpress "press", a policy is a scorer plus a budget rule, here a
:class:`Policy` object that also says what it needs from the engine (per-head scores, the probe layer's values,
the request's windows). :data:`REGISTRY` is the one list of them; the engine and the offline references call the
same :func:`select`. Adding a policy is one module here (its ``Policy``), its line in ``REGISTRY``, and its tests.

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

from headrouter_vllm.routing.policies import baselines, routed
from headrouter_vllm.routing.policies.base import Policy, RouteSettings, Selection, SpanProbe
from headrouter_vllm.routing.profiles import ProfileSet
from headrouter_vllm.routing.select import uniform_indices

__all__ = ["PER_HEAD_POLICIES", "POLICIES", "REGISTRY", "Policy", "RouteSettings", "Selection", "SpanProbe",
           "policy", "select", "uniform_indices"]

REGISTRY: dict[str, Policy] = {p.name: p for p in (
    routed.HEADROUTER, routed.ORACLE, routed.COVERAGE,
    baselines.FASTV, baselines.RANDOM, baselines.UNIFORM, baselines.SIMILARITY, baselines.REGION,
)}
POLICIES = tuple(REGISTRY)
# only these select per KV head on a per_head engine; the others define one kept set for all heads
PER_HEAD_POLICIES = tuple(name for name, p in REGISTRY.items() if p.per_head)


def policy(name: str) -> Policy:
    """The policy called ``name``; ValueError naming the known ones otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown policy {name!r}; choose one of {POLICIES}") from None


def select(probe: SpanProbe, keep: int, settings: RouteSettings, profiles: ProfileSet | None = None) -> Selection:
    """Keep ``keep`` of the span's N tokens (``shared``), or ``keep * G`` KV-head slots in all (``per_head``)."""
    n = probe.head_scores.shape[-1]
    if not 1 <= keep <= n:
        raise ValueError(f"keep must be in [1, {n}], got {keep}")
    chosen = policy(settings.policy)
    if settings.mode == "per_head" and not chosen.per_head:
        raise ValueError(f"policy {settings.policy!r} has no per-head scores; use mode 'shared'")
    return chosen.select(probe, keep, settings, profiles)
