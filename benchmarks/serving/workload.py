"""The benchmark workloads: audio chat requests synthesised locally, seeded; single-turn ones are exportable for
vLLM's own ``vllm bench serve`` (its ``custom`` JSONL dataset with audio files).

* ``single``: one question per clip, vLLM's default system message (no prefix two requests share beyond it).
* ``shared-prompt``: the same, under one long system prompt every request shares (what prefix caching is for).
* ``multi-turn``: conversations of ``turns`` questions about one clip; each turn resends the whole conversation
  (the clip, the earlier questions and the answers the engine gave) and arrives when the previous turn finishes,
  as a chat client does.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from headrouter_vllm.demo import DEFAULT_SYSTEM, audio_prompt

SAMPLE_RATE = 16000
QUESTIONS = ("What is said in this audio clip?", "Describe the sounds.", "Who is speaking?",
             "Transcribe the audio.", "Is there music?")
TASKS = ("asr", "sed", "speaker_gender", "asr", "music_genre")
WORKLOADS = ("single", "shared-prompt", "multi-turn")
# ~330 tokens with the tiny models' tokenizer: a deployment's instructions, sent with every request
SHARED_SYSTEM = " ".join([
    "You are a helpful assistant for audio. Please answer the question about the audio clip.",
    "Transcribe speech word for word; for a translation, a summary, the emotion, the speaker or a sound event,",
    "answer in one short sentence. If the audio is silent, say so. The quick brown fox jumps over the lazy dog.",
] * 6)
# later turns of a conversation: (question, task)
FOLLOW_UPS = (("Please answer the question again, in fewer words.", "asr"), ("What sound event is this?", "sed"),
              ("What emotion does the speaker have?", "emotion"), ("Translate the speech.", "asr"))


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    index: int
    wave: np.ndarray
    question: str
    task: str
    max_tokens: int
    arrival_s: float  # offset from the start (0 for closed-loop runs); a later turn: when the previous one finishes
    system: str = DEFAULT_SYSTEM
    turn: int = 0  # 0: the first question about the clip
    history: tuple[int, ...] = ()  # the earlier turns' request indices, in order (their questions and answers)

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
                  request_rate: float | None = None, kind: str = "single", turns: int = 3) -> list[BenchRequest]:
    """``request_rate`` None: every request (``multi-turn``: every first turn) arrives at once (closed loop,
    KV-bound); else Poisson arrivals. Clip lengths and output lengths cycle so that every pair of them occurs.
    ``multi-turn``: ``num_requests`` conversations of ``turns`` requests each (indices ``c * turns + t``)."""
    if kind not in WORKLOADS:
        raise ValueError(f"unknown workload {kind!r}: one of {', '.join(WORKLOADS)}")
    if kind == "multi-turn" and (isinstance(turns, bool) or not isinstance(turns, int) or turns < 2):
        raise ValueError(f"a multi-turn workload needs at least 2 turns, got {turns!r}")
    outputs = [output_tokens] if isinstance(output_tokens, int) else list(output_tokens)
    rng = np.random.default_rng(seed)
    system = SHARED_SYSTEM if kind == "shared-prompt" else DEFAULT_SYSTEM
    arrival = 0.0
    requests = []
    for i in range(num_requests):
        if request_rate is not None and i:
            arrival += float(rng.exponential(1.0 / request_rate))
        k = i % len(QUESTIONS)
        wave, max_tokens = synth_clip(clip_seconds[i % len(clip_seconds)], rng), outputs[(i // len(clip_seconds))
                                                                                         % len(outputs)]
        if kind != "multi-turn":
            requests.append(BenchRequest(i, wave, QUESTIONS[k], TASKS[k], max_tokens, arrival, system))
            continue
        first = i * turns
        requests.append(BenchRequest(first, wave, QUESTIONS[k], TASKS[k], max_tokens, arrival, system))
        for t in range(1, turns):
            question, task = FOLLOW_UPS[(i + t - 1) % len(FOLLOW_UPS)]
            requests.append(BenchRequest(first + t, wave, question, task, max_tokens, arrival, system, t,
                                         tuple(range(first, first + t))))
    return requests


def chat_prompt(request: BenchRequest, family: str, questions: dict[int, str], answers: dict[int, str]) -> str:
    """The request's prompt in the model family's chat format: its system message, the clip in the first user turn,
    the earlier turns' questions and answers (``history``), then its question."""
    turns = [(questions[i], answers[i]) for i in request.history]
    return audio_prompt(request.question, family, system=request.system, turns=turns)


def export_for_vllm_bench(requests: list[BenchRequest], folder: str | Path) -> Path:
    """Write the workload as ``vllm bench serve --dataset-name custom_audio`` input: wav files and a JSONL."""
    import soundfile as sf

    if any(r.turn or r.system != DEFAULT_SYSTEM for r in requests):
        raise ValueError("vllm bench serve's custom_audio dataset holds single-turn requests without a system prompt: "
                         "export the 'single' workload only")

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
