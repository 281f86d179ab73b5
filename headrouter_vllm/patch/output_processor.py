"""Patch: count HeadRouter's per-request reports in the front end, for Prometheus (``headrouter_vllm.metrics``).

vLLM 0.32's ``OutputProcessor.process_outputs`` receives every ``EngineCoreOutput`` in the process that serves
the API (``AsyncLLM``) or runs ``LLM`` (``LLMEngine``), streaming or not. A finished routed request's final
output carries its report in ``kv_transfer_params["headrouter"]``; we count it before vLLM turns the outputs into
``RequestOutput``s. There is no hook for this in 0.32: stat loggers only see ``IterationStats``, which do not
carry ``kv_transfer_params``, and custom loggers cannot be given to the OpenAI server.

Inert for engines without HeadRouter: their outputs carry no report (one attribute check per output). Counting
errors are logged, never raised: metrics must not break serving.
"""

from __future__ import annotations

from headrouter_vllm.log import get_logger

logger = get_logger(__name__)


def apply():
    from vllm.v1.engine.output_processor import OutputProcessor

    from headrouter_vllm.metrics import observe_outputs

    original = OutputProcessor.process_outputs
    failed = False

    def process_outputs(self, engine_core_outputs, *args, **kwargs):
        nonlocal failed
        try:
            observe_outputs(engine_core_outputs)
        except Exception:
            if not failed:  # once: a broken report would otherwise log on every step
                logger.exception("HeadRouter could not count a request report in its metrics")
            failed = True
        return original(self, engine_core_outputs, *args, **kwargs)

    OutputProcessor.process_outputs = process_outputs
    return lambda: setattr(OutputProcessor, "process_outputs", original)
