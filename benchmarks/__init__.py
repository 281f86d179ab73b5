"""Benchmarks, installed as ``headrouter_vllm.benchmarks``."""
