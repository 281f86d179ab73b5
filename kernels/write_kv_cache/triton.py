"""Cache write in Triton: one program per ``tokens`` tokens (default 16), all of their KV heads at once."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_cache_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, num_tokens,
                           stride_key_tok, stride_key_head, stride_value_tok, stride_value_head,
                           stride_k_blk, stride_k_slot, stride_k_head, stride_v_blk, stride_v_slot, stride_v_head,
                           NUM_KV_HEADS: tl.constexpr, NUM_KV_HEADS_PADDED: tl.constexpr, HEAD_SIZE: tl.constexpr,
                           BLOCK_SIZE: tl.constexpr, TOKENS: tl.constexpr):
    # rows = TOKENS tokens x the padded KV heads; columns = head dims
    rows = tl.arange(0, TOKENS * NUM_KV_HEADS_PADDED)
    token = tl.program_id(0) * TOKENS + rows // NUM_KV_HEADS_PADDED
    head = rows % NUM_KV_HEADS_PADDED
    slot = tl.load(slot_mapping_ptr + token, mask=token < num_tokens, other=-1).to(tl.int64)
    valid = (slot >= 0) & (head < NUM_KV_HEADS)  # padding tokens (slot -1) write nothing
    mask = valid[:, None]
    block = tl.where(valid, slot // BLOCK_SIZE, 0)
    offset = tl.where(valid, slot % BLOCK_SIZE, 0)
    dims = tl.arange(0, HEAD_SIZE)[None, :]
    token = token.to(tl.int64)
    k = tl.load(key_ptr + token[:, None] * stride_key_tok + head[:, None] * stride_key_head + dims, mask=mask)
    v = tl.load(value_ptr + token[:, None] * stride_value_tok + head[:, None] * stride_value_head + dims, mask=mask)
    k_dst = k_cache_ptr + block * stride_k_blk + offset * stride_k_slot + head * stride_k_head
    v_dst = v_cache_ptr + block * stride_v_blk + offset * stride_v_slot + head * stride_v_head
    tl.store(k_dst[:, None] + dims, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst[:, None] + dims, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, *, tokens: int = 16) -> None:
    """Triton version of :func:`.reference.write_kv_cache` (same arguments; in place). ``tokens``: tokens per
    program, a power of two."""
    num_tokens = slot_mapping.shape[0]
    _, block_size, num_kv_heads, head_size = key_cache.shape
    if value_cache.shape != key_cache.shape:
        raise ValueError("key_cache and value_cache must have the same shape")
    if key.shape[0] < num_tokens or key.shape[1:] != (num_kv_heads, head_size) or value.shape != key.shape:
        raise ValueError(f"key and value must be [>= {num_tokens}, {num_kv_heads}, {head_size}], got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    if head_size & (head_size - 1) or block_size & (block_size - 1) or tokens & (tokens - 1):
        raise ValueError(f"head_size ({head_size}), block_size ({block_size}) and tokens ({tokens}) must be powers "
                         "of two")
    for name, t in (("key", key), ("value", value), ("key_cache", key_cache), ("value_cache", value_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    if num_tokens == 0:
        return
    _write_kv_cache_kernel[(triton.cdiv(num_tokens, tokens),)](
        key, value, key_cache, value_cache, slot_mapping, num_tokens,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, NUM_KV_HEADS_PADDED=triton.next_power_of_2(num_kv_heads), HEAD_SIZE=head_size,
        BLOCK_SIZE=block_size, TOKENS=tokens,
    )
