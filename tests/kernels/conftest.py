"""Kernel tests: Triton kernels run natively on CUDA when there is one, else on CPU under the Triton interpreter.

``TRITON_INTERPRET=1`` must be set when ``@triton.jit`` decorates a kernel, i.e. when its module is imported.
``import_interpreted`` sets it only around importing the kernel modules and restores it at once: the engine tests
in the same pytest process start vLLM, which must see the environment it normally sees. It also fixes the
interpreter's bf16 ``tl.dot``.
"""

from __future__ import annotations

import os

import torch

ON_GPU = torch.cuda.is_available()
TRITON_INTERPRET_BEFORE = os.environ.get("TRITON_INTERPRET")
DEVICE = "cuda" if ON_GPU else "cpu"
KERNEL_MODULES = (
    "headrouter_vllm.kernels.head_sparse_paged_attention.triton",
    "headrouter_vllm.kernels.compact_kv.triton",
    "headrouter_vllm.kernels.probe_scores.triton",
    "headrouter_vllm.kernels.write_kv_cache.triton",
)


if not ON_GPU:
    from headrouter_vllm.kernels.interpreter import import_interpreted

    import_interpreted(*KERNEL_MODULES)
