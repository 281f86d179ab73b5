"""The probe and compaction kernels on every KV-cache layout vLLM 0.32 allocates for its stock GPU backends
(FLASH_ATTN, TRITON_ATTN, FLASHINFER), called the way HeadRouter's ``PagedKv`` store calls them there.

vLLM 0.32 gives every attention layer one logical ``[num_blocks, Hkv, block_size, 2 * d]`` view of one int8
allocation shared by all layers (``vllm/v1/worker/utils.py`` ``allocate_kv_cache`` ->
``vllm/v1/kv_cache_interface.py`` ``create_kv_cache_views``). Its strides follow the resolved ``KVCacheLayout``
(``vllm/v1/kv_cache_layout.py``), named by the physical order of L (layer), B (block), H (KV head), N (slot in
the block) and C (the K and V halves, ``2 * d``):

* LBNHC, the default, is what FLASH_ATTN and TRITON_ATTN get. They declare no layouts, so
  ``_DEFAULT_LAYOUT_PREFERENCE`` applies (``vllm/v1/attention/backends/utils.py``).
* LBHNC and BLHNC are what FLASHINFER asks for on sm100 (``flashinfer.py`` ``supported_kv_cache_layouts``).
* BLNHC, or any of them, can be forced through ``VLLM_KV_CACHE_LAYOUT``.

In the L-outer layouts each layer owns one contiguous region of the allocation. In the B-outer layouts the
layers' pages alternate block by block, so a layer's blocks are strided past the other layers' pages. The
backends read K and V as ``kv_cache.transpose(1, 2).split(d, -1)`` (``flash_attn.py:1252``,
``triton_attn.py:796``): ``[num_blocks, block_size, Hkv, d]`` views whose strides depend on the layout. HeadRouter's
kernels are stride-generic, and on a stock backend these views are what they probe and compact. For each layout,
dtype and two block sizes, with an odd KV head count (3) and on the second of two layers sharing the
allocation, this file checks that:

1. ``split_kv_cache`` is FlashAttention's split: the same views, not copies.
2. ``compact_kv`` (Triton) leaves the layer bit for bit as the torch reference leaves a contiguous copy of it.
   It writes nothing outside its destination slots and nothing of the other layer. Every slot that holds no KV
   is NaN, so a wrong read shows. After the slots the request gives back are poisoned with NaN, each head's live
   slots are exactly its kept sequence.
3. ``paged_probe_scores`` (Triton) equals the torch reference on a contiguous copy, within ``test_probe_scores``'
   tolerances.
4. The views have the strides vLLM gives them. Those differ from a contiguous tensor's and, for the non-default
   layouts, from the default layout's, so a kernel that assumed either would fail here.

Where vLLM is installed, the views come from vLLM's own allocation code. Without it (the GPU check's kernel
tests need only torch and triton), they are the same permutation rebuilt here, and
``test_rebuilt_views_match_vllm`` pins the two against each other.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from types import SimpleNamespace

import pytest
import torch

from headrouter_vllm.attention.kernels import split_kv_cache
from headrouter_vllm.kernels.compact_kv import reference as compact_reference
from headrouter_vllm.kernels.compact_kv import triton as compact_triton
from headrouter_vllm.kernels.probe_scores import reference as probe_reference
from headrouter_vllm.kernels.probe_scores import triton as probe_triton
from tests.kernels.conftest import DEVICE
from tests.kernels.test_probe_scores import TOLERANCES as PROBE_TOLERANCES

HAS_VLLM = importlib.util.find_spec("vllm") is not None
LAYOUTS = ("LBNHC", "LBHNC", "BLNHC", "BLHNC")
DEFAULT_LAYOUT = "LBNHC"
LAYER_NAMES = ("model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn")  # one allocation, as in vLLM
LAYER = 1  # the layer under test: a nonzero offset (L-outer), pages between its blocks (B-outer)
NUM_KV_HEADS, NUM_HEADS, HEAD_SIZE = 3, 6, 32
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.bfloat16, torch.float16)]
BLOCK_SIZES = [pytest.param(b, id=f"bs{b}") for b in (16, 32)]
BITS = {4: torch.int32, 2: torch.int16}  # element size -> the integer dtype whose view compares bits (NaN included)

# Element strides of a layer's logical [B, H, N, C] view, and the offset between consecutive layers' views, for L
# layers of B blocks: the physical order the layout's name spells, densely packed.
STRIDES = {
    "LBNHC": lambda L, B, H, N, C: ((N * H * C, C, H * C, 1), B * N * H * C),
    "LBHNC": lambda L, B, H, N, C: ((H * N * C, N * C, C, 1), B * H * N * C),
    "BLNHC": lambda L, B, H, N, C: ((L * N * H * C, C, H * C, 1), N * H * C),
    "BLHNC": lambda L, B, H, N, C: ((L * H * N * C, N * C, C, 1), H * N * C),
}


def vllm_views(layout: str, num_blocks: int, block_size: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Every layer's ``[B, H, N, 2d]`` view, from vLLM's own code path. The layout is recorded as the engine core
    records its resolution. ``get_kv_cache_config_from_groups`` computes the layer and block strides, and
    ``allocate_kv_cache`` allocates and builds the views."""
    from vllm.config import AttentionConfig, CacheConfig
    from vllm.v1.attention.backends.utils import record_kv_cache_layout
    from vllm.v1.core.kv_cache_utils import get_kv_cache_config_from_groups
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheGroupSpec
    from vllm.v1.worker.utils import allocate_kv_cache

    spec = FullAttentionSpec(block_size=block_size, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_SIZE, dtype=dtype)
    cache_config = CacheConfig(block_size=block_size)
    record_kv_cache_layout(cache_config, layout)
    # get_kv_cache_config_from_groups reads only these two configs (vllm/v1/core/kv_cache_utils.py:1588-1688).
    # A whole VllmConfig would let the CPU platform rewrite os.environ for the rest of the test process.
    config = SimpleNamespace(cache_config=cache_config, attention_config=AttentionConfig())
    groups = [KVCacheGroupSpec(list(LAYER_NAMES), spec)]
    memory = num_blocks * len(LAYER_NAMES) * spec.page_size_bytes  # these pages need no padding
    kv_cache_config = get_kv_cache_config_from_groups(config, groups, memory)
    assert kv_cache_config.num_blocks == num_blocks
    caches = allocate_kv_cache(kv_cache_config, torch.device(DEVICE), cache_config.get_resolved_kv_cache_layout())
    return [caches[name] for name in LAYER_NAMES]


def rebuilt_views(layout: str, num_blocks: int, block_size: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """vLLM's views without vLLM. This copies what three functions do for one KVCacheTensor with no page padding
    and no kernel-block split:
    * ``compute_layout_strides`` (``vllm/v1/kv_cache_interface.py:338-374``): dense strides in the layout's
      physical order.
    * ``get_kv_cache_config_from_groups`` (``vllm/v1/core/kv_cache_utils.py:1622-1672``): layer and block strides,
      with the layers interleaved per block in the B-outer layouts.
    * ``create_kv_cache_views`` (``vllm/v1/kv_cache_interface.py:377-436``): one ``view_5d[l]`` per layer."""
    sizes = {"L": len(LAYER_NAMES), "B": num_blocks, "H": NUM_KV_HEADS, "N": block_size, "C": 2 * HEAD_SIZE}
    strides, step = {}, 1
    for axis in reversed(layout):
        strides[axis] = step
        step *= sizes[axis]
    buffer = torch.zeros(step, dtype=dtype, device=DEVICE)
    shape = tuple(sizes[a] for a in "BHNC")
    return [buffer.as_strided(shape, tuple(strides[a] for a in "BHNC"), layer * strides["L"])
            for layer in range(sizes["L"])]


def allocate(layout: str, num_blocks: int, block_size: int, dtype: torch.dtype) -> list[torch.Tensor]:
    return (vllm_views if HAS_VLLM else rebuilt_views)(layout, num_blocks, block_size, dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().view(BITS[t.element_size()])


class LayerCache:
    """Layer ``LAYER`` of a two-layer allocation in ``layout``. Its sequences sit on shuffled, non-adjacent blocks
    (block 0, vLLM's null block, stays unused). Slots ``< length`` of each sequence hold random K and V, every
    other slot of the layer is NaN, and the other layer is random everywhere, so a read from it is wrong but
    finite."""

    def __init__(self, layout: str, lengths: list[int], block_size: int, dtype: torch.dtype, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.block_size, self.dtype = block_size, dtype
        blocks_per_seq = [-(-n // block_size) for n in lengths]
        num_blocks = 1 + sum(blocks_per_seq) + 2
        self.layers = allocate(layout, num_blocks, block_size, dtype)
        self.kv_cache = self.layers[LAYER]
        self.kv_cache.fill_(float("nan"))
        other = self.layers[1 - LAYER]
        other.copy_(self.random(other.shape))
        self.key_cache, self.value_cache = split_kv_cache(self.kv_cache, HEAD_SIZE)
        order = (torch.randperm(num_blocks - 1, generator=self.generator) + 1).tolist()
        self.block_ids = [torch.tensor([order.pop() for _ in range(n)]) for n in blocks_per_seq]  # as item.block_ids
        for s, n in enumerate(lengths):
            blocks, offsets = self.slots(s, torch.arange(n))
            for cache in (self.key_cache, self.value_cache):
                cache[blocks, offsets] = self.random((n, NUM_KV_HEADS, HEAD_SIZE))

    def random(self, shape) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator).to(self.dtype).to(DEVICE)

    def slots(self, seq: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(physical block, offset in the block) of a sequence's slots, on the cache's device."""
        slots = slots.long().cpu()
        return self.block_ids[seq][slots // self.block_size].to(DEVICE), (slots % self.block_size).to(DEVICE)


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layer_views(layout: str, block_size: int) -> None:
    """The per-layer views have the layout's strides and offsets, the layers do not overlap, and K/V are
    non-contiguous. For the non-default layouts, K/V also differ from the default layout's."""
    num_blocks, num_layers, c = 5, len(LAYER_NAMES), 2 * HEAD_SIZE
    views = allocate(layout, num_blocks, block_size, torch.float32)
    strides, layer_step = STRIDES[layout](num_layers, num_blocks, NUM_KV_HEADS, block_size, c)
    for layer, view in enumerate(views):
        assert view.shape == (num_blocks, NUM_KV_HEADS, block_size, c)
        assert view.stride() == strides
        assert view.storage_offset() - views[0].storage_offset() == layer * layer_step
    # LBHNC alone stores a layer as a plain [B, H, N, C] tensor; the default is [B, N, H, C] physically
    assert views[LAYER].is_contiguous() == (layout == "LBHNC")
    key_cache, value_cache = split_kv_cache(views[LAYER], HEAD_SIZE)
    b, h, n, _ = strides
    assert key_cache.stride() == value_cache.stride() == (b, n, h, 1)  # [B, N, H, d]
    assert value_cache.storage_offset() == key_cache.storage_offset() + HEAD_SIZE
    assert not key_cache.is_contiguous() and key_cache.stride() != torch.empty(key_cache.shape).stride()
    if layout != DEFAULT_LAYOUT:
        default_key, _ = split_kv_cache(allocate(DEFAULT_LAYOUT, num_blocks, block_size, torch.float32)[LAYER],
                                        HEAD_SIZE)
        assert key_cache.stride() != default_key.stride()
    # the layers own disjoint slots of the allocation
    views[1 - LAYER].fill_(0.0)
    views[LAYER].fill_(1.0)
    assert views[1 - LAYER].eq(0).all() and views[LAYER].eq(1).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rebuilt_views_match_vllm(layout: str, block_size: int, dtype: torch.dtype) -> None:
    """The views rebuilt without vLLM are the ones vLLM allocates: the same geometry over the same buffer size."""
    pytest.importorskip("vllm")
    ours, theirs = rebuilt_views(layout, 5, block_size, dtype), vllm_views(layout, 5, block_size, dtype)
    for a, b in zip(ours, theirs, strict=True):
        assert (a.shape, a.stride(), a.storage_offset(), a.dtype) == (b.shape, b.stride(), b.storage_offset(), b.dtype)
        assert a.untyped_storage().nbytes() == b.untyped_storage().nbytes()


def test_stock_backends_take_the_default_preference() -> None:
    """FLASH_ATTN and TRITON_ATTN declare no layouts. vLLM resolves them to LBNHC first, and they accept every
    layout here (any of them can be forced with ``VLLM_KV_CACHE_LAYOUT``). FLASHINFER's sm100 preference (LBHNC,
    BLHNC) needs the flashinfer package, absent on CPU, to import its backend."""
    pytest.importorskip("vllm")
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
    from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend
    from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts

    layouts = [layout.name for layout in get_supported_kv_cache_layouts([FlashAttentionBackend,
                                                                         TritonAttentionBackend])]
    assert layouts[0] == DEFAULT_LAYOUT
    assert set(LAYOUTS) <= set(layouts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_split_is_flash_attention_split(layout: str, block_size: int, dtype: torch.dtype) -> None:
    for kv_cache in allocate(layout, 5, block_size, dtype):
        ours = split_kv_cache(kv_cache, HEAD_SIZE)
        flash = kv_cache.transpose(1, 2).split(HEAD_SIZE, dim=-1)  # vllm/v1/attention/backends/flash_attn.py:1252
        for a, b in zip(ours, flash, strict=True):
            assert a.shape == (5, block_size, NUM_KV_HEADS, HEAD_SIZE)
            assert (a.shape, a.stride(), a.data_ptr(), a.dtype) == (b.shape, b.stride(), b.data_ptr(), b.dtype)


@dataclasses.dataclass(frozen=True)
class CompactionCase:
    total_len: int  # the request's KV slots before compaction
    span_start: int  # the compacted region: first audio span .. end of the last
    span_len: int
    counts: tuple[int, ...]  # surviving slots per KV head (each b_max in shared mode)
    b_max: int  # the region's slots after compaction

    @property
    def offsets(self) -> tuple[int, ...]:
        """Each head's first cell in the region: packed one after another (in shared mode, its own column)."""
        return tuple(sum(self.counts[:g]) for g in range(len(self.counts)))


COMPACTIONS = {
    # shared mode, what the stock backends serve: every head keeps the same slots. The region starts mid-block
    # and the suffix crosses blocks.
    "shared": CompactionCase(75, 5, 50, (20, 20, 20), b_max=20),
    # per_head (the head-sparse backend only): each head keeps its own slots, packed at the mean count, so head 0
    # spills into head 1's column and head 1 into head 2's (phase B)
    "per_head": CompactionCase(75, 5, 50, (27, 13, 20), b_max=20),
}


def kept_slots(case: CompactionCase, generator: torch.Generator, shared: bool) -> torch.Tensor:
    """``compact_kv``'s ``[1, Hkv, max count]`` int32 kept slots: ascending, inside the region, -1 padded."""
    kept = torch.full((1, NUM_KV_HEADS, max(case.counts)), -1, dtype=torch.int32)
    region = torch.arange(case.span_start, case.span_start + case.span_len, dtype=torch.int32)
    chosen = None
    for g, count in enumerate(case.counts):
        if chosen is None or not shared:
            chosen = region[torch.randperm(case.span_len, generator=generator)[:count]].sort().values
        kept[0, g, :count] = chosen
    return kept


# shared mode in every dtype; per_head (not served by the stock backends) in the serving dtype only, to stay fast
COMPACTION_PARAMS = [pytest.param(p.values[0], "shared", id=f"{p.id}-shared") for p in DTYPES] + [
    pytest.param(torch.bfloat16, "per_head", id="bfloat16-per_head")]


@pytest.mark.parametrize(("dtype", "name"), COMPACTION_PARAMS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_compact_kv(layout: str, block_size: int, dtype: torch.dtype, name: str) -> None:
    case = COMPACTIONS[name]
    cache = LayerCache(layout, [case.total_len], block_size, dtype, seed=1)
    kept = kept_slots(case, cache.generator, shared=name == "shared")
    int32 = {"dtype": torch.int32, "device": DEVICE}
    # as _PagedCompaction.apply calls it: the request's block list as a one-row table, the suffix length given
    args = (cache.block_ids[0].to(**int32)[None], torch.tensor([case.span_start], **int32),
            torch.tensor([case.span_len], **int32), torch.tensor([case.total_len], **int32), kept.to(DEVICE),
            torch.tensor([case.b_max], **int32), torch.tensor([case.offsets], **int32))
    before, other_before = cache.kv_cache.clone(), cache.layers[1 - LAYER].clone()
    expected = cache.kv_cache.clone(memory_format=torch.contiguous_format)  # a copy even where contiguous (LBHNC)
    compact_reference.compact_kv(*split_kv_cache(expected, HEAD_SIZE), *args)
    compact_triton.compact_kv(cache.key_cache, cache.value_cache, *args,
                              max_suffix_len=case.total_len - case.span_start - case.span_len)

    assert torch.equal(bits(cache.kv_cache), bits(expected))
    written = torch.zeros(cache.kv_cache.shape[:3], dtype=torch.bool)  # [B, H, N]: the moves' destinations
    moves = [compact_reference.head_moves(case.span_start, case.span_len, case.total_len, kept[0, g], g, case.b_max,
                                          case.offsets[g]) for g in range(NUM_KV_HEADS)]
    for _, dst, columns in moves:
        written[cache.block_ids[0][dst // block_size], columns, dst % block_size] = True
    assert written.any()
    assert torch.equal(bits(cache.kv_cache)[~written], bits(before)[~written])
    assert torch.equal(bits(cache.layers[1 - LAYER]), bits(other_before))

    # poisoned as the engine tests poison (PagedKv): what the request gave back (every region cell is some head's)
    assert sum(case.counts) == NUM_KV_HEADS * case.b_max
    new_len = case.total_len - case.span_len + case.b_max
    vacated = cache.slots(0, torch.arange(new_len, case.total_len))
    for cache_half in (cache.key_cache, cache.value_cache):
        cache_half[vacated] = float("nan")
    # each head's live cells are its kept sequence: the prefix, its kept slots, the suffix, in order
    for g, (_, dst, columns) in enumerate(moves):
        prefix = torch.arange(case.span_start)
        live, live_columns = torch.cat([prefix, dst]), torch.cat([torch.full_like(prefix, g), columns])
        source = torch.cat([prefix, kept[0, g, :case.counts[g]].long(),
                            torch.arange(case.span_start + case.span_len, case.total_len)])
        for after, original in zip((cache.key_cache, cache.value_cache), split_kv_cache(before, HEAD_SIZE),
                                   strict=True):
            got = after[(*cache.slots(0, live), live_columns)]
            assert torch.isfinite(got).all()
            assert torch.equal(bits(got), bits(original[(*cache.slots(0, source), g)]))


@dataclasses.dataclass(frozen=True)
class ProbeCase:
    positions: tuple[tuple[int, ...], ...]  # probe row positions per sequence
    span_start: tuple[int, ...]
    span_len: tuple[int, ...]


# As PagedKv.probe batches a step: a request's rows after its audio, and a finishing request's last row alone
# (FastV's signal). Every slot past a sequence's last row is NaN.
PROBE = ProbeCase(((56, 60, 63, 70), (44,)), span_start=(5, 3), span_len=(50, 30))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_paged_probe_scores(layout: str, block_size: int, dtype: torch.dtype) -> None:
    case = PROBE
    cache = LayerCache(layout, [max(p) + 1 for p in case.positions], block_size, dtype, seed=2)
    int32 = {"dtype": torch.int32, "device": DEVICE}
    positions = torch.tensor([p for rows in case.positions for p in rows], **int32)
    cu_rows = torch.tensor([0, *torch.tensor([len(p) for p in case.positions]).cumsum(0).tolist()], **int32)
    block_table = torch.nn.utils.rnn.pad_sequence(cache.block_ids, batch_first=True).to(**int32)
    span_start, span_len = torch.tensor(case.span_start, **int32), torch.tensor(case.span_len, **int32)
    query = cache.random((positions.numel(), NUM_HEADS, HEAD_SIZE))
    scale = HEAD_SIZE ** -0.5
    key_cache, _ = split_kv_cache(cache.kv_cache, HEAD_SIZE)  # as PagedKv.probe reads the layer
    out = probe_triton.paged_probe_scores(query, cu_rows, positions, key_cache, block_table, span_start, span_len,
                                          scale, max_rows_per_seq=max(len(p) for p in case.positions))
    contiguous_key, _ = split_kv_cache(cache.kv_cache.clone(memory_format=torch.contiguous_format), HEAD_SIZE)
    expected = probe_reference.paged_probe_scores(query, cu_rows, positions, contiguous_key, block_table, span_start,
                                                  span_len, scale)
    assert out.shape == expected.shape == (len(case.positions), NUM_HEADS, max(case.span_len))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=PROBE_TOLERANCES[dtype], rtol=PROBE_TOLERANCES[dtype])
