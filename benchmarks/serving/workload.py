"""The benchmark workload: audio chat requests synthesised locally, seeded, and exportable for vLLM's own
``vllm bench serve`` (its ``custom`` JSONL dataset with audio files)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
QUESTIONS = ("What is said in this audio clip?", "Describe the sounds.", "Who is speaking?",
             "Transcribe the audio.", "Is there music?")
TASKS = ("asr", "sed", "speaker_gender", "asr", "music_genre")


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    index: int
    wave: np.ndarray
    question: str
    task: str
    max_tokens: int
    arrival_s: float  # offset from the start (0 for closed-loop runs)

    @property
    def seconds(self) -> float:
        return self.wave.size / SAMPLE_RATE


def synth_clip(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Speech-like audio: a few tones with a syllable-rate envelope over low noise (token counts are what a
    throughput run needs; the model's answers do not matter)."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    wave = 0.02 * rng.standard_normal(t.size)
    for _ in range(3):
        f0 = rng.uniform(120, 900)
        wave += 0.2 * np.sin(2 * np.pi * f0 * t + rng.uniform(0, 6.28)) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
    return wave.astype(np.float32)


def make_workload(num_requests: int, clip_seconds: list[float], output_tokens: int | list[int], seed: int = 0,
                  request_rate: float | None = None) -> list[BenchRequest]:
    """``request_rate`` None: every request arrives at once (closed loop, KV-bound); else Poisson arrivals.
    Clip lengths and output lengths cycle so that every pair of them occurs."""
    outputs = [output_tokens] if isinstance(output_tokens, int) else list(output_tokens)
    rng = np.random.default_rng(seed)
    arrival = 0.0
    requests = []
    for i in range(num_requests):
        if request_rate is not None and i:
            arrival += float(rng.exponential(1.0 / request_rate))
        k = i % len(QUESTIONS)
        requests.append(BenchRequest(i, synth_clip(clip_seconds[i % len(clip_seconds)], rng), QUESTIONS[k],
                                     TASKS[k], outputs[(i // len(clip_seconds)) % len(outputs)], arrival))
    return requests


def export_for_vllm_bench(requests: list[BenchRequest], folder: str | Path) -> Path:
    """Write the workload as ``vllm bench serve --dataset-name custom_audio`` input: wav files and a JSONL."""
    import soundfile as sf

    folder = Path(folder)
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    lines = []
    for r in requests:
        path = folder / "audio" / f"clip{r.index:04d}.wav"
        sf.write(path, r.wave, SAMPLE_RATE)
        lines.append(json.dumps({"prompt": r.question, "output_tokens": r.max_tokens,
                                 "audio": str(path.resolve()), "task": r.task}))
    out = folder / "workload.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out
