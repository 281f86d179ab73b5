"""The one configuration object of HeadRouter, and the one place that reads its environment.

Engine-wide settings arrive through vLLM's ``--additional-config '{"headrouter": {...}}'`` (or the
``headrouter-vllm serve`` flags, which build that JSON). Per-request options (task, retention) are
in :mod:`headrouter_vllm.options`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

from headrouter_vllm.names import ATTENTION, AUTO, CONFIG_KEY, ENCODER_WINDOW_KEY, MODES, PROBE_POINTS, SEMANTICS
from headrouter_vllm.routing.policies import POLICIES, policy
from headrouter_vllm.routing.tasks import check_task

__all__ = ["ATTENTION", "CONFIG_KEY", "ENCODER_WINDOW_KEY", "MODES", "PROBE_POINTS", "SEMANTICS", "ConfigError",
           "Environment", "HeadRouterConfig", "check_retention", "encoder_window", "environment"]


class ConfigError(ValueError):
    """A HeadRouter setting is unknown or has a bad value."""


@dataclasses.dataclass(frozen=True)
class HeadRouterConfig:
    """Engine-wide HeadRouter settings.

    Attributes:
        retention: fraction of audio tokens kept for requests that name none, in (0, 1]. 1.0 keeps
            everything (requests then run exactly as vanilla vLLM unless they ask for less). ``auto``: each request's
            task (its group for tasks the file does not list; ``mixed`` for ``auto``) gets the retention of the
            profile file's retention table, the smallest measured within a tolerance of full audio on validation
            clips (``headrouter-vllm quality --tune-retention`` writes it).
        mode: ``shared`` (one kept set for every head, the paper's) or ``per_head`` (each KV head keeps its own
            top tokens, budgets proportional to its routed weight, mean ``retention * N``, at most
            ``per_head_cap`` times that; the baseline policies stay shared). ``per_head`` needs
            HeadRouter's backend (``attention`` ``auto``, ``triton`` or ``torch``: each KV head reads its own kept
            audio, the heads' packed one after another into the span's ``retention * N`` slots) and ``after_prompt``.
        per_head_cap: ``per_head``: a KV head keeps at most this multiple of the mean budget (>= 1):
            ``min(N, ceil(cap * retention * N))``. It bounds how unequal the heads' budgets are, not the memory (a
            span holds the mean budget, as in ``shared`` mode).
        probe_layer: decoder layer whose attention picks the kept tokens; ``None`` = the model
            adapter's default.
        semantics: ``after_prompt`` (the prompt step is dense, pruning applies from decode on; exact
            under chunked prefill) or ``in_prompt`` (the text rows after the audio attend only to
            the kept audio from layer ``probe_layer + 1`` on; needs those rows in one prefill chunk) or
            ``prefill`` (the paper's prefill saving: from layer ``probe_layer + 1`` on the dropped audio rows are
            not computed at all, the prompt continues as the shorter sequence, kept audio and text, with the
            original positions; needs the prompt from the first audio token on in one prefill chunk, vLLM's CPU
            attention and ``enforce_eager``).
        probe_point: where the probe reads attention, for requests that name none (``None``: the profile file's
            choice for the request's task group, written by ``quality --tune-coverage``, else ``prompt``).
            ``prompt``: the rows after the audio, in the step that finishes the prompt. ``first_token``: the first
            generated token's row, in the first decode step; in that step the layers above ``probe_layer`` already
            attend to the kept audio only, and the KV is compacted after it (prompt rows run dense whatever
            ``semantics`` says; on a ``per_head`` engine such requests run ``shared``). ``routed``: both, timed as
            ``first_token``; the profile file's group router reads the first token's row, and the rows its group's
            probe point names select (needs a profile file with a router).
        default_task: task for requests that name none (``auto`` = routed from the input alone).
        policy: how kept tokens are chosen for requests that name none (``None``: ``coverage``, the routed score
            spread over the clip with the profile file's per-group settings, which is never below ``uniform`` in
            the quality benchmark; ``headrouter`` on a ``per_head`` engine). ``headrouter`` is routed top-K; the
            rest are baselines (``oracle``, ``fastv``, ``random``, ``uniform``, ``similarity``).
        profiles: path of a calibrated head-profile file (``headrouter-vllm calibrate``); without one,
            ``headrouter`` debiases with the built-in position prior and weights every head equally.
            ``headrouter-vllm serve`` and ``demo`` use the model directory's ``headrouter_profiles.json`` when
            none is named (``make-model`` writes the listening models' tuned one there).
        seed: seed of the ``random`` policy.
        record_probes: keep each routed request's probe measurements in the runner (calibration).
        attention: which attention serves the decoder layers. ``platform``: vLLM's own backend for the machine
            (CPU: CPU_ATTN, HeadRouter's probe and compaction in torch on its pages; GPU: the backend vLLM picks or
            ``--attention-backend`` names, FLASH_ATTN, FLASHINFER or TRITON_ATTN, with HeadRouter's Triton probe and
            compaction kernels on its cache, and vLLM's CUDA graphs); ``shared`` mode only. ``triton``: HeadRouter's
            backend (vLLM's standard paged KV layout, HeadRouter's Triton kernels; each KV head reads its own kept
            audio, packed, which ``per_head`` needs; on CPU the kernels run under the Triton interpreter, slow, for
            tests).
            ``torch``: HeadRouter's backend with the kernels' plain-torch references (the same semantics; the CPU
            path for ``per_head``). ``auto``: ``$HEADROUTER_ATTENTION`` if set, else ``platform`` for ``shared``
            engines and HeadRouter's backend for ``per_head`` ones (``triton`` on a GPU, ``torch`` on CPU).
        admission_headroom: growth-aware admission, in tokens (0: off, vLLM's rule). A waiting request is
            admitted only if the KV pool holds its whole prompt and the blocks every running request, and it, need
            to grow this many tokens more (or to their end; routed requests at their length after compaction).
            Fewer preemptions, at some concurrency; it applies to every request of the engine, routed or not.
        encoder_window: Qwen2-Audio: run the audio tower on the longest real clip of each encoder batch plus a
            margin of 8 mel frames, not on the 30 s the processor pads every clip to (the same outputs: the tower
            masks the padding). Qwen2.5-Omni's encoder already runs on the real frames only. A vanilla engine turns
            it on with ``additional_config={"headrouter_encoder_window": true}``.
    """

    retention: float | Literal["auto"] = 0.7
    mode: Literal["shared", "per_head"] = "shared"
    per_head_cap: float = 1.5
    probe_layer: int | None = None
    semantics: Literal["after_prompt", "in_prompt", "prefill"] = "after_prompt"
    probe_point: Literal["prompt", "first_token", "routed"] | None = None
    default_task: str = "auto"
    policy: str | None = None
    profiles: str | None = None
    seed: int = dataclasses.field(default=0, metadata={"cli": False})  # vLLM's serve has its own --seed
    record_probes: bool = dataclasses.field(default=False, metadata={"cli": False})  # calibration, in-process
    attention: Literal["auto", "platform", "triton", "torch"] = "auto"
    admission_headroom: int = 0
    encoder_window: bool = True

    def __post_init__(self) -> None:
        check_retention(self.retention, "retention", allow_auto=True)
        if self.mode not in MODES:
            raise ConfigError(f"headrouter.mode must be one of {MODES}, got {self.mode!r}")
        if (isinstance(self.per_head_cap, bool) or not isinstance(self.per_head_cap, (int, float))
                or not math.isfinite(self.per_head_cap) or self.per_head_cap < 1.0):
            raise ConfigError(f"headrouter.per_head_cap must be a number >= 1, got {self.per_head_cap!r}")
        if self.probe_layer is not None and (isinstance(self.probe_layer, bool)
                                             or not isinstance(self.probe_layer, int) or self.probe_layer < 0):
            raise ConfigError(f"headrouter.probe_layer must be a non-negative integer, got {self.probe_layer!r}")
        if self.semantics not in SEMANTICS:
            raise ConfigError(f"headrouter.semantics must be one of {SEMANTICS}, got {self.semantics!r}")
        if self.probe_point is not None and self.probe_point not in PROBE_POINTS:
            raise ConfigError(f"headrouter.probe_point must be one of {PROBE_POINTS}, got {self.probe_point!r}")
        if self.probe_point in ("first_token", "routed") and self.semantics != "after_prompt":
            raise ConfigError(f"headrouter.probe_point {self.probe_point!r} probes after the prompt: semantics "
                              f"{self.semantics!r} (which prunes inside the prompt) does not apply; use 'after_prompt'")
        if self.probe_point in ("first_token", "routed") and self.mode == "per_head":
            raise ConfigError("headrouter.mode 'per_head' selects at probe_point 'prompt' only")
        if self.policy is not None and self.policy not in POLICIES:
            raise ConfigError(f"headrouter.policy must be one of {POLICIES}, got {self.policy!r}")
        if self.policy is not None and policy(self.policy).needs_focus:
            raise ConfigError(f"headrouter.policy {self.policy!r} keeps the windows each request names "
                              "(headrouter_focus): it is a per-request policy, not a default")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"headrouter.seed must be an integer, got {self.seed!r}")
        if not isinstance(self.record_probes, bool):
            raise ConfigError(f"headrouter.record_probes must be true or false, got {self.record_probes!r}")
        if self.attention not in ATTENTION:
            raise ConfigError(f"headrouter.attention must be one of {ATTENTION}, got {self.attention!r}")
        if (isinstance(self.admission_headroom, bool) or not isinstance(self.admission_headroom, int)
                or self.admission_headroom < 0):
            raise ConfigError(f"headrouter.admission_headroom must be a non-negative integer (tokens), got "
                              f"{self.admission_headroom!r}")
        if not isinstance(self.encoder_window, bool):
            raise ConfigError(f"headrouter.encoder_window must be true or false, got {self.encoder_window!r}")
        if self.mode == "per_head" and self.semantics != "after_prompt":
            raise ConfigError("headrouter.mode 'per_head' supports semantics 'after_prompt' only")
        if self.mode == "per_head" and self.attention == "platform":
            raise ConfigError("headrouter.mode 'per_head' needs attention 'triton' or 'torch' (vLLM's own attention "
                              "cannot read each head's own packed audio)")
        if self.profiles is not None and not isinstance(self.profiles, str):
            raise ConfigError(f"headrouter.profiles must be a path, got {self.profiles!r}")
        if self.profiles is None:  # with a profile file, its tasks count too: the routing context checks then
            try:
                check_task(self.default_task)
            except ValueError as e:
                raise ConfigError(f"headrouter.default_task: {e}") from None
        elif not isinstance(self.default_task, str):
            raise ConfigError(f"headrouter.default_task must be a task name, got {self.default_task!r}")

    @property
    def default_policy(self) -> str:
        """The policy of requests that name none: ``policy``, else ``coverage`` (``headrouter`` in ``per_head``)."""
        return self.policy or ("headrouter" if self.mode == "per_head" else "coverage")

    def resolved_attention(self, on_cuda: bool = False) -> str:
        """``platform``, ``triton`` or ``torch`` (see ``attention``) on this machine."""
        if self.attention != "auto":
            return self.attention
        if environment().attention:
            return environment().attention
        if self.mode == "per_head":
            return "triton" if on_cuda else "torch"
        return "platform"

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> HeadRouterConfig:
        """Build from the ``headrouter`` section of vLLM's additional config; unknown keys are errors."""
        values = dict(values or {})
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in fields:
                hint = difflib.get_close_matches(key, fields, n=1)
                raise ConfigError(f"unknown headrouter setting {key!r}"
                                  + (f" (did you mean {hint[0]!r}?)" if hint else "")
                                  + f"; known settings: {sorted(fields)}")
        return cls(**values)

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> HeadRouterConfig | None:
        """The config of a vLLM engine, or ``None`` when HeadRouter is not configured for it."""
        extra = getattr(vllm_config, "additional_config", None)
        if not isinstance(extra, dict) or CONFIG_KEY not in extra:
            return None
        section = extra[CONFIG_KEY]
        if not isinstance(section, dict):
            raise ConfigError(f"additional_config.{CONFIG_KEY} must be an object, got {type(section).__name__}")
        return cls.from_dict(section)

    @classmethod
    def required_from_vllm_config(cls, vllm_config: Any, component: str) -> HeadRouterConfig:
        """The config of an engine that runs HeadRouter's ``component`` (scheduler, worker): without a
        ``headrouter`` section that is a startup error, not pruning at a default nobody asked for."""
        config = cls.from_vllm_config(vllm_config)
        if config is None:
            raise ConfigError(f"HeadRouter's {component} needs a {CONFIG_KEY!r} section in vLLM's additional config, "
                              f"e.g. --additional-config '{{\"{CONFIG_KEY}\": {{\"retention\": 0.7}}}}' "
                              f"(headrouter-vllm serve adds it); without HeadRouter, drop --scheduler-cls/--worker-cls")
        return config


def encoder_window(vllm_config: Any) -> bool:
    """Whether an engine runs Qwen2-Audio's audio tower on the real audio only (``HeadRouterConfig.encoder_window``):
    the ``headrouter`` section's setting (default on), else ``additional_config.headrouter_encoder_window`` (a
    vanilla engine; default off). Naming it in both places is an error: one engine, one setting."""
    extra = getattr(vllm_config, "additional_config", None)
    extra = extra if isinstance(extra, dict) else {}
    config = HeadRouterConfig.from_vllm_config(vllm_config)
    if ENCODER_WINDOW_KEY not in extra:
        return config.encoder_window if config is not None else False
    value = extra[ENCODER_WINDOW_KEY]
    if not isinstance(value, bool):
        raise ConfigError(f"additional_config.{ENCODER_WINDOW_KEY} must be true or false, got {value!r}")
    if config is not None:
        raise ConfigError(f"additional_config.{ENCODER_WINDOW_KEY} is for engines without a {CONFIG_KEY!r} section; "
                          f"this one has one: set {CONFIG_KEY}.encoder_window there instead")
    return value


def number_or_word(text: str) -> float | str:
    """A CLI value that is a number or a word (``--retention 0.5``, ``--retention auto``); the config checks it."""
    try:
        return float(text)
    except ValueError:
        return text


@dataclasses.dataclass(frozen=True)
class Setting:
    """One engine setting, as the CLI and the docs show it (from the config's fields and their docs)."""

    name: str
    type: Any  # float, int, str or bool (of the value, ``None`` aside), or number_or_word
    choices: tuple[str, ...] | None
    default: Any
    doc: str  # the field's text in ``HeadRouterConfig``'s Attributes
    cli: bool  # ``headrouter-vllm serve --<name>`` exists

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def settings() -> list[Setting]:
    """Every ``HeadRouterConfig`` field, in order: the one list the CLI's engine flags and the README's settings
    table are made from (``tests/test_config.py`` checks the README against it)."""
    hints = typing.get_type_hints(HeadRouterConfig)
    docs = _attribute_docs(HeadRouterConfig.__doc__ or "")
    out = []
    for field in dataclasses.fields(HeadRouterConfig):
        hint = hints[field.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kinds = [t for t in (typing.get_args(hint) if union else (hint,)) if t is not type(None)]
        kind = kinds[0]
        choices = typing.get_args(kind) if typing.get_origin(kind) is Literal else None
        kind = str if choices else kind
        if kind is float and len(kinds) > 1:  # a number or a word (retention: a fraction or "auto")
            kind = number_or_word
        out.append(Setting(field.name, kind, choices, field.default, docs.get(field.name, ""),
                           field.metadata.get("cli", True)))
    return out


def _attribute_docs(doc: str) -> dict[str, str]:
    """``name: text`` entries of a Google-style ``Attributes:`` section, each text on one line."""
    lines = doc.split("Attributes:", 1)[-1].splitlines()
    docs: dict[str, list[str]] = {}
    current = None
    for line in lines:
        match = re.match(r"^ {8}(\w+): (.*)$", line)
        if match:
            current = match.group(1)
            docs[current] = [match.group(2)]
        elif current and line.startswith(" " * 12):
            docs[current].append(line.strip())
    return {name: " ".join(parts) for name, parts in docs.items()}


def check_retention(value: Any, name: str, allow_auto: bool = False) -> float | str:
    """A retention is a real number in (0, 1] (or ``auto``, where ``allow_auto``: the profile file's retention table
    decides); returns it as float or raises ConfigError naming ``name``."""
    if allow_auto and value == AUTO:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a number in (0, 1]{' or auto' if allow_auto else ''}, got {value!r}")
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{name} must be in (0, 1], got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Environment:
    """Environment variables HeadRouter reads (all optional)."""

    # Fill vacated and freed KV slots with this value after compaction (tests: proves they are never read).
    poison_value: float | None
    # Downloads made when building a model (the Whisper wheel): $HEADROUTER_CACHE, else
    # $XDG_CACHE_HOME/headrouter-vllm, else ~/.cache/headrouter-vllm.
    cache_dir: Path
    # The attention of ``headrouter.attention = "auto"`` (tests select the Triton backend on CPU with it).
    attention: str | None
    # $HEADROUTER_MAX_BODY_MB as set (the HTTP edge's body limit, checked in api/limits.py); "" when unset.
    max_body_mb: str


def environment() -> Environment:
    poison = os.environ.get("HEADROUTER_POISON_FREED_KV")
    cache = os.environ.get("HEADROUTER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "headrouter-vllm")
    attention = os.environ.get("HEADROUTER_ATTENTION") or None
    if attention is not None and attention not in ATTENTION[1:]:
        raise ConfigError(f"HEADROUTER_ATTENTION must be one of {ATTENTION[1:]}, got {attention!r}")
    return Environment(poison_value=float(poison) if poison else None, cache_dir=Path(cache), attention=attention,
                       max_body_mb=os.environ.get("HEADROUTER_MAX_BODY_MB", "").strip())
