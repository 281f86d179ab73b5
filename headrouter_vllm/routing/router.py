"""The router: mix the head-weight profiles by how the input's heads behave, and by the task's prior."""

from __future__ import annotations

import dataclasses
import math

import torch

from headrouter_vllm.routing.tasks import GROUPS


@dataclasses.dataclass(frozen=True)
class Profile:
    """One task group's head profile, from calibration."""

    prototype: torch.Tensor  # [Hq]: the group's mean head-behaviour (selectivity) vector
    weights: torch.Tensor  # [Hq]: head weights for scoring, non-negative, summing to 1


def route(behaviour: torch.Tensor, profiles: dict[str, Profile], prior: dict[str, float] | None,
          tau: float) -> tuple[dict[str, float], torch.Tensor]:
    """``alpha = softmax(cos(s, P_k) / tau + log prior_k)`` over the groups; head weights ``w = sum_k alpha_k W_k``.

    ``prior`` ``None`` (task ``auto``) lets the input alone decide. Returns alpha per group and ``w`` ``[Hq]``.
    """
    s = behaviour.float()
    logits = []
    for group in GROUPS:
        cos = torch.nn.functional.cosine_similarity(s, profiles[group].prototype.float(), dim=0)
        bias = 0.0 if prior is None else math.log(max(prior.get(group, 0.0), 1e-9))
        logits.append(float(cos) / tau + bias)
    alpha = torch.softmax(torch.tensor(logits, dtype=torch.float64), dim=0)
    weights = sum(float(a) * profiles[g].weights.float() for g, a in zip(GROUPS, alpha, strict=True))
    return {g: float(a) for g, a in zip(GROUPS, alpha, strict=True)}, weights
