"""The router: mix the head-weight profiles by how the input's heads behave, and by the task's prior.

Two routers. :func:`route` is the cosine router every profile file has: ``softmax(cos(s, P_k) / tau + log prior_k)``.
On the listening model its prototypes are nearly parallel, so it puts only about 60% of questions in their own group
(docs/listening.md). :class:`GroupRouter` is the paper's Gaussian kernel over the prototype selectivity, with the
scale of each head learned by calibration: ``exp(-||(s - mu_k) / sigma||^2 / 2)``. It reads the first generated
token's row, where this model's heads split by task. It routes requests that name no task (``auto``) whenever
their probe read that row; a named task keeps its prior.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from headrouter_vllm.names import AUTO, GROUPS


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
    return _mixed_weights({g: float(a) for g, a in zip(GROUPS, alpha, strict=True)}, profiles)


def _mixed_weights(alpha: dict[str, float], profiles: dict[str, Profile]) -> tuple[dict[str, float], torch.Tensor]:
    weights = sum(alpha[g] * profiles[g].weights.float() for g in GROUPS)
    return alpha, weights


@dataclasses.dataclass(frozen=True)
class GroupRouter:
    """A Gaussian kernel per task group over the selectivity at ``probe_point``'s row: ``prototypes[g]`` is the mean
    of the group's calibration samples, ``scale`` the pooled within-group standard deviation per head. Groups with
    no calibration samples of their own (``mixed`` on the listening suite) have no kernel and get weight 0."""

    probe_point: str  # the row the features come from ("first_token")
    prototypes: dict[str, torch.Tensor]  # group -> [Hq]
    scale: torch.Tensor  # [Hq], positive

    def alpha(self, behaviour: torch.Tensor) -> dict[str, float]:
        s = behaviour.double()  # float64: a small scale makes the logits large, and near a tie the group decides
        logits = torch.stack([-(((s - self.prototypes[g].double()) / self.scale.double()) ** 2).sum() / 2
                              for g in self.prototypes])
        mix = torch.softmax(logits, dim=0)
        return {g: float(mix[list(self.prototypes).index(g)]) if g in self.prototypes else 0.0 for g in GROUPS}

    def route(self, behaviour: torch.Tensor, profiles: dict[str, Profile]) -> tuple[dict[str, float], torch.Tensor]:
        """Alpha per group (its kernels' softmax) and the mixed head weights ``[Hq]``, as :func:`route`."""
        return _mixed_weights(self.alpha(behaviour), profiles)

    def routes(self, task: str, probe_point: str) -> bool:
        """Whether this router decides the request: task ``auto``, and a probe that read its row."""
        return task == AUTO and probe_point in (self.probe_point, "routed")

    @classmethod
    def fit(cls, behaviours: list[torch.Tensor], groups: list[str], probe_point: str = "first_token") -> GroupRouter:
        """Prototypes and scale from labelled behaviour vectors (a group needs two samples to count)."""
        x = torch.stack(behaviours).float()
        members = {g: [i for i, label in enumerate(groups) if label == g] for g in GROUPS}
        prototypes = {g: x[rows].mean(dim=0) for g, rows in members.items() if len(rows) >= 2}
        if len(prototypes) < 2:
            raise ValueError("the group router needs at least two samples in each of two groups")
        residuals = torch.cat([x[members[g]] - mu for g, mu in prototypes.items()])
        scale = residuals.pow(2).mean(dim=0).sqrt().clamp_min(1e-4)
        return cls(probe_point, prototypes, scale)

    def to_json(self) -> dict:
        return {"probe_point": self.probe_point, "prototypes": {g: p.tolist() for g, p in self.prototypes.items()},
                "scale": self.scale.tolist()}
