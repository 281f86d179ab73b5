"""Task names a request may route by, and the routing prior each one gives the router.

Built-in names follow AudioMarathon's task groups (semantic: asr, ser, scr; acoustic: the rest). A named task
supplies a prior over the three head-weight profiles that is combined with the input's own behaviour; ``auto``
supplies none (the input alone decides); a group name (``semantic``, ``acoustic``, ``mixed``) pins the prior to
that group. A profile file may add tasks of its own (see :mod:`headrouter_vllm.routing.profiles`).
"""

from __future__ import annotations

from headrouter_vllm.names import AUTO, BUILTIN_TASKS, GROUPS

__all__ = ["AUTO", "BUILTIN_TASKS", "GROUPS", "TASK_PRIOR_WEIGHT", "check_task", "group_prior", "known_tasks",
           "register_operator_tasks", "task_group", "task_prior"]

# How strongly a named task leans to its group; the rest is spread evenly (a prior, not a hard switch).
TASK_PRIOR_WEIGHT = 0.8


# Tasks an operator added in the loaded profile file (set when the engine config is built, in each process).
_operator_tasks: tuple[str, ...] = ()


def register_operator_tasks(names: tuple[str, ...]) -> None:
    global _operator_tasks
    _operator_tasks = tuple(n for n in names if n not in BUILTIN_TASKS and n not in GROUPS and n != AUTO)


def known_tasks() -> list[str]:
    return [AUTO, *GROUPS, *BUILTIN_TASKS, *_operator_tasks]


def check_task(task: object) -> str:
    """Return ``task`` if it is a known task name, else raise ValueError listing the known ones."""
    if not isinstance(task, str):
        raise ValueError(f"task must be a string, got {type(task).__name__}")
    if task not in known_tasks():
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(known_tasks())}")
    return task


def task_group(task: str, table: dict[str, dict[str, float]] | None = None) -> str:
    """The group a task belongs to: a group's own name, a built-in task's group, an operator task's largest prior
    (ties: the first in GROUPS); ``auto`` (and anything else) is ``mixed``."""
    if task in GROUPS:
        return task
    if table and task in table:
        return max(GROUPS, key=lambda g: (table[task].get(g, 0.0), -GROUPS.index(g)))
    return BUILTIN_TASKS.get(task, "mixed")


def group_prior(group: str, weight: float = TASK_PRIOR_WEIGHT) -> dict[str, float]:
    rest = (1.0 - weight) / (len(GROUPS) - 1)
    return {g: (weight if g == group else rest) for g in GROUPS}


def task_prior(task: str, table: dict[str, dict[str, float]] | None = None) -> dict[str, float] | None:
    """The prior over profiles that ``task`` names, or ``None`` for ``auto`` (input only)."""
    if task == AUTO:
        return None
    if table and task in table:
        return dict(table[task])
    if task in GROUPS:
        return group_prior(task, weight=1.0)
    if task in BUILTIN_TASKS:
        return group_prior(BUILTIN_TASKS[task])
    raise ValueError(f"unknown task {task!r}")
