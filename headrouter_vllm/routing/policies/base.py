"""What every policy reads and returns, and the policy object itself (a kvpress-style press: a scorer plus a
budget rule, with the capabilities the engine asks about)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from headrouter_vllm.routing.profiles import ProfileSet


@dataclasses.dataclass(frozen=True)
class SpanProbe:
    """What the probe measured on one audio span of N tokens (float32)."""

    head_scores: torch.Tensor  # [Hq, N]: each query head's attention on each audio token, mean over probe rows
    last_row: torch.Tensor  # [Hq, N]: the last prompt row's attention (FastV's signal)
    num_kv_heads: int
    values: torch.Tensor | None = None  # [N, Hkv, d]: value vectors at the probe layer (similarity only)
    # probe point routed: the prompt rows' scores [Hq, N] (head_scores is then the first token's row)
    prompt_scores: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class RouteSettings:
    policy: str = "headrouter"
    mode: str = "shared"
    task: str = "auto"
    seed: int = 0
    b_min_fraction: float = 0.0  # per_head: budget bounds as fractions of N
    b_max_fraction: float = 1.0
    b_max: int | None = None  # per_head: an absolute cap (the engine's plan); overrides b_max_fraction
    # per_head: KV heads in consecutive groups that each hold their share of the budget (tensor parallel ranks: each
    # packs its own heads' kept audio into the span's mean-budget slots)
    kv_shards: int = 1
    focus: tuple[tuple[int, int], ...] | None = None  # region: [start, end) token windows of the span
    probe_point: str = "prompt"  # the rows the probe read (the group router reads the first token's)


@dataclasses.dataclass
class Selection:
    kept: torch.Tensor  # shared: ascending indices into the span; per_head: the union over KV heads
    per_head: list[torch.Tensor] | None = None  # per_head mode: ascending indices per KV head
    head_weights: torch.Tensor | None = None
    alpha: dict[str, float] | None = None
    margin: float | None = None


SelectFn = Callable[[SpanProbe, int, RouteSettings, "ProfileSet | None"], Selection]


@dataclasses.dataclass(frozen=True)
class Policy:
    """A selection policy: ``select(probe, keep, settings, profiles)`` keeps ``keep`` of a span's N tokens
    (``per_head`` mode: ``keep * G`` KV-head slots in all), and what it needs from the engine."""

    name: str
    select: SelectFn
    summary: str
    per_head: bool = False  # has per-head scores: selects per KV head on a per_head engine (else runs shared)
    needs_values: bool = False  # reads the probe layer's value vectors (the probe gathers them only then)
    needs_focus: bool = False  # reads the windows the request names: a per-request policy, never a default
    needs_true_task: bool = False  # reads the request's true task instead of routing (the quality benchmark's)
