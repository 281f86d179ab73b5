"""Handles on the scheduler and model runner of an in-process ``vllm.LLM`` engine
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``): for the demo and the tests, which read block counts and kept sets."""

from __future__ import annotations


def engine_core(llm):
    core = llm.llm_engine.engine_core
    if not hasattr(core, "engine_core"):
        raise RuntimeError("the engine runs in another process: set VLLM_ENABLE_V1_MULTIPROCESSING=0")
    return core.engine_core


def scheduler(llm):
    return engine_core(llm).scheduler


def model_runner(llm):
    return engine_core(llm).model_executor.driver_worker.worker.model_runner


def num_free_blocks(llm) -> int:
    return scheduler(llm).kv_cache_manager.block_pool.get_num_free_blocks()
