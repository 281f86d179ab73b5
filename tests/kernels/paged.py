"""Paged KV caches for kernel tests, laid out as vLLM 0.32's Triton backend sees them, with every slot that a
kernel must not read poisoned with NaN."""

from __future__ import annotations

import torch


class PagedCache:
    """K and V caches ``[num_blocks, block_size, Hkv, d]`` as strided views of one
    ``[num_blocks, Hkv, block_size, 2 * d]`` tensor (vLLM: ``kv_cache.transpose(1, 2).split(d, dim=-1)``).

    Sequences get shuffled, non-adjacent blocks (block 0 is left unused). All slots start as NaN; ``fill``
    writes random values into the slots ``< length`` of each sequence.
    """

    def __init__(self, lengths: list[int], block_size: int, num_kv_heads: int, head_size: int, dtype: torch.dtype,
                 device: str, seed: int = 0, spare_blocks: int = 1):
        self.generator = torch.Generator().manual_seed(seed)
        self.block_size, self.dtype, self.device = block_size, dtype, device
        blocks_per_seq = [-(-n // block_size) for n in lengths]
        max_blocks = max(blocks_per_seq) + spare_blocks
        num_blocks = 1 + sum(blocks_per_seq) + 2
        order = (torch.randperm(num_blocks - 1, generator=self.generator) + 1).tolist()
        table = torch.zeros((len(lengths), max_blocks), dtype=torch.int32)
        for s, n in enumerate(blocks_per_seq):
            table[s, :n] = torch.tensor([order.pop() for _ in range(n)], dtype=torch.int32)
            table[s, n:] = order[0]  # entries past a sequence's blocks point at a NaN block
        self.block_table = table.to(device)
        self.storage = torch.full((num_blocks, num_kv_heads, block_size, 2 * head_size), float("nan"), dtype=dtype,
                                  device=device)
        self.key_cache, self.value_cache = self.storage.transpose(1, 2).split(head_size, dim=-1)
        for s, n in enumerate(lengths):
            self.fill(s, 0, n)

    def slots(self, seq: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        slots = torch.arange(start, stop)
        return self.block_table[seq].cpu().long()[slots // self.block_size], slots % self.block_size

    def fill(self, seq: int, start: int, stop: int) -> None:
        blocks, offsets = self.slots(seq, start, stop)
        shape = (len(blocks),) + tuple(self.key_cache.shape[2:])
        for cache in (self.key_cache, self.value_cache):
            cache[blocks, offsets] = torch.randn(shape, generator=self.generator).to(self.dtype).to(self.device)

    def poison(self, seq: int, start: int, stop: int, kv_head: int | None = None) -> None:
        blocks, offsets = self.slots(seq, start, stop)
        heads = slice(None) if kv_head is None else kv_head
        for cache in (self.key_cache, self.value_cache):
            cache[blocks, offsets, heads] = float("nan")
