"""``headrouter`` routing with the query heads split across tensor-parallel ranks.

Each rank probes only its own heads. Everything per head stays local; what couples the heads is a handful of
sums, exchanged by all-reduce: the head-mean trend of the built-in position prior (``[N]`` floats), the router's
dot products (4 floats) and the head-weighted score (``[N]`` floats). Every rank then takes the same top-K.
Selectivity's normaliser (the largest head mass) needs no exchange: it scales the whole behaviour vector, and
the router only looks at cosines. ``all_reduce_sum`` is ``torch.distributed.all_reduce`` on the TP group in an
engine (not wired yet: the engine refuses tensor parallelism); the tests pass a simulated one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from headrouter_vllm.routing.profiles import ProfileSet
from headrouter_vllm.routing.scores import calibrated_position_prior, debias, fallback_position_prior, focus
from headrouter_vllm.routing.select import select_shared
from headrouter_vllm.routing.tasks import GROUPS, task_prior

AllReduceSum = Callable[[torch.Tensor], torch.Tensor]


def select_shared_sharded(local_scores: torch.Tensor, heads: slice, num_heads: int, keep: int, task: str,
                          profiles: ProfileSet | None, all_reduce_sum: AllReduceSum) -> torch.Tensor:
    """The ``headrouter`` policy's shared kept set (as :func:`routing.policies.select` computes it on all
    heads), from this rank's heads ``heads`` of ``num_heads`` and their probe scores ``[heads, N]``."""
    n = local_scores.shape[-1]
    if profiles is not None and profiles.position_prior is not None:
        prior = calibrated_position_prior(profiles.position_prior[heads], n)
    else:
        head_mean = all_reduce_sum(local_scores.float().sum(dim=0)) / num_heads
        prior = fallback_position_prior(head_mean[None])
    scores = debias(local_scores, prior)
    if profiles is None:
        weights = torch.full((scores.shape[0],), 1.0 / num_heads)
    else:
        weights = _routed_weights(scores, heads, task, profiles, all_reduce_sum)
    score = all_reduce_sum((weights[:, None] * scores).sum(dim=0))
    return select_shared(score[None], keep)[0]


def _routed_weights(scores: torch.Tensor, heads: slice, task: str, profiles: ProfileSet,
                    all_reduce_sum: AllReduceSum) -> torch.Tensor:
    behaviour = focus(scores) * scores.sum(dim=-1)  # selectivity up to one global scale, which cosines ignore
    dots = [(behaviour * profiles.profiles[g].prototype[heads].float()).sum() for g in GROUPS]
    reduced = all_reduce_sum(torch.stack([*dots, (behaviour ** 2).sum()]))
    norms = torch.stack([profiles.profiles[g].prototype.float().norm() for g in GROUPS])
    cos = reduced[:3] / (reduced[3].sqrt() * norms).clamp_min(1e-8)
    logits = cos.double() / profiles.tau
    prior = task_prior(task, profiles.tasks)
    if prior is not None:
        logits = logits + torch.tensor([max(prior.get(g, 0.0), 1e-9) for g in GROUPS], dtype=torch.float64).log()
    alpha = torch.softmax(logits, dim=0)
    return sum(float(a) * profiles.profiles[g].weights[heads].float() for g, a in zip(GROUPS, alpha, strict=True))
