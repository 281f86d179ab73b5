"""The route plan of one request: which audio spans it has and how many tokens of each it keeps.

A pure function of (request options, engine config, audio spans, prompt length), computed the same way
by the scheduler (which needs only the removed count, to free blocks) and the model runner (which
probes, selects and compacts). Nothing is sent between them.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from headrouter_vllm.api.options import RouteOptions
from headrouter_vllm.config import HeadRouterConfig


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def keep_count(retention: float, n: int) -> int:
    """Audio tokens kept of ``n``: round half up (not Python's banker's rounding), at least 1."""
    return max(1, min(n, math.floor(retention * n + 0.5)))


# Policies with per-head scores: only these select per KV head in ``per_head`` mode; the baselines (fastv,
# random, uniform, similarity, coverage) define one kept set for all heads, so they always run shared.
PER_HEAD_POLICIES = ("headrouter", "oracle")


@dataclasses.dataclass(frozen=True)
class Span:
    start: int
    length: int
    keep: int  # audio tokens kept (shared), or the mean budget per KV head (per_head)
    slots: int = -1  # KV slots the span holds after compaction: keep (shared) or the per-head cap (per_head)

    def __post_init__(self) -> None:
        if self.slots < 0:
            object.__setattr__(self, "slots", self.keep)

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclasses.dataclass(frozen=True)
class RoutePlan:
    spans: tuple[Span, ...]
    num_prompt_tokens: int
    task: str
    retention: float
    semantics: str
    policy: str
    mode: str = "shared"

    @property
    def audio_tokens(self) -> int:
        return sum(s.length for s in self.spans)

    @property
    def kept_tokens(self) -> int:
        return sum(s.keep for s in self.spans)

    @property
    def removed(self) -> int:
        """KV slots the request gives back after its prompt step."""
        return sum(s.length - s.slots for s in self.spans)

    @property
    def probe_start(self) -> int:
        """First prompt position after the last audio span: the probe's query rows are [probe_start, L)."""
        return self.spans[-1].end


def make_plan(options: RouteOptions, config: HeadRouterConfig, spans: list[tuple[int, int]],
              num_prompt_tokens: int) -> RoutePlan | None:
    """The plan, or ``None`` when the request runs exactly as vanilla vLLM: no audio, retention 1.0
    (or a retention that keeps every token), or no text after the audio to probe with."""
    retention = options.retention if options.retention is not None else config.retention
    task = options.task if options.task is not None else config.default_task
    policy = options.policy if options.policy is not None else config.policy
    if not spans or retention >= 1.0:
        return None
    mode = "per_head" if config.mode == "per_head" and policy in PER_HEAD_POLICIES else "shared"
    plan_spans = tuple(Span(s, n, keep, per_head_cap(config.per_head_cap, keep, n) if mode == "per_head" else keep)
                       for s, n, keep in ((s, n, keep_count(retention, n)) for s, n in spans))
    if all(sp.keep == sp.length for sp in plan_spans) or plan_spans[-1].end >= num_prompt_tokens:
        return None
    return RoutePlan(plan_spans, num_prompt_tokens, task, retention, config.semantics, policy, mode)


def per_head_cap(ratio: float, keep: int, n: int) -> int:
    """``per_head``: the most audio tokens one KV head may keep of a span (its KV slots after compaction)."""
    return min(n, math.ceil(ratio * keep - 1e-9))


def compaction_moves(plan: RoutePlan, kept: torch.Tensor, computed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot moves that close the gaps left by dropped audio, for a request with ``computed`` tokens of KV.

    ``kept``: the kept audio positions (absolute, ascending, inside the spans). Every token from the first span
    on that is not dropped audio (kept audio, text between and after spans, generated tokens) moves down, in
    order, to close the gaps. Returns ``(src, dst)`` with unmoved slots left out; afterwards the request holds
    ``computed - plan.removed`` slots.
    """
    first = plan.spans[0].start
    survives = torch.ones(computed, dtype=torch.bool)
    for sp in plan.spans:
        survives[sp.start:sp.end] = False
    survives[kept] = True
    src = torch.nonzero(survives[first:]).flatten() + first
    dst = torch.arange(first, first + src.numel())
    if dst.numel() + plan.removed != computed - first:
        raise ValueError("kept set does not match the plan")
    moving = src != dst
    return src[moving], dst[moving]
