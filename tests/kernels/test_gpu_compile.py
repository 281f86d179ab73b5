"""Compile every kernel for NVIDIA GPUs (sm_90, sm_80) down to a cubin, without a GPU: Triton's own compiler and the
ptxas shipped in its wheel. The interpreter accepts code the compiler rejects (non-constexpr globals, some shapes
and dtype mixes), so this is what shows here that the kernels build for a GPU. It cannot show that they run right
there: that is what the same tests do natively on a CUDA machine.

The kernel modules are loaded a second time under other names, without ``TRITON_INTERPRET``, so that their
kernels are compilable ``JITFunction`` objects rather than the interpreted ones the other tests use.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
TYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")


@pytest.fixture(autouse=True, scope="module")
def private_triton_cache(tmp_path_factory):
    """Compiled kernels go to a temporary folder, not ~/.triton."""
    previous = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    yield
    if previous is None:
        del os.environ["TRITON_CACHE_DIR"]
    else:
        os.environ["TRITON_CACHE_DIR"] = previous


def load_compilable(op: str):
    """``kernels/<op>/triton.py`` as a fresh module whose kernels are decorated for compilation."""
    previous = os.environ.pop("TRITON_INTERPRET", None)
    try:
        spec = importlib.util.spec_from_file_location(f"_compile_check_{op}", KERNELS / op / "triton.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if previous is not None:
            os.environ["TRITON_INTERPRET"] = previous
    return module


def compile_for_gpu(kernel, pointer_types: dict[str, str], constexprs: dict, arch: int = 90) -> None:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: "constexpr" if name in constexprs else pointer_types.get(name, "i32")
                 for name in kernel.arg_names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # triton 3.9's FP-fusion default notice
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
    assert compiled.asm["cubin"]


ATTENTION_VARIANTS = {  # (head size, block size, GQA group, padded group, rows per program, KV splits, tile blocks)
    "omni_d128_bs16_group7_split4_tile4": (128, 16, 7, 8, 16, 4, 4),
    "audio7b_d128_bs32_mha_prefill64_tile2": (128, 32, 1, 1, 64, 1, 2),
    "tiny_d32_bs16_group2_split16_tile1": (32, 16, 2, 2, 16, 16, 1),
    "d64_bs16_group16_tile8": (64, 16, 16, 16, 16, 1, 8),
}


@pytest.mark.parametrize(("variant", "dtype"), [(v, d) for v in ATTENTION_VARIANTS for d in ("fp16", "bf16")]
                         + [("tiny_d32_bs16_group2_split16_tile1", "fp32")])  # fp32 is for tests only
def test_head_sparse_attention_compiles(variant: str, dtype: str) -> None:
    module = load_compilable("head_sparse_paged_attention")
    head_size, block_size, group, group_padded, block_m, splits, tile_blocks = ATTENTION_VARIANTS[variant]
    types = {name: TYPES[dtype] for name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr")}
    types.update({name: "*fp32" for name in ("part_max_ptr", "part_sum_ptr", "part_acc_ptr")})
    types.update({name: "*i32" for name in ("block_table_ptr", "cu_seqlens_q_ptr", "seq_lens_ptr", "span_start_ptr",
                                             "span_slots_ptr", "kept_ptr", "offsets_ptr")})
    types["scale"] = "fp32"
    compile_for_gpu(module._head_sparse_attention_kernel, types, dict(
        NUM_KV_HEADS=4, QUERIES_PER_KV=group, QUERIES_PER_KV_PADDED=group_padded, BLOCK_M=block_m,
        BLOCK_SIZE=block_size, HEAD_SIZE=head_size, NUM_SPLITS=splits, TILE_BLOCKS=tile_blocks,
        HAS_OFFSETS=dtype == "bf16",  # both layouts without doubling the compiles: bf16 with offsets (packed)
        DOT_PRECISION="ieee" if dtype == "fp32" else "tf32"))
    if splits > 1:
        compile_for_gpu(module._combine_splits_kernel,
                        {"out_ptr": TYPES[dtype], "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32",
                         "part_acc_ptr": "*fp32"},
                        dict(NUM_HEADS=4 * group, HEAD_SIZE=head_size, NUM_SPLITS=splits))


@pytest.mark.parametrize("arch", [90, 80], ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_compact_kv_compiles(dtype: str, arch: int) -> None:
    module = load_compilable("compact_kv")
    types = {"k_ptr": TYPES[dtype], "v_ptr": TYPES[dtype], "scratch_ptr": TYPES[dtype], "block_table_ptr": "*i32",
             "span_start_ptr": "*i32", "span_len_ptr": "*i32", "total_len_ptr": "*i32", "kept_slots_ptr": "*i32",
             "region_slots_ptr": "*i32", "offsets_ptr": "*i32"}
    packed = dtype == "bf16"  # both layouts without doubling the compiles: bf16 with region_slots and offsets
    for gather in (True, False):
        compile_for_gpu(module._compact_kv_kernel, types, dict(
            NUM_KV_HEADS=4, BLOCK_SIZE=16, HEAD_SIZE=128, TILE=module.GPU_TILE, HAS_REGION_SLOTS=packed,
            HAS_OFFSETS=packed, GATHER=gather), arch)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("group", [1, 7], ids=lambda g: f"group{g}")
@pytest.mark.parametrize(("block_m", "tile_blocks"), [(16, 1), (64, 4)], ids=["rows16_tile1", "rows64_tile4"])
def test_probe_scores_compiles(dtype: str, group: int, block_m: int, tile_blocks: int) -> None:
    module = load_compilable("probe_scores")
    types = {"q_ptr": TYPES[dtype], "k_ptr": TYPES[dtype], "out_ptr": "*fp32", "cu_rows_ptr": "*i32",
             "row_positions_ptr": "*i32", "block_table_ptr": "*i32", "span_start_ptr": "*i32",
             "span_len_ptr": "*i32", "scale": "fp32"}
    compile_for_gpu(module._probe_scores_kernel, types, dict(
        QUERIES_PER_KV=group, QUERIES_PER_KV_PADDED=triton.next_power_of_2(group), BLOCK_M=block_m, BLOCK_SIZE=16,
        TILE_BLOCKS=tile_blocks, HEAD_SIZE=128, DOT_PRECISION="tf32"))


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("slot_type", ["*i64", "*i32"])
def test_write_kv_cache_compiles(dtype: str, slot_type: str) -> None:
    module = load_compilable("write_kv_cache")
    types = {name: TYPES[dtype] for name in ("key_ptr", "value_ptr", "k_cache_ptr", "v_cache_ptr")}
    types["slot_mapping_ptr"] = slot_type
    compile_for_gpu(module._write_kv_cache_kernel, types,
                    dict(NUM_KV_HEADS=7, NUM_KV_HEADS_PADDED=8, HEAD_SIZE=128, BLOCK_SIZE=16, TOKENS=16))
