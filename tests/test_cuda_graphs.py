"""CUDA graph modes as plain Python (no GPU here): which graph mode each HeadRouter engine gets from vLLM 0.32's own
resolution, and the runner's per-step choice that a step running Python inside the model never replays a FULL graph.

vLLM resolves the graph mode from the least graph support among the engine's attention backends
(``CompilationConfig.resolve_cudagraph_mode_and_sizes``). Shared-mode engines keep vLLM's backend (TRITON_ATTN below;
FLASH_ATTN's FA3 reports the same ALWAYS), so vLLM's default FULL_AND_PIECEWISE stays; HeadRouter's backend
(per_head engines) reports NEVER, which turns that default into PIECEWISE and a hand-set FULL into an error (the
plugin refuses FULL and FULL_DECODE_ONLY for it at config time: tests/test_config.py).
"""

from __future__ import annotations

import types

import pytest
from vllm.config import CompilationConfig, CUDAGraphMode
from vllm.config.compilation import CompilationMode

ATTENTION_SPLIT = list(CompilationConfig._attention_ops)  # vLLM's default splitting ops: attention runs eagerly


def resolve(mode: CUDAGraphMode, builder_cls) -> CUDAGraphMode:
    config = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=mode, splitting_ops=ATTENTION_SPLIT)
    return config.resolve_cudagraph_mode_and_sizes(builder_cls._cudagraph_support, "backend", max_num_reqs=8)


def stock_builder():
    from vllm.v1.attention.backends.triton_attn import TritonAttentionMetadataBuilder

    return TritonAttentionMetadataBuilder


def headrouter_builder():
    from headrouter_vllm.attention.backend import HeadRouterAttentionMetadataBuilder

    return HeadRouterAttentionMetadataBuilder


@pytest.mark.parametrize("mode", ["FULL_AND_PIECEWISE", "FULL", "FULL_DECODE_ONLY", "PIECEWISE"])
def test_shared_mode_keeps_vllms_graph_mode(mode):
    assert resolve(CUDAGraphMode[mode], stock_builder()) == CUDAGraphMode[mode]


def test_headrouters_backend_gets_piecewise_graphs_and_never_full_ones():
    assert resolve(CUDAGraphMode.FULL_AND_PIECEWISE, headrouter_builder()) == CUDAGraphMode.PIECEWISE
    assert resolve(CUDAGraphMode.PIECEWISE, headrouter_builder()) == CUDAGraphMode.PIECEWISE
    with pytest.raises(ValueError, match="not supported"):
        resolve(CUDAGraphMode.FULL, headrouter_builder())


class _VllmDispatch:
    """Stands in for vLLM's ``_determine_batch_execution_and_padding``: the mode it would pick, NONE when forced."""

    def __init__(self, mode: CUDAGraphMode):
        self.mode, self.calls = mode, []

    def _determine_batch_execution_and_padding(self, *args, force_eager=False, **kwargs):
        self.calls.append(force_eager)
        return (CUDAGraphMode.NONE if force_eager else self.mode), "batch descriptor", False, None, None


def runner_deciding(mode: CUDAGraphMode, items: list):
    from headrouter_vllm.route_step import RouteStep
    from headrouter_vllm.runner import HeadRouterRunnerMixin

    class Runner(HeadRouterRunnerMixin, _VllmDispatch):
        pass

    runner = Runner.__new__(Runner)  # the dispatch needs no engine
    _VllmDispatch.__init__(runner, mode)
    runner.hr_step = RouteStep(items, None)
    return runner


def decide(runner):
    return runner._determine_batch_execution_and_padding(4, 4, None, 1)[0]


PROBING = [types.SimpleNamespace(req_id="routed")]  # a routed request whose probe rows are in this step


@pytest.mark.parametrize("mode", ["FULL", "PIECEWISE", "NONE"])
def test_steps_without_a_probe_run_as_vllm_decides(mode):
    """Decode steps of compacted requests included: a shortened request is just a shorter one to a graph."""
    runner = runner_deciding(CUDAGraphMode[mode], [])
    assert decide(runner) == CUDAGraphMode[mode]
    assert runner.calls == [False]


def test_a_probing_step_that_would_replay_a_full_graph_runs_eager():
    """The 1-token final prompt chunk in a uniform-decode batch, or a first_token probe's decode step: vLLM would
    replay a FULL graph, which never runs the wrapped probe layer."""
    runner = runner_deciding(CUDAGraphMode.FULL, PROBING)
    assert decide(runner) == CUDAGraphMode.NONE
    assert runner.calls == [False, True]


def test_a_probing_step_keeps_piecewise_graphs():
    """Under PIECEWISE graphs attention runs eagerly between them, so the wrapped probe layer runs: no change."""
    runner = runner_deciding(CUDAGraphMode.PIECEWISE, PROBING)
    assert decide(runner) == CUDAGraphMode.PIECEWISE
    assert runner.calls == [False]
