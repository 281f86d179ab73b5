"""Retention chosen from data: ``retention: "auto"`` (engine) and ``headrouter_retention: "auto"`` (request).

A profile file may hold a retention table (written by ``headrouter-vllm quality --tune-retention``): per task group,
and per named task where it was measured, the smallest retention whose validation accuracy stayed within
``tolerance`` points of full audio. A request at retention ``auto`` gets its task's entry, else its task group's
(``auto``, routed from the input alone, is the ``mixed`` group: its entry was measured with ``auto`` routing on
every question). The table is read at startup; whether this process's engine has one is recorded here, so the
front end rejects ``auto`` on an engine without one before the request runs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from headrouter_vllm.names import GROUPS


class RetentionTableError(ValueError):
    """A profile file's retention table is malformed."""


@dataclasses.dataclass(frozen=True)
class RetentionTable:
    groups: dict[str, float]  # every group of GROUPS
    tasks: dict[str, float] = dataclasses.field(default_factory=dict)  # named tasks measured on their own
    tolerance: float | None = None  # points of accuracy below full audio the choice allowed (provenance)

    def for_task(self, task: str, group: str) -> float:
        """The retention of a request routed by ``task``, whose group is ``group``."""
        return self.tasks.get(task, self.groups[group])

    def to_json(self) -> dict:
        return {"groups": self.groups, **({"tasks": self.tasks} if self.tasks else {}),
                **({"tolerance": self.tolerance} if self.tolerance is not None else {})}

    @classmethod
    def from_json(cls, data: Any) -> RetentionTable:
        if not isinstance(data, dict) or set(data) - {"groups", "tasks", "tolerance"}:
            raise RetentionTableError('retention must be {"groups": {group: r}, "tasks": {task: r}, "tolerance": x}')
        groups = data.get("groups")
        if not isinstance(groups, dict) or set(groups) != set(GROUPS):
            raise RetentionTableError(f"retention.groups must give a retention for every group {GROUPS}")
        tasks = data.get("tasks") or {}
        if not isinstance(tasks, dict):
            raise RetentionTableError("retention.tasks must map task names to retentions")
        tolerance = data.get("tolerance")
        if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, (int, float))
                                      or not math.isfinite(tolerance) or tolerance < 0):
            raise RetentionTableError(f"retention.tolerance must be a non-negative number, got {tolerance!r}")
        return cls({g: _fraction(groups[g], f"retention.groups.{g}") for g in GROUPS},
                   {t: _fraction(r, f"retention.tasks.{t}") for t, r in tasks.items()},
                   None if tolerance is None else float(tolerance))


def _fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            not 0.0 < value <= 1.0:
        raise RetentionTableError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def smallest_within(accuracy: dict[float, float], full: float, tolerance: float) -> float:
    """The smallest retention that, with every larger candidate, keeps accuracy at least ``full - tolerance``
    (1.0 when the largest does not): ``accuracy`` maps candidate retentions to accuracy in points. Walking down
    and stopping at the first miss keeps a noisy pass below a miss from being chosen."""
    chosen = 1.0
    for retention in sorted(accuracy, reverse=True):
        if not accuracy[retention] >= full - tolerance - 1e-9:  # NaN (nothing measured) is a miss
            break
        chosen = retention
    return chosen
