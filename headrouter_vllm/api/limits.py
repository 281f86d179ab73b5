"""Limits the HTTP edge enforces for the served model: the longest audio (set when the engine config is built, in
that process) and the largest request body the middleware buffers (``HEADROUTER_MAX_BODY_MB``, else derived from
the longest audio)."""

from __future__ import annotations

import math
from collections.abc import Mapping

from headrouter_vllm.config import environment

_max_audio_seconds: float | None = None

MIB = 1 << 20
BODY_LIMIT_ENV = "HEADROUTER_MAX_BODY_MB"
# The default body limit fits, per clip, the model's longest audio as the largest wav clients commonly send:
# 48 kHz stereo float32, base64 (4 characters per 3 bytes): 512,000 bytes per second of audio.
AUDIO_BODY_BYTES_PER_SECOND = 48_000 * 2 * 4 * 4 // 3
# ... plus room for the text of a long conversation and the JSON around it.
TEXT_BODY_BYTES = 8 * MIB


def set_max_audio_seconds(seconds: float | None) -> None:
    global _max_audio_seconds
    _max_audio_seconds = seconds


def max_audio_seconds() -> float | None:
    return _max_audio_seconds


def configured_body_limit() -> int | None:
    """``HEADROUTER_MAX_BODY_MB`` in bytes (0: no limit); ``None`` when unset. Raises ValueError for a bad value."""
    value = environment().max_body_mb
    if not value:
        return None
    try:
        mib = float(value)
    except ValueError:
        raise ValueError(f"{BODY_LIMIT_ENV} must be a number of MiB (0: no limit), got {value!r}") from None
    if not math.isfinite(mib) or mib < 0:
        raise ValueError(f"{BODY_LIMIT_ENV} must be a number of MiB >= 0 (0: no limit), got {value!r}")
    return int(mib * MIB)


def audio_clips_per_prompt(limit_mm_per_prompt: Mapping | None) -> int:
    """The audio count of ``--limit-mm-per-prompt`` (``{"audio": N}`` or ``{"audio": {"count": N}}``), else 1: the
    default limit is sized for one clip of the longest audio (or several at lower sample rates)."""
    audio = (limit_mm_per_prompt or {}).get("audio")
    if isinstance(audio, Mapping):
        audio = audio.get("count")
    return audio if isinstance(audio, int) and audio >= 1 else 1


def max_body_bytes(audio_clips: int = 1) -> int | None:
    """The largest request body the middleware reads (``None``: no limit): ``HEADROUTER_MAX_BODY_MB`` if set, else
    ``audio_clips`` clips of the model's longest audio (capped at vLLM's own per-clip size limit,
    ``VLLM_MAX_AUDIO_CLIP_FILESIZE_MB``, base64) plus ``TEXT_BODY_BYTES``."""
    configured = configured_body_limit()
    if configured is not None:
        return configured or None
    from vllm import envs

    per_clip = 4 * math.ceil(envs.VLLM_MAX_AUDIO_CLIP_FILESIZE_MB * MIB / 3)  # vLLM refuses larger clips anyway
    if _max_audio_seconds is not None:
        per_clip = min(per_clip, math.ceil(_max_audio_seconds * AUDIO_BODY_BYTES_PER_SECOND))
    return audio_clips * per_clip + TEXT_BODY_BYTES
