"""The worker's record of one routed request (its plan, the probe mass so far, the kept set) and of its share of
an engine step: plain data that the KV store (``attention/kv_store.py``) and the step (``route_step.py``) both read.
"""

from __future__ import annotations

import dataclasses

import torch

from headrouter_vllm.plan import RoutePlan
from headrouter_vllm.routing.policies import SpanProbe


@dataclasses.dataclass
class RouteState:
    """Worker-side state of one routed request until it is compacted."""

    plan: RoutePlan
    head_mass: torch.Tensor | None = None  # [Hq, audio_tokens]: probe mass summed over the rows seen so far
    kept: torch.Tensor | None = None  # kept audio positions (absolute, ascending), set in the final probe
    kept_per_head: list[torch.Tensor] | None = None  # per_head mode: each KV head's kept audio positions
    seconds: float = 0.0  # probe (every chunk), selection, in_prompt re-attention and compaction so far


@dataclasses.dataclass
class ProbeLog:
    """One selection, for tests and logs."""

    req_id: str
    kept: list[int]
    margin: float | None
    probe_s: float
    compact_s: float = 0.0
    alpha: list[dict[str, float] | None] | None = None  # routing mix per span
    probes: list[SpanProbe] | None = None  # what the probe measured per span (record_probes)
    kept_per_head: list[list[int]] | None = None  # per_head mode: each KV head's kept audio positions


@dataclasses.dataclass
class ProbeItem:
    """A routed request's share of the current step."""

    req_id: str
    state: RouteState
    token_start: int  # index of the request's first query row in the flattened batch
    computed: int  # tokens with KV before this step
    num_tokens: int  # tokens scheduled in this step
    block_ids: torch.Tensor
    log: ProbeLog | None = None

    @property
    def final(self) -> bool:
        return self.computed + self.num_tokens >= self.state.plan.probe_end
