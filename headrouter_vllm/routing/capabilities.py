"""What this process's engine can resolve for a request option: set at startup with the config's routing context
(``routing.context.routing_context``, in the front end, the scheduler and each worker), read by the per-request option
checks (``options.py``), so a request asking for what the engine's profile file lacks is a clear 400 before it runs.
"""

from __future__ import annotations

from headrouter_vllm.names import AUTO


class EngineCapability:
    """One thing a request option needs from the engine's profile file; ``require`` passes the option's value
    through if the engine has it, else raises ValueError saying what is missing."""

    def __init__(self, value: str, refusal: str):
        self.value = value
        self.refusal = refusal
        self.loaded = False

    def set(self, loaded: bool) -> None:
        self.loaded = loaded

    def require(self) -> str:
        if not self.loaded:
            raise ValueError(self.refusal)
        return self.value


# headrouter_retention "auto": the profile file's retention table picks the retention
RETENTION_TABLE = EngineCapability(
    AUTO, f"{AUTO!r} picks the retention from the profile file's retention table, and this engine's profile file has "
          "none (headrouter-vllm quality --tune-retention writes one): send a number in (0, 1]")
# headrouter_probe_point "routed": the profile file's group router picks the probe rows
GROUP_ROUTER = EngineCapability(
    "routed", "'routed' lets the group router pick the probe rows, and this engine has none (no profile file, or one "
              "without a router: headrouter-vllm calibrate writes one): send prompt or first_token")


def register(profiles) -> None:
    """This process's engine serves ``profiles`` (a ProfileSet, or None without a profile file)."""
    RETENTION_TABLE.set(profiles is not None and profiles.retention is not None)
    GROUP_ROUTER.set(profiles is not None and profiles.router is not None)
