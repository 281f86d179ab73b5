"""Limits the HTTP edge enforces for the served model (set when the engine config is built, in that process)."""

from __future__ import annotations

_max_audio_seconds: float | None = None


def set_max_audio_seconds(seconds: float | None) -> None:
    global _max_audio_seconds
    _max_audio_seconds = seconds


def max_audio_seconds() -> float | None:
    return _max_audio_seconds
