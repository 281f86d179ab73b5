"""The head-profile file: versioned JSON written by ``headrouter-vllm calibrate``, loaded at startup.

```json
{"format": "headrouter-profiles", "version": 1,
 "model": {"architecture": "Qwen2AudioForConditionalGeneration", "num_layers": 4, "num_heads": 4,
           "num_kv_heads": 2, "head_dim": 32},
 "probe_layer": 2, "tau": 0.1,
 "profiles": {"semantic": {"prototype": [...], "weights": [...]}, "acoustic": {...}, "mixed": {...}},
 "position_prior": [[...], ...],            // [num_heads][bins], or null
 "tasks": {"asr": {"semantic": 0.8, "acoustic": 0.1, "mixed": 0.1}, ...},
 "coverage": {"semantic": {"segments": 8, "floor": 0.25}, ...},  // optional, per group (policy coverage);
 "probe_point": {"semantic": "prompt", "acoustic": "first_token", "mixed": "first_token"},
                                            // optional: the default probe point, one for all or per group
                                            // (both written by `headrouter-vllm quality --tune-coverage`)
 "retention": {"groups": {"semantic": 0.3, "acoustic": 0.5, "mixed": 0.5}, "tasks": {"asr": 0.7},
               "tolerance": 2.0},          // optional: retention "auto" (`quality --tune-retention`)
 "router": {"probe_point": "first_token", "prototypes": {"semantic": [...], "acoustic": [...]},
            "scale": [...]},               // optional: the Gaussian group router (`calibrate` writes it);
                                           // with it, the mixed group's probe point may be "routed"
 "calibration": {...}}                      // free-form provenance
```
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from headrouter_vllm.names import BUILTIN_TASKS, GROUPS, MODEL_PROFILES_FILE, PROBE_POINTS
from headrouter_vllm.routing.retention import RetentionTable, RetentionTableError
from headrouter_vllm.routing.router import GroupRouter, Profile
from headrouter_vllm.routing.select import Coverage

FORMAT = "headrouter-profiles"
VERSION = 1


def model_profiles(model_dir: str | Path) -> str | None:
    """The profile file beside a model's checkpoint (``MODEL_PROFILES_FILE``: ``make-model`` writes the listening
    models' tuned one there), if there is one; ``serve`` and ``demo`` use it when none is named."""
    path = Path(model_dir) / MODEL_PROFILES_FILE
    return str(path) if path.is_file() else None


class ProfileError(ValueError):
    """A profile file is malformed or does not match the served model."""


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, hf_config: Any) -> ModelIdentity:
        text = hf_config.get_text_config()
        return cls(architecture=(hf_config.architectures or ["?"])[0], num_layers=text.num_hidden_layers,
                   num_heads=text.num_attention_heads, num_kv_heads=text.num_key_value_heads,
                   head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)


@dataclasses.dataclass(frozen=True)
class ProfileSet:
    model: ModelIdentity
    probe_layer: int
    tau: float
    profiles: dict[str, Profile]
    position_prior: torch.Tensor | None  # [Hq, bins]
    tasks: dict[str, dict[str, float]]
    calibration: dict = dataclasses.field(default_factory=dict)
    coverage: dict[str, Coverage] = dataclasses.field(default_factory=dict)  # per group; empty: Coverage()
    # the engine's default probe point when its config names none: one for every task, or one per task group
    probe_point: str | dict[str, str] | None = None
    # retention "auto": per group (and named task) the smallest retention measured within a tolerance of full audio
    retention: RetentionTable | None = None
    # the Gaussian group router over the first token's row (requests routed ``auto``); None: the cosine router only
    router: GroupRouter | None = None

    def group_probe_point(self, group: str) -> str:
        """The rows a request routed to ``group`` selects with at probe point ``routed``: the group's probe point
        (``prompt`` where the file names none; the first token's row for ``mixed`` at ``routed``)."""
        point = self.probe_point[group] if isinstance(self.probe_point, dict) else self.probe_point
        return "first_token" if point == "routed" else point or "prompt"

    def task_names(self) -> tuple[str, ...]:
        return tuple(self.tasks)

    def check_model(self, model: ModelIdentity, probe_layer: int) -> None:
        if model != self.model:
            raise ProfileError(f"profile file was calibrated for {self.model}, but the served model is {model}")
        if probe_layer != self.probe_layer:
            raise ProfileError(f"profile file was calibrated at probe layer {self.probe_layer}, "
                               f"but the engine probes layer {probe_layer}")

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "model": dataclasses.asdict(self.model),
                "probe_layer": self.probe_layer, "tau": self.tau,
                "profiles": {g: {"prototype": p.prototype.tolist(), "weights": p.weights.tolist()}
                             for g, p in self.profiles.items()},
                "position_prior": None if self.position_prior is None else self.position_prior.tolist(),
                "tasks": self.tasks, "calibration": self.calibration,
                **({"coverage": {g: dataclasses.asdict(c) for g, c in self.coverage.items()}} if self.coverage else {}),
                **({"probe_point": self.probe_point} if self.probe_point else {}),
                **({"retention": self.retention.to_json()} if self.retention is not None else {}),
                **({"router": self.router.to_json()} if self.router is not None else {})}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ProfileSet:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ProfileError(f"profile file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ProfileError(f"profile file {path} is not JSON: {e}") from None
        try:
            return cls.from_json(data)
        except ProfileError as e:
            raise ProfileError(f"profile file {path}: {e}") from None

    @classmethod
    def from_json(cls, data: Any) -> ProfileSet:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ProfileError(f"not a {FORMAT} file")
        if data.get("version") != VERSION:
            raise ProfileError(f"version {data.get('version')!r} is not supported (this release reads {VERSION})")
        try:
            model = ModelIdentity(**data["model"])
            num_heads = model.num_heads
            profiles = {}
            for group in GROUPS:
                entry = data["profiles"][group]
                prototype = _vector(entry["prototype"], num_heads, f"profiles.{group}.prototype")
                weights = _vector(entry["weights"], num_heads, f"profiles.{group}.weights")
                if bool((weights < 0).any()) or not math.isclose(float(weights.sum()), 1.0, rel_tol=1e-4):
                    raise ProfileError(f"profiles.{group}.weights must be non-negative and sum to 1")
                profiles[group] = Profile(prototype, weights)
            prior = data.get("position_prior")
            prior_t = None
            if prior is not None:
                prior_t = torch.tensor(prior, dtype=torch.float32)
                if prior_t.dim() != 2 or prior_t.shape[0] != num_heads or bool((prior_t <= 0).any()):
                    raise ProfileError("position_prior must be [num_heads][bins] of positive numbers")
            tasks = {}
            for name, mix in (data.get("tasks") or {}).items():
                if set(mix) - set(GROUPS) or any(not isinstance(v, (int, float)) or v < 0 for v in mix.values()):
                    raise ProfileError(f"tasks.{name} must map {GROUPS} to non-negative numbers")
                tasks[name] = {g: float(mix.get(g, 0.0)) for g in GROUPS}
            tau = float(data["tau"])
            if not tau > 0:
                raise ProfileError("tau must be positive")
            coverage = _coverage(data.get("coverage"))
            router = _router(data.get("router"), num_heads)
            probe_point = _probe_point(data.get("probe_point"), router is not None)
            retention = None
            if data.get("retention") is not None:
                try:
                    retention = RetentionTable.from_json(data["retention"])
                except RetentionTableError as e:
                    raise ProfileError(str(e)) from None
                unknown = set(retention.tasks) - set(tasks) - set(BUILTIN_TASKS)
                if unknown:
                    raise ProfileError(f"retention.tasks names tasks the file does not define: {sorted(unknown)}")
            return cls(model, int(data["probe_layer"]), tau, profiles, prior_t, tasks, data.get("calibration", {}),
                       coverage, probe_point, retention, router)
        except (KeyError, TypeError) as e:
            raise ProfileError(f"missing or malformed field: {e}") from None


def _vector(values: Any, n: int, name: str) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float32)
    if t.shape != (n,) or not bool(torch.isfinite(t).all()):
        raise ProfileError(f"{name} must be {n} finite numbers")
    return t


def _probe_point(data: Any, has_router: bool) -> str | dict[str, str] | None:
    """One probe point for every group, or one per group; only ``mixed`` (the group of ``auto`` requests) may be
    ``routed`` (the router's group picks the rows), and only in a file with a group router."""
    fixed = tuple(p for p in PROBE_POINTS if p != "routed")
    if isinstance(data, dict):
        if set(data) != set(GROUPS) or any(data[g] not in (PROBE_POINTS if g == "mixed" else fixed) for g in GROUPS):
            raise ProfileError(f"probe_point per group must give every group {GROUPS} one of {fixed} (mixed may also "
                               "be 'routed')")
        if data["mixed"] == "routed" and not has_router:
            raise ProfileError("probe_point.mixed 'routed' needs the group router (a 'router' section: calibrate "
                               "writes it)")
        return dict(data)
    if data is not None and data not in fixed:
        raise ProfileError(f"probe_point must be one of {fixed} (or one per group, where mixed may be 'routed'), "
                           f"got {data!r}")
    return data


def _router(data: Any, num_heads: int) -> GroupRouter | None:
    if data is None:
        return None
    if not isinstance(data, dict) or set(data) != {"probe_point", "prototypes", "scale"}:
        raise ProfileError("router must be {\"probe_point\": \"first_token\", \"prototypes\": {group: [...]}, "
                           "\"scale\": [...]}")
    if data["probe_point"] != "first_token":
        raise ProfileError(f"router.probe_point must be 'first_token', got {data['probe_point']!r}")
    prototypes = data["prototypes"]
    if not isinstance(prototypes, dict) or len(prototypes) < 2 or set(prototypes) - set(GROUPS):
        raise ProfileError(f"router.prototypes must give two or more of the groups {GROUPS}")
    scale = _vector(data["scale"], num_heads, "router.scale")
    if bool((scale <= 0).any()):
        raise ProfileError("router.scale must be positive")
    return GroupRouter("first_token", {g: _vector(prototypes[g], num_heads, f"router.prototypes.{g}")
                                       for g in GROUPS if g in prototypes}, scale)


def _coverage(data: Any) -> dict[str, Coverage]:
    if data is None:
        return {}
    if not isinstance(data, dict) or set(data) != set(GROUPS):
        raise ProfileError(f"coverage must give settings for every group {GROUPS}")
    out = {}
    for group, entry in data.items():
        if not isinstance(entry, dict) or set(entry) - {"segments", "floor"}:
            raise ProfileError(f"coverage.{group} must be {{\"segments\": int, \"floor\": number}}")
        try:
            out[group] = Coverage(**entry)
        except (TypeError, ValueError) as e:
            raise ProfileError(f"coverage.{group}: {e}") from None
    return out
