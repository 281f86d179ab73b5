"""HeadRouter for vLLM: task-routed, head-aware audio token pruning, served by vLLM."""

__version__ = "0.1.0"
