"""Running the kernels interpreted leaves the process as it was: the engine tests in the same pytest run start
vLLM, and another test compiles the kernels for a GPU."""

from __future__ import annotations

import os

import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

from headrouter_vllm.kernels.probe_scores import triton as probe_triton
from tests.kernels import test_probe_scores
from tests.kernels.conftest import ON_GPU, TRITON_INTERPRET_BEFORE

pytestmark = pytest.mark.skipif(ON_GPU, reason="interpreter only")


def test_environment_and_triton_language_are_restored() -> None:
    assert os.environ.get("TRITON_INTERPRET") == TRITON_INTERPRET_BEFORE
    assert not isinstance(probe_triton._probe_scores_kernel, JITFunction)  # yet our kernels are interpreted
    # a kernel calling a helper function and Triton's library functions (tl.sum, tl.max)
    inputs = test_probe_scores.make_inputs(test_probe_scores.CASES["one_audio_token"], torch.float32, 16, 32)
    probe_triton.paged_probe_scores(*inputs)
    if TRITON_INTERPRET_BEFORE != "1":  # else triton's library itself was decorated for the interpreter
        assert isinstance(tl.sum, JITFunction) and isinstance(tl.standard.max, JITFunction)
    assert tl.core.reduce.__module__ == "triton.language.core"  # not an interpreter stand-in
    assert tl.tensor.__add__.__module__ == "triton.language.core"
