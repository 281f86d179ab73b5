"""Patch: validate HeadRouter's per-request options where vLLM validates ``extra_args``.

vLLM 0.32 ``SamplingParams._verify_extra_args`` runs when a ``SamplingParams`` is built (offline: by the
caller, before ``LLM.generate`` renders anything; server: in ``to_sampling_params``) and raises
``VLLMValidationError`` (vLLM's client error; the OpenAI server answers 400). We also check the
``headrouter_*`` keys there, so a malformed task or retention never reaches the engine.

Why not later (``InputProcessor``): by then the multimodal inputs are rendered and the front end's
multimodal cache has recorded them as sent; a request rejected there leaves the engine's cache behind,
and the next request with the same audio fails. Only our namespaced keys are checked, so other users
of ``extra_args`` are unaffected.
"""

from __future__ import annotations

from headrouter_vllm.options import OPTION_KEYS, OptionError, parse_route_options


def apply():
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams

    original = SamplingParams._verify_extra_args

    def _verify_extra_args(self) -> None:
        original(self)
        if isinstance(self.extra_args, dict) and any(k in self.extra_args for k in OPTION_KEYS):
            try:
                parse_route_options(self.extra_args, prefix="vllm_xargs.")
            except OptionError as e:
                raise VLLMValidationError(str(e), parameter=e.param) from None

    SamplingParams._verify_extra_args = _verify_extra_args
    return lambda: setattr(SamplingParams, "_verify_extra_args", original)
