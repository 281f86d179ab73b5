"""``headrouter-vllm calibrate``: labelled calibration audio → a head-profile file.

The model runs in an in-process vLLM engine, and every sample is probed by the engine's own probe (the same
code that routes served requests). From the probe measurements:

* the position prior: per head, the mean attention at each relative position of the span (``bins`` bins),
  scaled to mean 1;
* each sample's head-behaviour vector (selectivity of the debiased scores);
* the profile of each group: its prototype is the mean behaviour of the group's samples, its head weights
  ``max(P - mean(P), 0)`` normalised (uniform when no head stands out); ``mixed`` uses samples of tasks in the
  ``mixed`` group if any, else all samples;
* the task table: each task's prior leans to its group;
* the group router (:class:`~headrouter_vllm.routing.router.GroupRouter`): every sample is probed a second time at
  the first generated token's row, and each group with samples of its own gets a Gaussian kernel over that row's
  behaviour (its mean, and the pooled within-group spread per head).

Manifest: JSON Lines, one sample per line; paths relative to the manifest's folder::

    {"audio": "clips/a.wav", "task": "asr", "question": "What is said?"}
    {"audio": "clips/b.wav", "task": "dog_bark", "group": "acoustic", "question": "Is there a dog?"}

``task`` is a built-in task or any name with a ``group`` (semantic, acoustic or mixed). Deterministic: no
sampling anywhere, samples in manifest order.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from headrouter_vllm.log import get_logger
from headrouter_vllm.routing.profiles import ModelIdentity, ProfileSet
from headrouter_vllm.routing.router import GroupRouter, Profile
from headrouter_vllm.routing.scores import calibrated_position_prior, debias, selectivity
from headrouter_vllm.routing.tasks import BUILTIN_TASKS, GROUPS, TASK_PRIOR_WEIGHT, group_prior

DEFAULT_TAU = 0.1
logger = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class Sample:
    audio: Path
    task: str
    group: str
    question: str


def read_manifest(path: str | Path) -> list[Sample]:
    path = Path(path)
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            task = entry["task"]
            group = entry.get("group") or BUILTIN_TASKS.get(task) or (task if task in GROUPS else None)
            if group not in GROUPS:
                raise ValueError(f"task {task!r} needs a 'group' of {GROUPS}")
            audio = (path.parent / entry["audio"]).resolve()
            if not audio.is_file():
                raise ValueError(f"audio file {audio} does not exist")
            samples.append(Sample(audio, task, group, entry.get("question", "What is in this audio?")))
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{path}:{number}: {e}") from None
    missing = [g for g in ("semantic", "acoustic") if not any(s.group == g for s in samples)]
    if missing:
        raise ValueError(f"{path}: calibration needs samples of every group; none for {missing}")
    return samples


def position_prior(scores: list[torch.Tensor], bins: int) -> torch.Tensor:
    """Mean attention per head at each relative-position bin, over samples; each head scaled to mean 1."""
    total = torch.zeros(scores[0].shape[0], bins, dtype=torch.float64)
    count = torch.zeros(bins, dtype=torch.float64)
    for s in scores:
        n = s.shape[-1]
        index = ((torch.arange(n, dtype=torch.float64) + 0.5) * bins / n).long().clamp_max(bins - 1)
        share = (s / s.sum(dim=-1, keepdim=True).clamp_min(1e-12)).double() * n  # 1.0 = uniform attention
        total.index_add_(1, index, share)
        count.index_add_(0, index, torch.ones(n, dtype=torch.float64))
    prior = total / count.clamp_min(1.0)
    prior[:, count == 0] = 1.0
    return (prior / prior.mean(dim=1, keepdim=True)).clamp_min(1e-3).float()


def group_profile(behaviours: list[torch.Tensor]) -> Profile:
    prototype = torch.stack(behaviours).mean(dim=0)
    lift = (prototype - prototype.mean()).clamp_min(0.0)
    weights = lift / lift.sum() if float(lift.sum()) > 0 else torch.full_like(prototype, 1.0 / prototype.numel())
    return Profile(prototype, weights)


def build_profiles(samples: list[Sample], scores: list[torch.Tensor], model: ModelIdentity, probe_layer: int,
                   bins: int = 16, tau: float = DEFAULT_TAU, provenance: dict | None = None,
                   first_token_scores: list[torch.Tensor] | None = None) -> ProfileSet:
    """Profiles from per-sample probe scores ``[Hq, N]`` (head attention on the audio, mean over the prompt rows
    after it); ``first_token_scores``, the same samples' first generated token's row, adds the group router."""
    prior = position_prior(scores, bins)

    def behaviour(s: torch.Tensor) -> torch.Tensor:
        return selectivity(debias(s, calibrated_position_prior(prior, s.shape[-1])))

    behaviours = [behaviour(s) for s in scores]
    by_group = {g: [b for b, s in zip(behaviours, samples, strict=True) if s.group == g] for g in GROUPS}
    profiles = {g: group_profile(by_group[g] or behaviours) for g in GROUPS}
    tasks = {s.task: group_prior(s.group, TASK_PRIOR_WEIGHT) for s in samples}
    router = None
    if first_token_scores is not None:
        try:
            router = GroupRouter.fit([behaviour(s) for s in first_token_scores], [s.group for s in samples])
        except ValueError as e:  # too few samples per group: the file routes with the cosine router only
            counts = {g: sum(s.group == g for s in samples) for g in GROUPS}
            logger.warning("calibration: no group router (%s; samples per group: %s)", e, counts)
    return ProfileSet(model, probe_layer, tau, profiles, prior, tasks, provenance or {}, router=router)


def calibrate(model: str, manifest: str | Path, out: str | Path, retention: float = 0.5, bins: int = 16,
              tau: float = DEFAULT_TAU, probe_layer: int | None = None, dtype: str = "auto") -> ProfileSet:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # read the runner's probe records in process
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    import soundfile as sf
    from tqdm import tqdm
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from headrouter_vllm import inprocess
    from headrouter_vllm.options import route_args

    samples = read_manifest(manifest)
    section = {"retention": retention, "record_probes": True, "policy": "uniform"}
    if probe_layer is not None:
        section["probe_layer"] = probe_layer
    llm = LLM(model=model, dtype=dtype, enforce_eager=True, seed=0, enable_prefix_caching=False,
              limit_mm_per_prompt={"audio": 1}, additional_config={"headrouter": section})
    runner = inprocess.model_runner(llm)
    tokenizer = AutoTokenizer.from_pretrained(model)
    scores, first_token_scores = [], []
    for sample in tqdm(samples, desc="calibrating", unit="clip"):
        wave, rate = sf.read(str(sample.audio), dtype="float32", always_2d=True)
        messages = [{"role": "user", "content": [{"type": "audio", "audio": str(sample.audio)},
                                                  {"type": "text", "text": sample.question}]}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        request = {"prompt": prompt, "multi_modal_data": {"audio": (wave.mean(axis=1), rate)}}
        # the prompt rows (profiles, position prior), then the first token's row (the group router): the second
        # request reads its row in the first decode step, after one generated token
        for point, tokens, collected in (("prompt", 1, scores), ("first_token", 2, first_token_scores)):
            before = len(runner.hr_log)
            llm.generate(request, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True,
                                                 extra_args=route_args(retention=retention, probe_point=point)),
                         use_tqdm=False)
            records = list(runner.hr_log)[before:]
            if len(records) != 1 or not records[0].probes:
                raise RuntimeError(f"{sample.audio}: the engine did not probe this clip (too short to prune?)")
            collected.append(records[0].probes[0].head_scores)
    identity = ModelIdentity.of(llm.llm_engine.vllm_config.model_config.hf_config)
    provenance = {"manifest": str(manifest), "samples": len(samples),
                  "tasks": sorted({s.task for s in samples}), "bins": bins}
    profiles = build_profiles(samples, scores, identity, runner.hr_probe_layer, bins, tau, provenance,
                              first_token_scores)
    profiles.save(out)
    return profiles
