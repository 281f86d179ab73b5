"""Cache write in plain torch (the semantics of the Triton kernel and its test oracle).

Token ``t`` of this step goes to flat slot ``slot_mapping[t]``: block ``slot // block_size``, offset
``slot % block_size``, all KV heads. A negative slot (padding, e.g. under CUDA graphs) writes nothing.
"""

from __future__ import annotations

import torch


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Write ``key``/``value`` ``[T, Hkv, d]`` (rows past ``len(slot_mapping)`` ignored) into the caches
    ``[num_blocks, block_size, Hkv, d]`` (may be strided views) at ``slot_mapping`` (int32 or int64 ``[T']``)."""
    block_size = key_cache.shape[1]
    num_tokens = slot_mapping.shape[0]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    key_cache[slots // block_size, slots % block_size] = key[:num_tokens][valid].to(key_cache.dtype)
    value_cache[slots // block_size, slots % block_size] = value[:num_tokens][valid].to(value_cache.dtype)
