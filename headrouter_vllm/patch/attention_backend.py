"""Patch: let the CPU platform select HeadRouter's attention backend (vLLM's CUSTOM slot).

vLLM 0.32 ``CpuPlatform.get_attn_backend_cls`` returns CPU_ATTN whatever backend was selected (it logs "Cannot
use ... on CPU"). With ``headrouter.attention = "triton"`` the engine config selects ``CUSTOM``, registered to
our backend; then, and only then, we return its path, so that the GPU path (vLLM's standard paged KV layout, our
Triton kernels, interpreted) runs inside the CPU engine for tests. Any other selection goes to vLLM's method.
"""

from __future__ import annotations

from headrouter_vllm.attention.backend import BACKEND_PATH


def register_custom_backend() -> bool:
    """Register our backend in vLLM's CUSTOM slot unless another plugin holds it; True if the slot is ours."""
    from vllm.v1.attention.backends import registry

    custom = registry.AttentionBackendEnum.CUSTOM
    current = registry._ATTN_OVERRIDES.get(custom)
    if current is None:
        registry.register_backend(custom, BACKEND_PATH)
        return True
    return current == BACKEND_PATH


def apply():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    original = CpuPlatform.__dict__["get_attn_backend_cls"]

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend == AttentionBackendEnum.CUSTOM and register_custom_backend():
            return BACKEND_PATH
        return original.__func__(cls, selected_backend, attn_selector_config, num_heads)

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    return lambda: setattr(CpuPlatform, "get_attn_backend_cls", original)
