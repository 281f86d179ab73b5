"""The ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` once in every process (API server, engine core, workers) before it builds
its config. It installs its hooks (see ``patch/``): the engine is configured for HeadRouter only when its
``additional_config`` has a ``headrouter`` section, request options are checked only where a request
names ``headrouter_*`` keys, and the front end counts the reports HeadRouter engines return (Prometheus
metrics); a vanilla engine in the same process is untouched, except for one fix of vLLM's own sizing that both
need alike (``patch/omni_audio_budget.py``: Qwen2.5-Omni's encoder cache fits its longest audio), and Qwen2-Audio's
encoder runs on the real audio only where the engine asks for it (``patch/qwen2_audio_encoder.py``: on by default in
HeadRouter engines, ``additional_config.headrouter_encoder_window`` in vanilla ones). Safe to call any number of times.
"""

from __future__ import annotations

from headrouter_vllm import patch


def register() -> None:
    from vllm.platforms import current_platform

    from headrouter_vllm.patch import (
        attention_backend,
        omni_audio_budget,
        output_processor,
        platform_config,
        qwen2_audio_encoder,
        sampling_params,
    )

    if current_platform.is_cpu():
        patch.apply_once("platform_config", platform_config.apply)
        patch.apply_once("attention_backend", attention_backend.apply)
    elif current_platform.is_cuda():
        # not yet run on a CUDA machine: see docs/gpu.md
        patch.apply_once("platform_config", platform_config.apply)
        attention_backend.register_custom_backend()
    patch.apply_once("sampling_params", sampling_params.apply)
    patch.apply_once("output_processor", output_processor.apply)
    patch.apply_once("omni_audio_budget", omni_audio_budget.apply)
    patch.apply_once("qwen2_audio_encoder", qwen2_audio_encoder.apply)
