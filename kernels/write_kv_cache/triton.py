"""Cache write in Triton: one program per token, all of its KV heads at once (a ``[Hkv, d]`` tile)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_cache_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
                           stride_key_tok, stride_key_head, stride_value_tok, stride_value_head,
                           stride_k_blk, stride_k_slot, stride_k_head, stride_v_blk, stride_v_slot, stride_v_head,
                           NUM_KV_HEADS: tl.constexpr, NUM_KV_HEADS_PADDED: tl.constexpr, HEAD_SIZE: tl.constexpr,
                           BLOCK_SIZE: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:  # padding tokens (slot -1) write nothing
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        heads = tl.arange(0, NUM_KV_HEADS_PADDED)
        dims = tl.arange(0, HEAD_SIZE)
        mask = (heads < NUM_KV_HEADS)[:, None]
        k = tl.load(key_ptr + token * stride_key_tok + heads[:, None] * stride_key_head + dims[None, :], mask=mask)
        v = tl.load(value_ptr + token * stride_value_tok + heads[:, None] * stride_value_head + dims[None, :],
                    mask=mask)
        k_dst = k_cache_ptr + block * stride_k_blk + offset * stride_k_slot + heads[:, None] * stride_k_head
        v_dst = v_cache_ptr + block * stride_v_blk + offset * stride_v_slot + heads[:, None] * stride_v_head
        tl.store(k_dst + dims[None, :], k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_dst + dims[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Triton version of :func:`.reference.write_kv_cache` (same arguments; in place)."""
    num_tokens = slot_mapping.shape[0]
    _, block_size, num_kv_heads, head_size = key_cache.shape
    if value_cache.shape != key_cache.shape:
        raise ValueError("key_cache and value_cache must have the same shape")
    if key.shape[0] < num_tokens or key.shape[1:] != (num_kv_heads, head_size) or value.shape != key.shape:
        raise ValueError(f"key and value must be [>= {num_tokens}, {num_kv_heads}, {head_size}], got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    if head_size & (head_size - 1) or block_size & (block_size - 1):
        raise ValueError(f"head_size ({head_size}) and block_size ({block_size}) must be powers of two")
    for name, t in (("key", key), ("value", value), ("key_cache", key_cache), ("value_cache", value_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    if num_tokens == 0:
        return
    _write_kv_cache_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, NUM_KV_HEADS_PADDED=triton.next_power_of_2(num_kv_heads), HEAD_SIZE=head_size,
        BLOCK_SIZE=block_size,
    )
