"""Reading and moving token slots in CPU_ATTN's paged KV cache (vLLM 0.32): one layer's cache at a time.

Per layer the cache is ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``: one page of
``2 * block_size * head_size`` elements per (block, KV head), K half then V half. Inside a page the layout
depends on the CPU ISA: for ``vec``/``vec16`` the K half is stored transposed (``[head_size, block_size]``)
and V row-major, and ``amx`` may pack differently. So we never assume it: :func:`page_offsets` writes one
token at a time with the backend's own cache-write op and reads back where each channel landed.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
@torch.inference_mode()
def page_offsets(isa: str, dtype: torch.dtype, block_size: int, head_size: int,
                 kv_cache_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Element offsets inside one page of the K and V vector of every in-block slot.

    Returns two int64 tensors ``[block_size, head_size]``: ``koff[t, c]`` is where channel c of the key in
    slot t lives (same for ``voff``).
    """
    from vllm import _custom_ops as ops

    act_dtype = dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16
    # distinct channel values, so the channel order is read back rather than assumed
    marker = (torch.arange(head_size, dtype=torch.float32) + 1).to(act_dtype).view(1, 1, head_size)
    koff = torch.empty(block_size, head_size, dtype=torch.int64)
    voff = torch.empty(block_size, head_size, dtype=torch.int64)
    for t in range(block_size):
        for which, out in ((0, koff), (1, voff)):
            page = torch.zeros(1, 1, block_size, 2 * head_size, dtype=dtype)
            k_cache, v_cache = page.view(1, 1, 2 * block_size, head_size).chunk(2, dim=2)
            k = marker if which == 0 else torch.zeros_like(marker)
            v = marker if which == 1 else torch.zeros_like(marker)
            ops.cpu_attn_reshape_and_cache(k, v, k_cache, v_cache, torch.tensor([t]), isa,
                                           kv_cache_dtype=kv_cache_dtype)
            flat = page.view(-1).float()
            nonzero = torch.nonzero(flat).flatten()
            if nonzero.numel() != head_size:
                raise RuntimeError(f"unexpected CPU_ATTN page layout (isa={isa}, dtype={dtype})")
            out[t] = nonzero[flat[nonzero].argsort()]
    return koff, voff


class CpuAttnLayer:
    """One CPU_ATTN layer cache, addressed by a request's block ids and token slots."""

    def __init__(self, kv_cache: torch.Tensor, isa: str, kv_cache_dtype: str):
        self.num_blocks, self.num_kv_heads, self.block_size, two_hd = kv_cache.shape
        self.head_size = two_hd // 2
        self.pages = kv_cache.view(self.num_blocks, self.num_kv_heads, -1)
        self.koff, self.voff = page_offsets(isa, kv_cache.dtype, self.block_size, self.head_size, kv_cache_dtype)

    def _index(self, block_ids: torch.Tensor, slots: torch.Tensor):
        return block_ids[slots // self.block_size][:, None], slots % self.block_size

    def read(self, block_ids: torch.Tensor, slots: torch.Tensor, values: bool = False) -> torch.Tensor:
        """K (or V) of the given slots: ``[len(slots), num_kv_heads, head_size]`` (a copy)."""
        blocks, offs = self._index(block_ids, slots)
        off = self.voff if values else self.koff
        return self.pages[blocks, :, off[offs]].permute(0, 2, 1)

    def move(self, block_ids: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy K and V of slots ``src`` to slots ``dst`` (all heads). Safe when the ranges overlap:
        the gather copies before the scatter writes."""
        sb, so = self._index(block_ids, src)
        db, do = self._index(block_ids, dst)
        for off in (self.koff, self.voff):
            self.pages[db, :, off[do]] = self.pages[sb, :, off[so]]

    def fill(self, block_ids: torch.Tensor, slots: torch.Tensor, value: float) -> None:
        blocks, offs = self._index(block_ids, slots)
        for off in (self.koff, self.voff):
            self.pages[blocks, :, off[offs]] = value
