"""Task names a request may route by.

Built-in names follow AudioMarathon's task groups. Until calibrated profiles exist every task routes
with uniform head weights (see ``docs``/README "Known limits"); the names are validated now so
clients can send them from day one.
"""

from __future__ import annotations

GROUPS = ("semantic", "acoustic", "mixed")
AUTO = "auto"

BUILTIN_TASKS: dict[str, str] = {
    "asr": "semantic",
    "ser": "semantic",
    "scr": "semantic",
    "sed": "acoustic",
    "music_genre": "acoustic",
    "scene": "acoustic",
    "spoof": "acoustic",
    "speaker_age": "acoustic",
    "speaker_gender": "acoustic",
    "emotion": "acoustic",
}


def known_tasks() -> list[str]:
    return [AUTO, *GROUPS, *BUILTIN_TASKS]


def check_task(task: object) -> str:
    """Return ``task`` if it is a known task name, else raise ValueError listing the known ones."""
    if not isinstance(task, str):
        raise ValueError(f"task must be a string, got {type(task).__name__}")
    if task not in known_tasks():
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(known_tasks())}")
    return task
