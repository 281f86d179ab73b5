"""Every change HeadRouter makes to vLLM internals, one file per patched symbol.

The ledger (what, why, how, which vLLM version) is ``LEDGER.md`` beside this file.

Class-level patches are applied once (idempotent) and can be reverted (:func:`revert_all`) for tests.
"""

from __future__ import annotations

from collections.abc import Callable

_applied: dict[str, Callable[[], None]] = {}


def apply_once(name: str, apply: Callable[[], Callable[[], None]]) -> None:
    """Run ``apply`` (which returns its undo function) unless ``name`` is already applied."""
    if name not in _applied:
        _applied[name] = apply()


def revert_all() -> None:
    while _applied:
        _, undo = _applied.popitem()
        undo()


def applied() -> list[str]:
    return sorted(_applied)
