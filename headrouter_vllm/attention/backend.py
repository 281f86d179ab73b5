"""HeadRouter's attention backend (vLLM's CUSTOM slot): vLLM's standard paged KV layout and our Triton kernels.

* Cache write: ``kernels/write_kv_cache`` (slot -1 = padding, skipped).
* Attention: ``kernels/head_sparse_paged_attention`` for every decoder layer and every batch (decode, prefill,
  mixed). Shared-mode requests are compacted and shortened by the runner, so the kernel just sees shorter
  sequences; each per_head request's region layout (each KV head's kept count and first cell) is in the metadata.
* Probe and compaction are called by the model runner (``headrouter_vllm.runner``) on this backend's caches.

On a GPU this is what HeadRouter serves with. On CPU it is selected by ``headrouter.attention = "triton"`` (or
``HEADROUTER_ATTENTION=triton``) and runs the same kernels under the Triton interpreter: slow, for tests that hold
the GPU path to the CPU path's answers inside the engine. ``headrouter.attention = "torch"`` runs the kernels'
plain-torch references instead (the CPU path for ``per_head`` mode). Only full causal decoder attention in
fp32/fp16/bf16 is supported; anything else is refused when the layer is built, with the reason.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)

from headrouter_vllm.attention.kernels import kernels_for, split_kv_cache

BACKEND_PATH = "headrouter_vllm.attention.backend.HeadRouterAttentionBackend"


@dataclasses.dataclass
class RouteRows:
    """Per batch row (the runner's persistent buffers): which region cells each KV head of a per_head request
    reads (the head-sparse kernel's layout: kept cells from an offset in a region of span_slots slots)."""

    span_start: torch.Tensor  # int32 [max_num_reqs]
    span_slots: torch.Tensor  # int32 [max_num_reqs]; 0 = no region
    kept: torch.Tensor  # int32 [max_num_reqs, Hkv]
    offsets: torch.Tensor  # int32 [max_num_reqs, Hkv]


@dataclasses.dataclass
class HeadRouterAttentionMetadata:
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    seq_lens: torch.Tensor  # int32 [num_seqs]: KV length including this step's tokens (shortened if compacted)
    block_table: torch.Tensor  # int32 [num_seqs, max_blocks]
    slot_mapping: torch.Tensor  # [num_tokens]
    # head-sparse layout per (sequence, KV head): the cells [offsets, offsets + kept) of the region
    # [span_start, span_start + span_slots), numbered column by column (kernels/head_sparse_paged_attention)
    span_start: torch.Tensor  # int32 [num_seqs]
    span_slots: torch.Tensor  # int32 [num_seqs]; 0 = no region
    kept: torch.Tensor  # int32 [num_seqs, Hkv]
    offsets: torch.Tensor  # int32 [num_seqs, Hkv]


class HeadRouterAttentionMetadataBuilder(AttentionMetadataBuilder[HeadRouterAttentionMetadata]):
    # The kernel's grid depends on the step's query and sequence lengths: no full CUDA graphs (piecewise ones,
    # around attention, still work).
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        max_seqs = vllm_config.scheduler_config.max_num_seqs
        num_kv_heads = vllm_config.model_config.get_num_kv_heads(vllm_config.parallel_config)
        self._no_region = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        self._no_kept = torch.zeros(max_seqs, num_kv_heads, dtype=torch.int32, device=device)
        self.route_rows: RouteRows | None = None  # set by HeadRouter's model runner

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> HeadRouterAttentionMetadata:
        m = common_attn_metadata
        num_seqs = m.num_reqs
        rows = self.route_rows
        if rows is not None:
            span_start, span_slots, kept, offsets = rows.span_start, rows.span_slots, rows.kept, rows.offsets
        else:
            span_start, span_slots, kept, offsets = self._no_region, self._no_region, self._no_kept, self._no_kept
        return HeadRouterAttentionMetadata(
            num_actual_tokens=m.num_actual_tokens, max_query_len=m.max_query_len, max_seq_len=m.max_seq_len,
            query_start_loc=m.query_start_loc[:num_seqs + 1], seq_lens=m.seq_lens[:num_seqs],
            block_table=m.block_table_tensor[:num_seqs], slot_mapping=m.slot_mapping,
            span_start=span_start[:num_seqs], span_slots=span_slots[:num_seqs], kept=kept[:num_seqs],
            offsets=offsets[:num_seqs])


def _configured_attention() -> str:
    """``torch`` or ``triton``: which operations this engine's HeadRouter config asks the backend for."""
    from vllm.config import get_current_vllm_config
    from vllm.platforms import current_platform

    from headrouter_vllm.config import HeadRouterConfig

    config = HeadRouterConfig.from_vllm_config(get_current_vllm_config())
    on_cuda = current_platform.is_cuda()
    return "torch" if config is not None and config.resolved_attention(on_cuda) == "torch" else "triton"


class HeadRouterAttentionImpl(AttentionImpl):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int, alibi_slopes,
                 sliding_window: int | None, kv_cache_dtype: str, logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 sinks: torch.Tensor | None = None, **unsupported) -> None:
        refused = {"ALiBi": alibi_slopes is not None, "sliding-window attention": sliding_window is not None,
                   "logit soft-capping": bool(logits_soft_cap), "attention sinks": sinks is not None,
                   "KV sharing across layers": kv_sharing_target_layer_name is not None,
                   f"attention type {attn_type}": attn_type != AttentionType.DECODER,
                   f"KV cache dtype {kv_cache_dtype}": kv_cache_dtype not in ("auto", "float16", "bfloat16",
                                                                              "float32"),
                   **{f"option {k}": True for k, v in unsupported.items() if v not in (None, False, -1)}}
        reasons = [name for name, bad in refused.items() if bad]
        if reasons:
            raise NotImplementedError(f"the HeadRouter attention backend does not support {', '.join(reasons)}")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kernels = kernels_for(_configured_attention())
        # rows per program in prefill and mixed batches: the kernel's GPU default, here too (the interpreter's
        # default is smaller), so that CPU tests run the tile shapes a GPU runs
        self.prefill_block_m = max(64, 1 << (num_heads // num_kv_heads - 1).bit_length())

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        key_cache, value_cache = split_kv_cache(kv_cache, self.head_size)
        self.kernels.write_kv_cache(key, value, key_cache, value_cache, slot_mapping)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: HeadRouterAttentionMetadata, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("the HeadRouter attention backend does not fuse output quantisation")
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        m = attn_metadata
        n = m.num_actual_tokens
        key_cache, value_cache = split_kv_cache(kv_cache, self.head_size)
        self.kernels.attention(query[:n], key_cache, value_cache, m.block_table, m.query_start_loc, m.seq_lens,
                               self.scale, m.span_start, m.span_slots, m.kept, offsets=m.offsets,
                               out=output[:n].view(n, self.num_heads, self.head_size),
                               max_query_len=m.max_query_len, max_seq_len=m.max_seq_len,
                               block_m=self.prefill_block_m if m.max_query_len > 1 else None)
        return output


class HeadRouterAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16", "float32"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[HeadRouterAttentionImpl]:
        return HeadRouterAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[HeadRouterAttentionMetadataBuilder]:
        return HeadRouterAttentionMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int]:
        return [16, 32, 64, 128]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [32, 64, 128]

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER
