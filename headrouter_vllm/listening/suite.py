"""The listening task suite: synthetic audio questions whose answers need the right part of the clip.

Every clip (16 kHz, 2.5-30 s) holds three sounds over a coloured-noise background, in random order with
random gaps of noise between them:

* one **speech** segment from espeak-ng: a digit string ("four seven two") or a carrier sentence with two
  keywords (colours or animals);
* one **beep sequence**: 1-5 pure-tone beeps of one pitch class;
* one **sound event**: a siren, a knock, a chirp or a buzz, whose onset second is part of an answer.

Each clip is asked its semantic question and the six acoustic ones. Answers are ``<tag> <value>``; the values
of ``digits``, ``words`` and ``event`` span several tokens, so under pruning most of the answer is generated
from the kept audio only (the first answer token comes from the dense prompt).

Splits are seeded and disjoint; validation and test hold out voices, two accents, carrier sentences, digit
strings (test digit strings never occur in training) and the longest clips (24-30 s, test only).
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
TOKENS_PER_SECOND = 25  # Qwen2-Audio: 16 kHz -> 100 mel frames/s -> conv stride 2 -> avg-pool 2

TASK_GROUPS: dict[str, str] = {
    "digits": "semantic", "words": "semantic",
    "beeps": "acoustic", "pitch": "acoustic", "noise": "acoustic", "voice": "acoustic", "event": "acoustic",
}
QUESTIONS: dict[str, str] = {
    "digits": "What digits are spoken?",
    "words": "Which colours or animals are mentioned?",
    "beeps": "How many beeps are there?",
    "pitch": "Is the beep pitch low, mid or high?",
    "noise": "What colour is the background noise?",
    "voice": "Is the speaker male or female?",
    "event": "What sound event occurs, and at which second?",
}
# Rewordings of each question that training never saw (the held-out phrasings of the quality benchmark; which of them
# the model answers is measured, not assumed: ``python -m headrouter_vllm.benchmarks.quality.phrasings``)
PARAPHRASES: dict[str, tuple[str, ...]] = {
    "digits": ("Which numbers does the speaker say?", "Tell me the spoken digits.", "What digits are said?"),
    "words": ("Which animals or colours does the speaker name?", "What colours or animals are said?"),
    "beeps": ("Count the beeps.", "How many beeps do you hear?"),
    "pitch": ("How high is the beep?", "Is the beep low, mid or high in pitch?"),
    "noise": ("Which noise colour is in the background?", "What is the colour of the noise?"),
    "voice": ("Is the voice a man's or a woman's?", "Is the speaker female or male?"),
    "event": ("Which sound event happens, and when?", "What event occurs and at which second?"),
}
# The part of the clip a question is about (for region analysis and the region oracle); "all": the whole clip.
TASK_REGION = {"digits": "speech", "words": "speech", "voice": "speech", "beeps": "beeps", "pitch": "beeps",
               "event": "event", "noise": "all"}

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
ANIMALS = ["cat", "dog", "horse", "rabbit", "tiger", "monkey", "snake", "duck"]
KEYWORDS = COLOURS + ANIMALS
PITCH_HZ = {"low": (180.0, 320.0), "mid": (600.0, 900.0), "high": (1800.0, 2800.0)}
NOISES = ("white", "pink", "brown")
EVENTS = ("siren", "knock", "chirp", "buzz")
MAX_SECONDS = 30

TEMPLATES_TRAIN = [
    "i think the {a} and the {b} are over there", "my friend saw a {a} near the {b} house",
    "please bring the {a} box and the {b} bag", "yesterday we talked about the {a} and the {b}",
    "there is a {a} picture next to the {b} one", "look at the {a} thing beside the {b} gate",
    "she said the {a} was better than the {b}", "we found a small {a} behind the {b} door",
    "they painted a {a} and a {b} on the wall",
]
TEMPLATES_HELD_OUT = [
    "nobody expected the {a} to meet the {b} today", "he wrote {a} and then {b} in his notebook",
    "can you see the {a} and the {b} from your window",
]
ACCENTS_TRAIN = ("en-us", "en-gb", "en-gb-x-rp", "en-029")
ACCENTS_HELD_OUT = ("en-gb-scotland", "en-us-nyc")
VOICES_TRAIN = {"male": ("m1", "m2", "m3", "m4", "m5"), "female": ("f1", "f2", "f3")}
VOICES_HELD_OUT = {"male": ("m6", "m7"), "female": ("f4", "f5")}

# split -> (first seed, longest clip in seconds)
SPLITS = {"train": (1_000, 24.0), "validation": (800_000, 30.0), "test": (900_000, 30.0)}


@dataclasses.dataclass
class Clip:
    id: str
    split: str
    seed: int
    wave: np.ndarray  # float32 mono at 16 kHz
    answers: dict[str, str]  # task -> value (the semantic task is digits or words)
    regions: dict[str, tuple[float, float]]  # speech / beeps / event -> (start s, end s)
    voice: str
    text: str

    @property
    def seconds(self) -> float:
        return len(self.wave) / SAMPLE_RATE

    def answer(self, task: str) -> str:
        return f"{task} {self.answers[task]}"

    def meta(self) -> dict:
        return {"id": self.id, "split": self.split, "seed": self.seed, "seconds": round(self.seconds, 3),
                "answers": self.answers, "regions": self.regions, "voice": self.voice, "text": self.text}


def check_tools() -> None:
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (apt-get install -y espeak-ng sox)")


def speak(text: str, voice: str, speed: int) -> np.ndarray:
    """espeak-ng speech resampled to 16 kHz by sox, leading and trailing silence trimmed."""
    with tempfile.TemporaryDirectory() as tmp:
        raw, out = f"{tmp}/raw.wav", f"{tmp}/16k.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", raw, text], check=True, capture_output=True)
        # -D: no dither (sox dithers with random noise by default, which makes the clips differ run to run)
        subprocess.run(["sox", "-D", raw, "-r", str(SAMPLE_RATE), "-b", "16", "-c", "1", out], check=True,
                       capture_output=True)
        with wave.open(out) as w:
            x = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    loud = np.nonzero(np.abs(x) > 1e-3)[0]
    return x[loud[0]:loud[-1] + 1] if len(loud) else x


def _unit_rms(x: np.ndarray) -> np.ndarray:
    return (x / (np.sqrt(np.mean(x ** 2)) + 1e-9)).astype(np.float32)


def coloured_noise(colour: str, n: int, rng: np.random.Generator) -> np.ndarray:
    w = rng.standard_normal(n)
    if colour != "white":
        f = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
        f[0] = f[1]
        w = np.fft.irfft(np.fft.rfft(w) / f ** (0.5 if colour == "pink" else 1.0), n)
    return _unit_rms(w)


def _ramp(x: np.ndarray, seconds: float = 0.005) -> np.ndarray:
    r = min(int(seconds * SAMPLE_RATE), len(x) // 2)
    env = np.ones(len(x), np.float32)
    env[:r], env[len(x) - r:] = np.linspace(0, 1, r), np.linspace(1, 0, r)
    return x * env


def beep_sequence(count: int, hz: float, rng: np.random.Generator) -> np.ndarray:
    parts = []
    for i in range(count):
        t = np.arange(int(rng.uniform(0.08, 0.14) * SAMPLE_RATE)) / SAMPLE_RATE
        parts.append(_ramp(np.sin(2 * np.pi * hz * t).astype(np.float32)))
        if i < count - 1:
            parts.append(np.zeros(int(rng.uniform(0.10, 0.18) * SAMPLE_RATE), np.float32))
    return _unit_rms(np.concatenate(parts))


def sound_event(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Four event classes, each unlike a beep: a warbling siren, knocks, rising chirps, a low buzz."""
    if kind == "siren":
        t = np.arange(int(rng.uniform(0.6, 1.0) * SAMPLE_RATE)) / SAMPLE_RATE
        hz = rng.uniform(550, 750) + rng.uniform(200, 300) * np.sin(2 * np.pi * rng.uniform(2.0, 3.5) * t)
        x = np.sin(2 * np.pi * np.cumsum(hz) / SAMPLE_RATE)
    elif kind == "knock":
        parts = []
        for _i in range(int(rng.integers(3, 5))):
            n = int(0.05 * SAMPLE_RATE)
            decay = np.exp(-np.arange(n) / (0.008 * SAMPLE_RATE))
            burst = np.convolve(rng.standard_normal(n), np.ones(8) / 8, "same") * decay
            parts += [burst, np.zeros(int(rng.uniform(0.12, 0.2) * SAMPLE_RATE))]
        x = np.concatenate(parts[:-1])
    elif kind == "chirp":
        parts = []
        for _ in range(int(rng.integers(2, 4))):
            t = np.arange(int(0.12 * SAMPLE_RATE)) / SAMPLE_RATE
            lo, hi = rng.uniform(1500, 2500), rng.uniform(4000, 6000)
            parts += [_ramp(np.sin(2 * np.pi * (lo * t + (hi - lo) * t ** 2 / (2 * t[-1])))),
                      np.zeros(int(0.06 * SAMPLE_RATE))]
        x = np.concatenate(parts[:-1])
    elif kind == "buzz":
        t = np.arange(int(rng.uniform(0.5, 0.9) * SAMPLE_RATE)) / SAMPLE_RATE
        x = np.sign(np.sin(2 * np.pi * rng.uniform(100, 150) * t)) * 0.7
    else:
        raise ValueError(f"unknown event {kind!r}")
    return _unit_rms(_ramp(x.astype(np.float32)))


def _duration(prng: random.Random, split: str) -> float:
    """A target length: mostly short clips (cheap to train on), a tail up to the split's longest clip; held-out
    splits weigh the long tail more (long clips are where pruning pays)."""
    short, middle = (0.6, 0.88) if split == "train" else (0.4, 0.7)
    u = prng.random()
    if u < short:
        return prng.uniform(2.5, 6.0)
    if u < middle:
        return prng.uniform(6.0, 15.0)
    return prng.uniform(15.0, SPLITS[split][1])


def make_clip(split: str, index: int) -> Clip:
    """Clip ``index`` of ``split``: the same audio and answers on every call (seeded)."""
    first_seed = SPLITS[split][0]
    seed = first_seed + index
    rng, prng = np.random.default_rng(seed), random.Random(seed)
    held_out = split != "train"
    gender = prng.choice(["male", "female"])
    variant = prng.choice((VOICES_HELD_OUT if held_out else VOICES_TRAIN)[gender])
    accent = prng.choice(ACCENTS_HELD_OUT + ACCENTS_TRAIN if held_out else ACCENTS_TRAIN)
    speed = prng.randint(145, 185)
    answers: dict[str, str] = {}
    if prng.random() < 0.5:
        digits = [prng.randrange(10) for _ in range(prng.randint(3, 5))]
        text = " ".join(DIGITS[d] for d in digits)
        answers["digits"] = " ".join(map(str, digits))
    else:
        a, b = prng.sample(KEYWORDS, 2)
        text = prng.choice(TEMPLATES_HELD_OUT if held_out else TEMPLATES_TRAIN).format(a=a, b=b)
        answers["words"] = f"{a} {b}"
    speech = speak(text, f"{accent}+{variant}", speed)
    level = rng.uniform(0.05, 0.1)
    count, pitch, event = prng.randint(1, 5), prng.choice(list(PITCH_HZ)), prng.choice(EVENTS)
    sounds = {"speech": _unit_rms(speech) * level,
              "beeps": beep_sequence(count, rng.uniform(*PITCH_HZ[pitch]), rng) * level * rng.uniform(0.9, 1.6),
              "event": sound_event(event, rng) * level * rng.uniform(0.9, 1.6)}
    order = list(sounds)
    prng.shuffle(order)
    content = sum(len(s) for s in sounds.values()) / SAMPLE_RATE
    minimum_gaps = 4 * 0.15
    total = min(max(_duration(prng, split), content + minimum_gaps + 0.2), MAX_SECONDS - 0.05)
    # Split the spare time into lead, two gaps and tail (Dirichlet), each at least 0.15 s.
    spare = max(total - content - minimum_gaps, 0.0)
    gaps = [0.15 + spare * g for g in rng.dirichlet(np.ones(4))]
    parts, regions, t = [], {}, 0.0
    for k, name in enumerate(order):
        parts.append(np.zeros(int(gaps[k] * SAMPLE_RATE), np.float32))
        t += len(parts[-1]) / SAMPLE_RATE
        parts.append(sounds[name])
        regions[name] = (round(t, 3), round(t + len(sounds[name]) / SAMPLE_RATE, 3))
        t = regions[name][1]
    parts.append(np.zeros(int(gaps[3] * SAMPLE_RATE), np.float32))
    x = np.concatenate(parts)[: int((MAX_SECONDS - 0.05) * SAMPLE_RATE)]
    colour = prng.choice(NOISES)
    snr_db = rng.uniform(12, 22)
    x = np.clip(x + coloured_noise(colour, len(x), rng) * level * 10 ** (-snr_db / 20), -1, 1).astype(np.float32)
    answers.update(beeps=str(count), pitch=pitch, noise=colour, voice=gender,
                   event=f"{event} {int(regions['event'][0] + 0.5)}")
    return Clip(id=f"{split}{index:05d}", split=split, seed=seed, wave=x, answers=answers, regions=regions,
                voice=f"{accent}+{variant}", text=text)


def _make(job: tuple[str, int]) -> Clip:
    return make_clip(*job)


def generate(split: str, count: int, workers: int = 2, progress: bool = False) -> list[Clip]:
    """``count`` clips of ``split``. Test clips whose digit string occurs in training are left out (held-out
    digit strings), so a test set may hold fewer than ``count`` clips; :func:`train_digit_strings` is the
    reference set."""
    check_tools()
    jobs = [(split, i) for i in range(count)]
    if workers > 1:
        from multiprocessing import get_context

        with get_context("fork").Pool(workers) as pool:
            clips = list(_progress(pool.imap(_make, jobs, chunksize=8), count, progress, split))
    else:
        clips = [make_clip(*job) for job in _progress(jobs, count, progress, split)]
    if split != "train":
        seen = train_digit_strings()
        clips = [c for c in clips if c.answers.get("digits") not in seen]
    return clips


def _progress(iterable, total: int, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=f"clips ({desc})")


TRAIN_CLIPS = 3000


def train_digit_strings(count: int = TRAIN_CLIPS) -> set[str]:
    """The digit strings of the first ``count`` training clips, without synthesising audio (same draws)."""
    seen = set()
    for index in range(count):
        prng = random.Random(SPLITS["train"][0] + index)
        prng.choice(VOICES_TRAIN[prng.choice(["male", "female"])])  # the draws of make_clip, in its order
        prng.choice(ACCENTS_TRAIN)
        prng.randint(145, 185)
        if prng.random() < 0.5:
            seen.add(" ".join(str(prng.randrange(10)) for _ in range(prng.randint(3, 5))))
    return seen


def save_waves(clips: list[Clip], out: str | Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    import soundfile as sf

    for clip in clips:
        sf.write(str(out / f"{clip.id}.wav"), clip.wave, SAMPLE_RATE, subtype="PCM_16")
