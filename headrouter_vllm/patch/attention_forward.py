"""Patch: observe (probe) or amend (in_prompt) one attention layer's computation.

vLLM 0.32 ``unified_attention_with_output`` calls ``layer.impl.forward(layer, query, key, value, kv_cache,
attn_metadata, output=...)`` with post-RoPE ``query [T, Hq, d]``, ``key [T, Hkv, d]``, after this step's
KV has been written to the cache (CPU_ATTN: ``forward_includes_kv_cache_update = False``). The call runs
eagerly inside a custom op even when the model is torch.compiled, where a module hook would be traced
away. We wrap the bound method as an instance attribute of that layer's impl.
"""

from __future__ import annotations

from collections.abc import Callable


def wrap_impl_forward(impl, before: Callable | None = None, after: Callable | None = None) -> None:
    """``before(layer, query, key, value, kv_cache, attn_metadata)`` runs ahead of the kernel;
    ``after(..., output)`` runs after it and may overwrite rows of ``output``."""
    original = impl.forward

    def forward(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs):
        if before is not None:
            before(layer, query, key, value, kv_cache, attn_metadata)
        result = original(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)
        if after is not None:
            output = kwargs.get("output")
            after(layer, query, key, value, kv_cache, attn_metadata, result if output is None else output)
        return result

    forward.headrouter_original = original
    impl.forward = forward
