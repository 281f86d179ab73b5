"""Per-request HeadRouter options and their validation (pydantic).

A request names its options in ``vllm_xargs`` (which vLLM turns into ``SamplingParams.extra_args``), or
in OpenAI ``metadata`` (string values), which the middleware moves into ``vllm_xargs``:

    headrouter_task       a task name (see routing.tasks) or auto / semantic / acoustic / mixed
    headrouter_retention  fraction of audio tokens kept, in (0, 1], or auto (the profile file's retention table
                          picks it for the request's task)
    headrouter_policy     how kept tokens are chosen: headrouter, or a baseline (oracle, fastv, random, uniform,
                          similarity, coverage), for side-by-side comparisons through the same engine
    headrouter_probe_point  where the probe reads attention: prompt (the rows after the audio), first_token
                          (the first generated token's row) or routed (both; the group router picks, by the
                          routed group's probe point in the profile file)
    headrouter_focus      with policy region: the parts of the clip to keep, in seconds from its start,
                          "start-end" pairs separated by commas ("2.5-7,12-14.5"; in vllm_xargs also a list of
                          such strings or a flat list of numbers); with several clips, every clip's own seconds
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator, model_validator

from headrouter_vllm.names import AUTO, PROBE_POINTS
from headrouter_vllm.routing.capabilities import GROUP_ROUTER, RETENTION_TABLE
from headrouter_vllm.routing.policies import POLICIES, REGISTRY, policy
from headrouter_vllm.routing.tasks import check_task

XARG_TASK = "headrouter_task"
XARG_RETENTION = "headrouter_retention"
XARG_POLICY = "headrouter_policy"
XARG_PROBE_POINT = "headrouter_probe_point"
XARG_FOCUS = "headrouter_focus"
OPTION_KEYS = (XARG_TASK, XARG_RETENTION, XARG_POLICY, XARG_PROBE_POINT, XARG_FOCUS)
FIELD_TO_KEY = {"task": XARG_TASK, "retention": XARG_RETENTION, "policy": XARG_POLICY,
                "probe_point": XARG_PROBE_POINT, "focus": XARG_FOCUS}
MAX_FOCUS_WINDOWS = 64


class OptionError(ValueError):
    """A per-request option is malformed; ``param`` names the offending field."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


class RouteOptions(BaseModel):
    """Validated per-request options; ``None`` means "use the server's default"."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task: str | None = None
    retention: float | str | None = None  # a fraction, or "auto"
    policy: str | None = None
    probe_point: str | None = None
    focus: tuple[tuple[float, float], ...] | None = None  # region: windows in seconds of each clip

    @field_validator("focus", mode="before")
    @classmethod
    def _focus(cls, value: Any) -> Any:
        if value is None:
            return None
        # OpenAI metadata values are strings ("2.5-7,12-14.5"); vLLM's vllm_xargs takes flat lists of strings or
        # numbers (["2.5-7", "12-14.5"] or [2.5, 7, 12, 14.5]); the offline API may also pass [start, end] pairs
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, (list, tuple)) and value and all(isinstance(x, str) for x in value):
            pairs = [x.split("-") for x in value]
            if any(len(pair) != 2 for pair in pairs):
                raise ValueError(f"must be start-end pairs in seconds separated by commas, e.g. '2.5-7,12-14', "
                                 f"got {value!r}")
            value = pairs
        elif isinstance(value, (list, tuple)) and value and not any(isinstance(x, (list, tuple)) for x in value):
            if len(value) % 2:
                raise ValueError(f"a flat list needs start and end of each window, got {len(value)} numbers")
            value = [value[i:i + 2] for i in range(0, len(value), 2)]
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"must be a non-empty list of [start, end] pairs in seconds, got {value!r}")
        if len(value) > MAX_FOCUS_WINDOWS:
            raise ValueError(f"at most {MAX_FOCUS_WINDOWS} windows, got {len(value)}")
        windows = []
        for pair in value:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise ValueError(f"each window must be a [start, end] pair in seconds, got {pair!r}")
            try:
                start, end = (float(x.strip()) if isinstance(x, str) else x for x in pair)
            except ValueError:
                raise ValueError(f"window {pair!r}: start and end must be numbers of seconds") from None
            if any(isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x)
                   for x in (start, end)):
                raise ValueError(f"window {pair!r}: start and end must be finite numbers of seconds")
            if not 0.0 <= start < end:
                raise ValueError(f"window {pair!r}: needs 0 <= start < end (seconds from the clip's start)")
            windows.append((float(start), float(end)))
        return tuple(windows)

    @model_validator(mode="after")
    def _focus_goes_with_region(self, info: ValidationInfo) -> RouteOptions:
        if info.context and info.context.get("one_key"):  # one option checked alone: its pair may be elsewhere
            return self
        reads_focus = self.policy is not None and policy(self.policy).needs_focus
        if reads_focus and self.focus is None:
            raise ValueError(f"policy {self.policy!r} keeps the audio the request names: set headrouter_focus too")
        if self.focus is not None and not reads_focus:
            focus_policies = [p.name for p in REGISTRY.values() if p.needs_focus]
            raise ValueError(f"headrouter_focus is read by policy {' or '.join(map(repr, focus_policies))} only: set "
                             f"headrouter_policy to {focus_policies[0]}")
        return self

    @field_validator("probe_point", mode="before")
    @classmethod
    def _probe_point(cls, value: Any) -> Any:
        value = _one_of(value, PROBE_POINTS, "probe point")
        return GROUP_ROUTER.require() if value == "routed" else value

    @field_validator("policy", mode="before")
    @classmethod
    def _policy(cls, value: Any) -> Any:
        return _one_of(value, POLICIES, "policy")

    @field_validator("task", mode="before")
    @classmethod
    def _task(cls, value: Any) -> Any:
        return None if value is None else check_task(value)

    @field_validator("retention", mode="before")
    @classmethod
    def _retention(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str) and value.strip() == AUTO:
            return RETENTION_TABLE.require()
        if isinstance(value, str):  # OpenAI metadata values are strings
            try:
                value = float(value.strip())
            except ValueError:
                raise ValueError(f"must be a number in (0, 1] or 'auto', got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"must be a number in (0, 1] or 'auto', got {value!r}")
        if not 0.0 < value <= 1.0:
            raise ValueError(f"must be in (0, 1], got {value!r}")
        return float(value)


def _one_of(value: Any, names: tuple[str, ...], what: str) -> Any:
    if value is not None and value not in names:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(names)}")
    return value


def parse_route_options(extra_args: Mapping[str, Any] | None, prefix: str = "", one_key: bool = False) -> RouteOptions:
    """Read the HeadRouter keys of ``extra_args`` (other keys are left to vLLM); raise OptionError. ``one_key``:
    check each value alone, not whether the options go together (``region`` and its ``focus``)."""
    extra_args = extra_args or {}
    values = {field: extra_args.get(key) for field, key in FIELD_TO_KEY.items()}
    try:
        return RouteOptions.model_validate(values, context={"one_key": one_key})
    except ValidationError as e:
        err = e.errors()[0]
        field = FIELD_TO_KEY[str(err["loc"][0])] if err["loc"] else XARG_FOCUS  # the model check: the focus
        message = str(err["msg"]).removeprefix("Value error, ")
        raise OptionError(prefix + field, message) from None


def route_args(task: str | None = None, retention: float | str | None = None, policy: str | None = None,
               probe_point: str | None = None, focus=None) -> dict[str, Any]:
    """``extra_args`` for the offline API: ``SamplingParams(extra_args=route_args(task="asr", retention=0.5))``."""
    options = RouteOptions(task=task, retention=retention, policy=policy, probe_point=probe_point, focus=focus)
    args = {key: getattr(options, field) for field, key in FIELD_TO_KEY.items() if getattr(options, field) is not None}
    if options.focus is not None:  # the string form, which metadata, vllm_xargs and extra_args all take
        args[XARG_FOCUS] = ",".join(f"{start!r}-{end!r}" for start, end in options.focus)
    return args
