"""What routing needs beyond the config's values, built once per process from the config: the profile file's
contents, the tasks it adds, and the probe point each task group uses.

``HeadRouterConfig`` is data and validation only; reading the profile file (and making its operator tasks valid
request tasks in this process) happens here, the first time a process asks for a config's context: at startup in
the front end (``patch/platform_config.py``), the scheduler and each worker's runner. A bad file is a ConfigError
then, before any request.
"""

from __future__ import annotations

import dataclasses
import functools

from headrouter_vllm.config import ConfigError, HeadRouterConfig
from headrouter_vllm.log import get_logger
from headrouter_vllm.names import AUTO
from headrouter_vllm.routing import capabilities
from headrouter_vllm.routing.profiles import ProfileError, ProfileSet
from headrouter_vllm.routing.tasks import check_task, register_operator_tasks, task_group

logger = get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class RoutingContext:
    config: HeadRouterConfig
    profiles: ProfileSet | None  # the profile file's contents; None without one
    # the file's probe point (one, or one per task group) where it applies to this engine, else None
    file_probe_point: str | dict[str, str] | None = None

    def probe_point_for(self, task: str) -> str:
        """The probe point of a request that names none, routed by ``task``: the config's ``probe_point``, else the
        profile file's for that task (on an ``after_prompt``, ``shared`` engine), else ``prompt``."""
        if self.config.probe_point is not None:
            return self.config.probe_point
        point = self.file_probe_point
        if isinstance(point, dict):
            point = point[task_group(task, self.profiles.tasks if self.profiles is not None else None)]
        return point or "prompt"

    def retention_for(self, task: str) -> float:
        """The retention of a request at retention ``auto``, routed by ``task``: the profile file's retention table
        entry for the task, else for its group (``auto``: ``mixed``)."""
        table = self.profiles.retention if self.profiles is not None else None
        if table is None:  # the front end refuses such requests; the engine config's "auto" is checked at startup
            raise ConfigError("retention 'auto' needs a profile file with a retention table")
        return table.for_task(task, task_group(task, self.profiles.tasks))

    @property
    def default_probe_point(self) -> str:
        """The probe point of requests that name neither a probe point nor a task."""
        return self.probe_point_for(self.config.default_task)


def routing_context(config: HeadRouterConfig) -> RoutingContext:
    """The context of ``config`` in this process; its profile file's tasks become valid request tasks here (again
    on every call: cheap, and right after anything reset the table)."""
    context = built_context(config)
    if context.profiles is not None:
        register_operator_tasks(context.profiles.task_names())
    capabilities.register(context.profiles)
    return context


@functools.lru_cache(maxsize=16)
def built_context(config: HeadRouterConfig) -> RoutingContext:
    """Built once per process and config (the file is read once), leaving the process's task table alone after
    that: for pure callers such as ``make_plan``, which run per request once startup has built the context."""
    profiles = load_profiles(config.profiles)
    point = None
    if profiles is not None:
        register_operator_tasks(profiles.task_names())  # default_task may be one of them
        point = profiles.probe_point
        after_prompt_points = {"first_token", "routed"} & set(point.values() if isinstance(point, dict) else (point,))
        if after_prompt_points and (config.semantics != "after_prompt" or config.mode == "per_head"):
            logger.warning("the profile file's probe point %s does not apply to a %s engine: requests that name no "
                           "probe point probe the prompt", " and ".join(sorted(after_prompt_points)),
                           "per_head" if config.mode == "per_head" else config.semantics)
            point = None
    if config.retention == AUTO and (profiles is None or profiles.retention is None):
        raise ConfigError("headrouter.retention 'auto' takes each task's retention from the profile file's retention "
                          "table, and " + ("no profile file is set (headrouter.profiles)" if profiles is None else
                                           f"{config.profiles} has none (headrouter-vllm quality --tune-retention "
                                           "writes one)"))
    if config.probe_point == "routed" and (profiles is None or profiles.router is None):
        raise ConfigError("headrouter.probe_point 'routed' lets the profile file's group router pick the probe rows, "
                          "and " + ("no profile file is set (headrouter.profiles)" if profiles is None else
                                    f"{config.profiles} has no router (headrouter-vllm calibrate writes one)"))
    try:
        check_task(config.default_task)  # an operator task is known once its file is read
    except ValueError as e:
        raise ConfigError(f"headrouter.default_task: {e}") from None
    return RoutingContext(config, profiles, point)


def load_profiles(path: str | None) -> ProfileSet | None:
    """The profile file's contents, or ``None`` without one; a bad file is a ConfigError."""
    if path is None:
        return None
    try:
        return ProfileSet.load(path)
    except ProfileError as e:
        raise ConfigError(f"headrouter.profiles: {e}") from None
