"""Patch: validate per-request HeadRouter options in vLLM's front end.

vLLM 0.32 ``InputProcessor._validate_params`` raises ``ValueError`` for bad sampling parameters; the
OpenAI server turns that into an HTTP 400 and ``LLM.generate`` raises it to the caller. We add the
HeadRouter keys of ``SamplingParams.extra_args`` (task, retention) to that check, so a malformed option
never reaches the engine, whichever client sent it. Inert unless the engine has HeadRouter configured.
"""

from __future__ import annotations

from headrouter_vllm.api.options import parse_route_options
from headrouter_vllm.config import CONFIG_KEY


def apply():
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor

    original = InputProcessor._validate_params

    def _validate_params(self, params, *args, **kwargs):
        extra = getattr(self.vllm_config, "additional_config", None)
        if isinstance(params, SamplingParams) and isinstance(extra, dict) and CONFIG_KEY in extra:
            parse_route_options(params.extra_args, prefix="vllm_xargs.")
        return original(self, params, *args, **kwargs)

    InputProcessor._validate_params = _validate_params
    return lambda: setattr(InputProcessor, "_validate_params", original)
