"""Run the listening suite's questions through an in-process vLLM engine under each pruning configuration."""

from __future__ import annotations

import dataclasses
import gc

from headrouter_vllm.listening import suite
from headrouter_vllm.listening.train import prompt_text
from headrouter_vllm.names import AUTO, REPORT_KEY
from headrouter_vllm.routing.policies import PER_HEAD_POLICIES
from headrouter_vllm.routing.policies import policy as policy_named

MAX_TOKENS = 12  # the longest answer ("digits 1 2 3 4 5" + <|im_end|>) is 7 tokens
TASK_SPECS = ("named", "group", "auto")


@dataclasses.dataclass(frozen=True)
class Method:
    """One pruning configuration. ``task``: ``"named"`` sends the question's suite task (its profile routes it),
    ``"group"`` its task group (``semantic`` / ``acoustic``: what a user of a task no profile knows can say),
    ``"auto"`` lets the input alone route, ``None`` sends no task. ``profiles``: ``"holdout"`` runs with the profile
    file calibrated and tuned without the held-out tasks' questions (``--holdout-tasks``)."""

    policy: str
    retention: float | str  # a fraction, or "auto": the profile file's retention table picks it per task
    semantics: str = "after_prompt"
    task: str | None = None
    mode: str = "shared"  # per_head: an engine with mode per_head on HeadRouter's backend (torch references)
    probe_point: str | None = None  # None: the engine's (its profile file's choice, else prompt)
    profiles: str = "seen"

    @property
    def routed(self) -> bool:
        return self.retention == AUTO or self.retention < 1.0

    @property
    def label(self) -> str:
        if not self.routed:
            return "full"
        name = self.policy + (f"[{self.task}]" if self.task else "")
        name += "" if self.probe_point is None else f"@{self.probe_point}"
        name += "" if self.semantics == "after_prompt" else f"/{self.semantics}"
        name += "" if self.mode == "shared" else f"/{self.mode}"
        return name + ("" if self.profiles == "seen" else f"/{self.profiles}")

    @property
    def engine(self) -> tuple[str, str, str]:
        """Methods with the same (semantics, mode, profile file) share one engine."""
        return self.semantics, self.mode, self.profiles


def methods(retentions: list[float], policies: list[str], in_prompt_policies: list[str],
            per_head_policies: list[str] = (), holdout_policies: list[str] = (),
            auto_retention_policies: list[str] = (), prefill_policies: list[str] = ()) -> list[Method]:
    """The methods of a run: full audio, then per retention each policy group's; ``auto_retention_policies`` run
    once more at retention ``auto`` (after_prompt, shared, the profile file that saw every task)."""
    for name in per_head_policies:
        if name.partition(":")[0] not in PER_HEAD_POLICIES:
            raise ValueError(f"per_head mode applies to the policies {PER_HEAD_POLICIES} (the baselines stay "
                             f"shared), got {name!r}")
    out = [Method("uniform", 1.0)]
    groups = (("after_prompt", "shared", policies, "seen"), ("in_prompt", "shared", in_prompt_policies, "seen"),
              ("after_prompt", "per_head", per_head_policies, "seen"),
              ("after_prompt", "shared", holdout_policies, "holdout"), ("prefill", "shared", prefill_policies, "seen"))
    at_auto = (("after_prompt", "shared", auto_retention_policies, "seen"),)
    for r in [*retentions, *([AUTO] if auto_retention_policies else [])]:
        for semantics, mode, names, profiles in (at_auto if r == AUTO else groups):
            for name in names:
                spec, _, probe_point = name.partition("@")
                if semantics != "after_prompt" and probe_point not in ("", "prompt"):
                    raise ValueError(f"{name!r}: {semantics} applies at the prompt probe point only (a request probed "
                                     "elsewhere runs after_prompt)")
                policy, _, task = spec.partition(":")
                if task not in ("", *TASK_SPECS):
                    raise ValueError(f"{name!r}: the task after ':' is one of {', '.join(TASK_SPECS)}")
                task = task or ("named" if policy_named(policy).needs_true_task else None)
                out.append(Method(policy, r, semantics, task, mode, probe_point or None, profiles))
    return out


def oracle_focus(clip: suite.Clip, task: str) -> tuple[tuple[float, float], ...]:
    """The ``region`` policy's windows for a question: the part of the clip it is about, from the generator's
    labels (speech for digits / words / voice, the beeps for beeps / pitch, the event; the whole clip for noise).
    This is the "oracle spread": an upper reference, not a deployable method."""
    region = suite.TASK_REGION[task]
    return ((0.0, clip.seconds),) if region == "all" else (clip.regions[region],)


@dataclasses.dataclass
class Answer:
    clip: str
    task: str
    method: str
    retention: float
    text: str
    correct: bool
    audio_tokens: int | None
    kept_tokens: int | None
    model: str = ""
    routed_group: str | None = None  # the group the router weighted most (``None``: not routed, or no profiles)
    served_retention: float | None = None  # the retention the engine's usage report says it served
    served_semantics: str | None = None  # the semantics the usage report says it ran (a request may fall back)


def run_methods(model: str, clips: list[suite.Clip], chosen: list[Method], semantics: str, profiles: str | None,
                engine_kwargs: dict, clips_per_call: int = 8, progress=None, mode: str = "shared",
                skip_tasks: tuple[str, ...] = (), questions: dict[str, str] | None = None) -> list[Answer]:
    """All of ``chosen`` (one semantics and mode) on every question of every clip but ``skip_tasks``', one engine.
    Each generate call holds every method's questions on ``clips_per_call`` clips, so vLLM's encoder cache (keyed by
    the audio's hash) encodes each clip once for all its questions and methods, and the engine still batches
    hundreds of requests. Each routed answer records the group its router weighted most. ``questions``: each task's
    wording (default ``suite.QUESTIONS``, the training's)."""
    from vllm import LLM, SamplingParams

    from headrouter_vllm import inprocess
    from headrouter_vllm.options import route_args

    section = {"retention": 1.0, "semantics": semantics}
    if mode == "per_head":  # served by HeadRouter's backend; on CPU with the kernels' torch references
        section.update(mode="per_head", attention="torch")
    if profiles:
        section["profiles"] = profiles
    llm = LLM(model=model, additional_config={"headrouter": section}, **engine_kwargs)
    runner = inprocess.model_runner(llm)
    answers: list[Answer] = []
    try:
        for first in range(0, len(clips), clips_per_call):
            jobs, prompts, params = [], [], []
            for clip in clips[first:first + clips_per_call]:
                for task in clip.answers:
                    if task in skip_tasks:
                        continue
                    for method in chosen:
                        extra = None
                        if method.routed:
                            named = {"named": task, "group": suite.TASK_GROUPS[task], "auto": "auto",
                                     None: None}[method.task]
                            extra = route_args(retention=method.retention, policy=method.policy, task=named,
                                               probe_point=method.probe_point,
                                               focus=oracle_focus(clip, task)
                                               if policy_named(method.policy).needs_focus else None)
                        jobs.append((clip, task, method))
                        prompts.append({"prompt": prompt_text((questions or suite.QUESTIONS)[task]),
                                        "multi_modal_data": {"audio": (clip.wave, suite.SAMPLE_RATE)}})
                        params.append(SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, extra_args=extra))
            runner.hr_log.clear()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            groups = {log.req_id.split("-")[0]: heaviest_group(log.alpha) for log in runner.hr_log}
            for (clip, task, method), out in zip(jobs, outputs, strict=True):
                usage = (out.kv_transfer_params or {}).get(REPORT_KEY) or {}
                text = out.outputs[0].text.strip()
                answers.append(Answer(clip.id, task, method.label, method.retention, text, text == clip.answer(task),
                                      usage.get("audio_tokens"), usage.get("kept_audio_tokens"),
                                      routed_group=groups.get(out.request_id.split("-")[0]),
                                      served_retention=usage.get("retention"),
                                      served_semantics=usage.get("semantics")))
            if progress is not None:
                progress.update(len(clips[first:first + clips_per_call]))
    finally:
        del llm
        gc.collect()
    return answers


def heaviest_group(alpha: list[dict[str, float] | None] | None) -> str | None:
    """The group with the largest routing weight of a request's (first) clip; ``None`` without a routing mix."""
    mix = alpha[0] if alpha else None
    return max(mix, key=mix.get) if mix else None
