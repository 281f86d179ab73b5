"""Cache write: the Triton kernel against the torch reference (bit-exact: it only stores), into vLLM 0.32's
strided K/V views, with padding slots (-1) that must write nothing and every other slot left as it was."""

from __future__ import annotations

import pytest
import torch

from headrouter_vllm.kernels.write_kv_cache import reference, triton
from tests.kernels.conftest import DEVICE

DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.float16, torch.bfloat16)]
CASES = {  # (number of tokens, KV heads, slots written: "scattered", "padded" or "one")
    "scattered_3_heads": (37, 3, "scattered"),
    "padded_tail": (20, 2, "padded"),  # the last rows have slot -1 (CUDA-graph padding)
    "one_token_7_kv_heads": (1, 7, "one"),
    "several_programs_5_heads": (53, 5, "padded"),  # 4 programs of 16 tokens, the last one partly empty
}


def make_inputs(num_tokens: int, num_kv_heads: int, kind: str, dtype, block_size: int, head_size: int):
    generator = torch.Generator().manual_seed(3)
    num_blocks = 8
    storage = torch.randn(num_blocks, num_kv_heads, block_size, 2 * head_size, generator=generator).to(dtype)
    # key/value as the qkv projection hands them over: strided views of one [T, 3, Hkv, d] tensor
    qkv = torch.randn(num_tokens + 2, 3, num_kv_heads, head_size, generator=generator).to(dtype)
    key, value = qkv[:, 1], qkv[:, 2]
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:num_tokens]
    if kind == "padded":
        slots[-5:] = -1
    return storage.to(DEVICE), key.to(DEVICE), value.to(DEVICE), slots.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_size", [32, 64])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
def test_write_kv_cache_matches_reference(case, head_size, block_size, dtype, index_dtype):
    inputs = make_inputs(*CASES[case], dtype, block_size, head_size)
    expected, actual = inputs[0].clone(), inputs[0].clone()
    key, value, slots = inputs[1], inputs[2], inputs[3].to(index_dtype)
    for storage, op in ((expected, reference.write_kv_cache), (actual, triton.write_kv_cache)):
        key_cache, value_cache = storage.transpose(1, 2).split(head_size, dim=-1)
        op(key, value, key_cache, value_cache, slots)
    assert torch.equal(actual, expected)
    key_cache, value_cache = actual.transpose(1, 2).split(head_size, dim=-1)
    valid = slots >= 0
    written = slots[valid].long()
    assert torch.equal(key_cache[written // block_size, written % block_size], key[:len(slots)][valid])
    assert torch.equal(value_cache[written // block_size, written % block_size], value[:len(slots)][valid])
    untouched = torch.ones(actual.shape[0] * block_size, dtype=torch.bool)
    untouched[written] = False
    before = inputs[0].transpose(1, 2).flatten(0, 1)
    assert torch.equal(actual.transpose(1, 2).flatten(0, 1)[untouched], before[untouched])


def test_write_kv_cache_rejects_mismatched_shapes():
    storage, key, value, slots = make_inputs(4, 2, "scattered", torch.float32, 16, 32)
    key_cache, value_cache = storage.transpose(1, 2).split(32, dim=-1)
    with pytest.raises(ValueError, match="key and value must be"):
        triton.write_kv_cache(key[:, :1], value[:, :1], key_cache, value_cache, slots)
    with pytest.raises(ValueError, match="slot_mapping must be"):
        triton.write_kv_cache(key, value, key_cache, value_cache, slots.float())
