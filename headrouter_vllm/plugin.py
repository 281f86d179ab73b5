"""The ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` once in every process (API server, engine core, workers) before it builds
its config. It installs two inert hooks (see ``patch/``): both act only for an engine whose
``additional_config`` has a ``headrouter`` section, so a vanilla engine in the same process, or on the
same machine, is untouched. Safe to call any number of times.
"""

from __future__ import annotations

from headrouter_vllm import patch


def register() -> None:
    from vllm.platforms import current_platform

    from headrouter_vllm.patch import input_processor, platform_config

    if current_platform.is_cpu():
        patch.apply_once("platform_config", platform_config.apply)
    patch.apply_once("input_processor", input_processor.apply)
