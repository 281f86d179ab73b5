"""HeadRouter's routing maths: pure torch, no vLLM import (the engine and offline references share it)."""

from headrouter_vllm.routing.select import select_shared

__all__ = ["select_shared"]
