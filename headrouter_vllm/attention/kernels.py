"""The Triton kernels the HeadRouter backend and runner call, compiled on GPU and interpreted on CPU.

Whether a ``@triton.jit`` kernel is compiled or interpreted is fixed when its module is imported, so the kernel
modules are imported here, once, the right way for the machine.
"""

from __future__ import annotations

import functools
import importlib
from types import SimpleNamespace

import torch

MODULES = {
    "write_kv_cache": "headrouter_vllm.kernels.write_kv_cache.triton",
    "attention": "headrouter_vllm.kernels.head_sparse_paged_attention.triton",
    "probe_scores": "headrouter_vllm.kernels.probe_scores.triton",
    "compact_kv": "headrouter_vllm.kernels.compact_kv.triton",
}


@functools.cache
def triton_kernels() -> SimpleNamespace:
    """``write_kv_cache``, ``attention``, ``paged_probe_scores`` and ``compact_kv``: the public functions of the
    Triton modules. Without CUDA they run under the Triton interpreter (slow: for tests on small models)."""
    if torch.cuda.is_available():
        modules = [importlib.import_module(name) for name in MODULES.values()]
    else:
        from headrouter_vllm.kernels.interpreter import import_interpreted

        modules = import_interpreted(*MODULES.values())
    write, attention, probe, compact = modules
    return SimpleNamespace(write_kv_cache=write.write_kv_cache, attention=attention.head_sparse_paged_attention,
                           paged_probe_scores=probe.paged_probe_scores, compact_kv=compact.compact_kv)


@functools.cache
def torch_kernels() -> SimpleNamespace:
    """The same four operations as :func:`triton_kernels`, as the kernels' plain-torch references (``reference.py``:
    the semantics the Triton kernels are tested against). Launch-tuning keywords are accepted and ignored."""
    from headrouter_vllm.kernels.compact_kv.reference import compact_kv
    from headrouter_vllm.kernels.head_sparse_paged_attention.reference import head_sparse_paged_attention
    from headrouter_vllm.kernels.probe_scores.reference import paged_probe_scores
    from headrouter_vllm.kernels.write_kv_cache.reference import write_kv_cache

    def attention(*args, offsets=None, out=None, max_query_len=None, max_seq_len=None, num_kv_splits=None,
                  block_m=None):
        result = head_sparse_paged_attention(*args, offsets=offsets)
        return result if out is None else out.copy_(result)

    def probe(*args, max_span_len=None, block_m=None, tile_slots=None, max_rows_per_seq=None, max_row_groups=None):
        return paged_probe_scores(*args, max_span_len=max_span_len)

    return SimpleNamespace(write_kv_cache=lambda *args, tokens=16: write_kv_cache(*args), attention=attention,
                           paged_probe_scores=probe,
                           compact_kv=lambda *args, tile=None, max_suffix_len=None, **layout: compact_kv(*args,
                                                                                                         **layout))


def kernels_for(attention: str) -> SimpleNamespace:
    """The operations HeadRouter's backend runs for ``headrouter.attention`` (``torch`` or ``triton``)."""
    return torch_kernels() if attention == "torch" else triton_kernels()


def split_kv_cache(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM 0.32's logical ``[num_blocks, Hkv, block_size, 2 * d]`` layer cache as K and V views
    ``[num_blocks, block_size, Hkv, d]`` (strided; the last dimension contiguous), as its Triton backend reads it."""
    return kv_cache.transpose(1, 2).split(head_size, dim=-1)
