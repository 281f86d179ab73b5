"""Kernel tests: Triton kernels run natively on CUDA when there is one, else on CPU under the Triton interpreter.

``TRITON_INTERPRET=1`` must be set when ``@triton.jit`` decorates a kernel, i.e. when its module is imported.
``import_interpreted`` sets it only around importing the kernel modules and restores it at once: the engine tests
in the same pytest process start vLLM, which must see the environment it normally sees.
"""

from __future__ import annotations

import os

import numpy as np
import torch

ON_GPU = torch.cuda.is_available()
TRITON_INTERPRET_BEFORE = os.environ.get("TRITON_INTERPRET")
DEVICE = "cuda" if ON_GPU else "cpu"
KERNEL_MODULES = (
    "headrouter_vllm.kernels.head_sparse_paged_attention.triton",
    "headrouter_vllm.kernels.compact_kv.triton",
    "headrouter_vllm.kernels.probe_scores.triton",
)


def _patch_interpreter_bf16_dot() -> None:
    """The interpreter's ``tl.dot`` multiplies bf16 operands as their raw uint16 bits (triton 3.9); compiled
    Triton is right. Widen bf16 operands to fp32 first (exact), so the bf16 kernels can be tested here."""
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot
    if getattr(original, "_bf16_fixed", False):
        return

    def as_float32(handle):
        if handle.dtype.scalar == tl.bfloat16:
            return (handle.data.astype(np.uint32) << 16).view(np.float32)
        return handle.data.astype(np.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 in (a.dtype.scalar, b.dtype.scalar):
            product = np.matmul(as_float32(a), as_float32(b), dtype=d.data.dtype) + d.data
            return interpreter.TensorHandle(product, d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._bf16_fixed = True
    interpreter.InterpreterBuilder.create_dot = create_dot


if not ON_GPU:
    _patch_interpreter_bf16_dot()
    from headrouter_vllm.kernels.interpreter import import_interpreted

    import_interpreted(*KERNEL_MODULES)
