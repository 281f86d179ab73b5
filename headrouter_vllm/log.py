"""Loggers under vLLM's ``vllm`` logger, so HeadRouter's lines share vLLM's handler, format and
``VLLM_LOGGING_LEVEL``."""

from __future__ import annotations

import logging


def get_logger(module: str) -> logging.Logger:
    return logging.getLogger("vllm.headrouter." + module.removeprefix("headrouter_vllm."))
