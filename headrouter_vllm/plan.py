"""The route plan of one request: which audio spans it has and how many tokens of each it keeps.

A pure function of (request options, engine config, audio spans, prompt length), computed the same way
by the scheduler (which needs only the removed count, to free blocks) and the model runner (which
probes, selects and compacts). Nothing is sent between them.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from headrouter_vllm.config import HeadRouterConfig
from headrouter_vllm.names import AUTO
from headrouter_vllm.options import RouteOptions
from headrouter_vllm.routing.context import built_context
from headrouter_vllm.routing.policies import policy as policy_named


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def keep_count(retention: float, n: int) -> int:
    """Audio tokens kept of ``n``: round half up (not Python's banker's rounding), at least 1."""
    return max(1, min(n, math.floor(retention * n + 0.5)))


@dataclasses.dataclass(frozen=True)
class Span:
    start: int
    length: int
    keep: int  # audio tokens kept (shared), or the mean budget per KV head (per_head); KV slots held after compaction
    head_cap: int | None = None  # per_head: the most audio tokens one KV head may keep (its budget's upper bound)

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
    probe_point: str = "prompt"
    semantics_note: str | None = None  # why the engine's semantics did not apply to this request
    focus: tuple[tuple[float, float], ...] | None = None  # policy region: windows in seconds of each clip

    @property
    def audio_tokens(self) -> int:
        return sum(s.length for s in self.spans)

    @property
    def kept_tokens(self) -> int:
        return sum(s.keep for s in self.spans)

    @property
    def removed(self) -> int:
        """KV slots the request gives back after its prompt step."""
        return sum(s.length - s.keep for s in self.spans)

    @property
    def probe_start(self) -> int:
        """First prompt position after the last audio span (the compacted region ends here)."""
        return self.spans[-1].end

    @property
    def probe_rows(self) -> tuple[int, int]:
        """The probe's query positions ``[start, end)``: the prompt rows after the audio (``prompt``), the
        first generated token's row (``first_token``, position L), or both (``routed``: the prompt rows' mass and
        the first token's row are kept apart, see ``route_step``). The step whose rows reach ``end`` selects,
        and the KV is compacted after it."""
        length = self.num_prompt_tokens
        if self.probe_point == "first_token":
            return length, length + 1
        return self.probe_start, length + 1 if self.probe_point == "routed" else length

    @property
    def selects_at_first_token(self) -> bool:
        """The selecting step is the first decode step (its one row, the first token's, is read there)."""
        return self.probe_point in ("first_token", "routed")

    @property
    def probe_end(self) -> int:
        return self.probe_rows[1]

    @property
    def one_step_start(self) -> int | None:
        """The first prompt row that must share one prefill step with the rest of the prompt: the rows after the
        audio (``in_prompt``) or everything from the first audio token on (``prefill``); None for ``after_prompt``."""
        return one_step_start(self.semantics, self.spans)


def one_step_start(semantics: str, spans: tuple[Span, ...]) -> int | None:
    return {"in_prompt": spans[-1].end, "prefill": spans[0].start}.get(semantics)


def make_plan(options: RouteOptions, config: HeadRouterConfig, spans: list[tuple[int, int]],
              num_prompt_tokens: int, chunk_budget: int | None = None,
              prompt_logprobs: bool = False) -> RoutePlan | None:
    """The plan, or ``None`` when the request runs exactly as vanilla vLLM: no audio, retention 1.0
    (or a retention that keeps every token), or no text after the audio to probe with.

    ``chunk_budget``: the most prompt tokens one prefill step takes (chunked prefill), or None. ``in_prompt`` needs
    the rows after the audio in one step, ``prefill`` the prompt from the first audio token on; a request whose
    rows do not fit runs ``after_prompt`` (exact under any chunking), and its plan says why (``semantics_note``:
    the scheduler logs it and the request's usage report names the semantics it ran). So does a ``prefill`` request
    that asks for prompt log-probabilities (``prompt_logprobs``): ``prefill`` never computes the dropped rows."""
    retention = options.retention if options.retention is not None else config.retention
    task = options.task if options.task is not None else config.default_task
    policy = options.policy if options.policy is not None else config.default_policy
    probe_point = options.probe_point
    if probe_point is None:
        probe_point = built_context(config).probe_point_for(task)
    if retention == AUTO:
        retention = built_context(config).retention_for(task)
    if not spans or retention >= 1.0:
        return None
    # per_head selects per KV head at the prompt probe only; other requests on a per_head engine run shared
    per_head = config.mode == "per_head" and policy_named(policy).per_head and probe_point == "prompt"
    mode = "per_head" if per_head else "shared"
    # per_head packs every KV head's kept audio into the mean budget's slots (phase B): the same KV as shared
    plan_spans = tuple(Span(s, n, keep, per_head_cap(config.per_head_cap, keep, n) if mode == "per_head" else None)
                       for s, n, keep in ((s, n, keep_count(retention, n)) for s, n in spans))
    if all(sp.keep == sp.length for sp in plan_spans) or plan_spans[-1].end >= num_prompt_tokens:
        return None
    semantics = config.semantics if probe_point == "prompt" else "after_prompt"
    note = None
    if semantics == "prefill" and prompt_logprobs:
        note = ("prefill does not compute the dropped audio rows, whose prompt log-probabilities the request asks "
                "for: ran after_prompt")
        semantics = "after_prompt"
    first = one_step_start(semantics, plan_spans)
    if first is not None and chunk_budget is not None and num_prompt_tokens - first > chunk_budget:
        what = "after the audio" if semantics == "in_prompt" else "from the first audio token on"
        note = (f"{semantics} needs the {num_prompt_tokens - first} prompt tokens {what} in one prefill step, "
                f"more than max_num_batched_tokens {chunk_budget}: ran after_prompt")
        semantics = "after_prompt"
    return RoutePlan(plan_spans, num_prompt_tokens, task, retention, semantics, policy, mode, probe_point, note,
                     options.focus)


def focus_tokens(focus: tuple[tuple[float, float], ...] | None,
                 tokens_per_second: float) -> tuple[tuple[int, int], ...] | None:
    """Focus windows in seconds -> ``[start, end)`` audio-token windows of a clip (every token that overlaps)."""
    if focus is None:
        return None
    eps = 1e-6  # 4.4 s x 25 is 110.00000000000001 in floating point: token 110 starts at 4.4 s, it is not inside
    return tuple((math.floor(start * tokens_per_second + eps), math.ceil(end * tokens_per_second - eps))
                 for start, end in focus)


def chunk_budget(scheduler_config) -> int | None:
    """The most prompt tokens one step takes when prompts may be chunked, else None (for :func:`make_plan`)."""
    return scheduler_config.max_num_batched_tokens if scheduler_config.enable_chunked_prefill else None


def per_head_cap(ratio: float, keep: int, n: int) -> int:
    """``per_head``: the most audio tokens one KV head may keep of a span (the span holds the mean, ``keep``)."""
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
