"""Decode micro-benchmark of the head-sparse paged attention kernel against dense baselines, on a GPU.

For each head layout x batch x context x kept fraction: time one decode step (one query token per sequence) whose
audio span covers most of the context and whose KV heads keep, on average, the given fraction of it (per-head budgets
spread from 0.5x to 1.5x of the mean, as per_head routing gives), in the skip layout (the whole span in the sequence,
each head skipping its pruned slots) and, as ``head_sparse_packed``, in the packed layout per_head serves (the
sequence compacted, the heads' kept keys packed into the mean budget's slots). Reported per row: time, bytes actually
read (K and V of the visible slots, queries, outputs), achieved bandwidth, and the ratio to dense baselines timed in
the same run: torch SDPA on K/V already gathered into contiguous tensors (gather not timed), and vLLM's own
``unified_attention`` on the same paged cache where it imports. Output: CSV with the device name in every row.

GPU:        python benchmarks/kernels/bench_head_sparse.py --out bench_head_sparse.csv
CPU smoke:  python benchmarks/kernels/bench_head_sparse.py --smoke --out smoke.csv   (tiny, Triton interpreter)
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from collections.abc import Callable

import torch

LAYOUTS = {  # name: (query heads, KV heads, head size)
    "qwen2-audio-7b": (32, 32, 128),
    "qwen2.5-omni-7b": (28, 4, 128),
    "tiny": (4, 2, 32),  # smoke mode
}
AUDIO_START = 16  # system prompt before the audio
TEXT_AFTER_AUDIO = 64  # question and generated tokens after it


def head_budgets(kept_fraction: float, span: int, num_kv_heads: int) -> torch.Tensor:
    """Kept audio slots per KV head, averaging ``kept_fraction * span``, spread up to 0.5x..1.5x across heads (less
    where the largest budget would exceed the span, so that the mean stays exact)."""
    half_spread = min(0.5, (1.0 - kept_fraction) / kept_fraction) if num_kv_heads > 1 else 0.0
    spread = torch.linspace(1.0 - half_spread, 1.0 + half_spread, num_kv_heads)
    return (kept_fraction * span * spread).round().clamp(0, span).long()


def load_kernels(smoke: bool, script: str, *modules: str) -> list:
    """The Triton kernel modules: compiled on a GPU; under the interpreter in smoke mode; else the script refuses."""
    if torch.cuda.is_available():
        import importlib

        return [importlib.import_module(module) for module in modules]
    if not smoke:
        raise SystemExit(f"{script} needs a CUDA GPU: the numbers are GPU timings. On a CPU-only machine run it with "
                         "--smoke (a tiny configuration under the Triton interpreter: checks the harness, measures "
                         "nothing meaningful).")
    from headrouter_vllm.kernels.interpreter import import_interpreted

    return import_interpreted(*modules)


def load_kernel(smoke: bool):
    return load_kernels(smoke, "bench_head_sparse.py", "headrouter_vllm.kernels.head_sparse_paged_attention.triton")[0]


def load_vllm_attention() -> Callable | None:
    """vLLM's Triton ``unified_attention`` (dense baseline) on a GPU build of vLLM, else None."""
    if not torch.cuda.is_available():
        return None
    try:
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    except Exception as error:  # vllm missing or a CPU build: the baseline is optional
        print(f"vLLM unified_attention unavailable ({type(error).__name__}: {error}); skipping that baseline")
        return None
    return unified_attention


def timer(fn: Callable[[], object], smoke: bool) -> float:
    """Median time of ``fn`` in microseconds."""
    if smoke:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def cuda_graph_replay(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph after a warm-up call on a side stream (which compiles it): its replay. A
    launcher that syncs with the host or reallocates per call fails to capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def paged_cache(layout: str, batch: int, context: int, dtype: torch.dtype, block_size: int, device: str):
    """A random KV cache in vLLM's paged layout for ``batch`` sequences of ``context`` tokens: the logical
    ``[blocks, Hkv, block_size, 2d]`` tensor, its K and V views ``[blocks, block_size, Hkv, d]`` and a shuffled block
    table."""
    _, num_kv_heads, head_size = LAYOUTS[layout]
    blocks_per_seq = math.ceil(context / block_size)
    num_blocks = batch * blocks_per_seq
    cache = torch.randn(num_blocks, num_kv_heads, block_size, 2 * head_size, dtype=dtype, device=device)
    key_cache, value_cache = cache.transpose(1, 2).split(head_size, dim=-1)  # vLLM's strided views
    block_table = torch.randperm(num_blocks, device=device).to(torch.int32).view(batch, blocks_per_seq)
    return cache, key_cache, value_cache, block_table


def gathered_kv(cache: torch.Tensor, block_table: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's K and V copied into contiguous ``[batch, Hkv, context, d]`` tensors (dense baselines)."""
    batch, (_, num_kv_heads, _, two_d) = block_table.shape[0], cache.shape
    gathered = cache[block_table.long()].permute(0, 2, 1, 3, 4).reshape(batch, num_kv_heads, -1, two_d)
    k_dense, v_dense = (t.contiguous() for t in gathered[:, :, :context].split(two_d // 2, dim=-1))
    return k_dense, v_dense


def row_base(device: str, layout: str, dtype: torch.dtype, block_size: int, batch: int, context: int) -> dict:
    """The columns every CSV row starts with."""
    num_heads, num_kv_heads, head_size = LAYOUTS[layout]
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter, smoke)",
            "layout": layout, "num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_size": head_size,
            "dtype": str(dtype).removeprefix("torch."), "block_size": block_size, "batch": batch, "context": context}


def time_sdpa_gathered(cache: torch.Tensor, block_table: torch.Tensor, query: torch.Tensor, context: int,
                       scale: float, smoke: bool) -> float:
    """Dense baseline: SDPA on K/V gathered into contiguous ``[batch, Hkv, context, d]`` (the gather not timed;
    no mask needed, the query is the last token). The copies are freed on return."""
    batch, num_heads, head_size = query.shape
    num_kv_heads = cache.shape[1]
    k_dense, v_dense = gathered_kv(cache, block_table, context)
    q_dense = query.view(batch, num_heads, 1, head_size)
    return timer(lambda: torch.nn.functional.scaled_dot_product_attention(
        q_dense, k_dense, v_dense, scale=scale, enable_gqa=num_heads != num_kv_heads), smoke)


def run_config(kernel, vllm_attention, layout: str, batch: int, context: int, fractions: list[float],
               dtype: torch.dtype, block_size: int, smoke: bool, device: str,
               variants: list[tuple[int | None, int | None]], cuda_graph: bool = False) -> list[dict]:
    num_heads, num_kv_heads, head_size = LAYOUTS[layout]
    element = torch.tensor([], dtype=dtype).element_size()
    cache, key_cache, value_cache, block_table = paged_cache(layout, batch, context, dtype, block_size, device)
    as_int = {"dtype": torch.int32, "device": device}
    seq_lens = torch.full((batch,), context, **as_int)
    cu_seqlens_q = torch.arange(batch + 1, **as_int)
    query = torch.randn(batch, num_heads, head_size, dtype=dtype, device=device)
    out = torch.empty_like(query)
    scale = head_size ** -0.5
    span = context - AUDIO_START - TEXT_AFTER_AUDIO
    span_start = torch.full((batch,), AUDIO_START, **as_int)
    span_slots = torch.full((batch,), span, **as_int)
    io_bytes = 2 * query.numel() * element  # query in, output out

    baselines = {"sdpa_gathered": time_sdpa_gathered(cache, block_table, query, context, scale, smoke)}
    if vllm_attention is not None:
        # as vLLM's Triton backend calls it: small batches take the 3D path with 16 softmax segments
        segments, padded = 16, 1 << (head_size - 1).bit_length()
        segment_out = torch.empty(batch, num_heads, segments, padded, dtype=torch.float32, device=device)
        segment_max = torch.empty(batch, num_heads, segments, dtype=torch.float32, device=device)
        segment_sum = torch.empty_like(segment_max)
        baselines["vllm_unified_attention"] = timer(lambda: vllm_attention(
            q=query, k=key_cache, v=value_cache, out=out, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=1,
            seqused_k=seq_lens, max_seqlen_k=context, softmax_scale=scale, causal=True, window_size=(-1, -1),
            block_table=block_table, softcap=0, q_descale=None, k_descale=None, v_descale=None,
            seq_threshold_3D=128 // num_kv_heads, num_par_softmax_segments=segments,
            softmax_segm_output=segment_out, softmax_segm_max=segment_max, softmax_segm_expsum=segment_sum), smoke)
    dense_bytes = 2 * batch * num_kv_heads * context * head_size * element + io_bytes

    rows = []
    base = {**row_base(device, layout, dtype, block_size, batch, context), "audio_slots": span}
    for name, micros in baselines.items():
        rows.append({**base, "impl": name, "kept_fraction": 1.0, "time_us": micros, "bytes_read": dense_bytes,
                     "bandwidth_gb_s": dense_bytes / micros / 1e3})
    for tile_slots, target_programs in variants:
        impl = "head_sparse" if (tile_slots, target_programs) == (None, None) else \
            f"head_sparse_tile{tile_slots or 'default'}_programs{target_programs or 'default'}"
        splits = None if target_programs is None else kernel.default_num_kv_splits(
            batch, num_kv_heads, context, block_size, target_programs)
        tile = None if tile_slots is None else max(tile_slots, block_size)
        for fraction in fractions:
            budgets = head_budgets(fraction, span, num_kv_heads)
            kept = budgets.to(torch.int32).to(device).expand(batch, num_kv_heads).contiguous()
            # the skip layout's offsets given explicitly: the kernel variant HeadRouter's backend runs
            own_column = (torch.arange(num_kv_heads, **as_int) * span).expand(batch, num_kv_heads).contiguous()

            def call(kept=kept, splits=splits, tile=tile, own_column=own_column):
                return kernel.head_sparse_paged_attention(
                    query, key_cache, value_cache, block_table, cu_seqlens_q, seq_lens, scale, span_start, span_slots,
                    kept, own_column, out=out, max_query_len=1, max_seq_len=context, num_kv_splits=splits,
                    tile_slots=tile)

            timed = {impl: timer(call, smoke)}
            if (tile_slots, target_programs) == (None, None):
                if cuda_graph:  # what a decode step would cost with attention inside vLLM's CUDA graph
                    timed["head_sparse_cuda_graph"] = timer(cuda_graph_replay(call), smoke)
                # what per_head serves (phase B): the compacted sequence, its region the mean budget's slots with
                # the heads' kept keys packed one after another; the same keys read as the skip layout above
                region = -(-int(budgets.sum()) // num_kv_heads)
                packed_lens = torch.full((batch,), context - span + region, **as_int)
                packed_slots = torch.full((batch,), region, **as_int)
                offsets = (budgets.cumsum(0) - budgets).to(torch.int32).to(device).expand(batch, num_kv_heads)
                offsets = offsets.contiguous()

                def packed(kept=kept, offsets=offsets, lens=packed_lens, slots=packed_slots, region=region):
                    return kernel.head_sparse_paged_attention(
                        query, key_cache, value_cache, block_table, cu_seqlens_q, lens, scale, span_start, slots,
                        kept, offsets, out=out, max_query_len=1, max_seq_len=context - span + region)

                timed["head_sparse_packed"] = timer(packed, smoke)
            visible = batch * int((context - span + budgets).sum())  # slots read, summed over KV heads
            read = 2 * visible * head_size * element + io_bytes
            for name, micros in timed.items():
                row = {**base, "impl": name, "kept_fraction": fraction, "time_us": micros, "bytes_read": read,
                       "bandwidth_gb_s": read / micros / 1e3}
                for baseline, dense_micros in baselines.items():
                    row[f"speedup_vs_{baseline}"] = dense_micros / micros
                rows.append(row)
    return rows


def run_prefill_config(kernel, layout: str, batch: int, length: int, dtype: torch.dtype, block_size: int,
                       smoke: bool, device: str, tiles: list[int | None]) -> list[dict]:
    """One whole-prompt prefill step (``batch`` prompts of ``length`` tokens, causal, nothing skipped: the prompt step
    is dense) per kernel tile size, against SDPA (causal) on the same K/V gathered into contiguous tensors."""
    num_heads, num_kv_heads, head_size = LAYOUTS[layout]
    cache, key_cache, value_cache, block_table = paged_cache(layout, batch, length, dtype, block_size, device)
    as_int = {"dtype": torch.int32, "device": device}
    seq_lens = torch.full((batch,), length, **as_int)
    cu_seqlens_q = torch.arange(batch + 1, **as_int) * length
    query = torch.randn(batch * length, num_heads, head_size, dtype=dtype, device=device)
    out = torch.empty_like(query)
    no_span = torch.zeros(batch, **as_int)
    kept = torch.zeros(batch, num_kv_heads, **as_int)  # also the offsets: HeadRouter's backend always passes them
    scale = head_size ** -0.5
    flops = 4 * batch * num_heads * head_size * length * (length + 1) / 2  # QK^T and PV over the causal half
    k_dense, v_dense = gathered_kv(cache, block_table, length)
    q_dense = query.view(batch, length, num_heads, head_size).transpose(1, 2)
    base = {**row_base(device, layout, dtype, block_size, batch, length), "query_len": length, "kept_fraction": 1.0}
    sdpa = timer(lambda: torch.nn.functional.scaled_dot_product_attention(
        q_dense, k_dense, v_dense, is_causal=True, scale=scale, enable_gqa=num_heads != num_kv_heads), smoke)
    rows = [{**base, "impl": "sdpa_causal", "time_us": sdpa, "tflop_s": flops / sdpa / 1e6}]
    for tile in tiles:
        tile_slots = None if tile is None else max(tile, block_size)
        micros = timer(lambda tile_slots=tile_slots: kernel.head_sparse_paged_attention(
            query, key_cache, value_cache, block_table, cu_seqlens_q, seq_lens, scale, no_span, no_span, kept,
            kept, out=out, max_query_len=length, max_seq_len=length, tile_slots=tile_slots), smoke)
        rows.append({**base, "impl": f"head_sparse_prefill_tile{tile_slots or 'default'}", "time_us": micros,
                     "tflop_s": flops / micros / 1e6, "speedup_vs_sdpa_causal": sdpa / micros})
    return rows


def write_csv(rows: list[dict], path: str) -> None:
    """Rows with differing keys (baselines, variants) in one CSV: the union of the keys, in first-seen order."""
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_head_sparse.csv", help="CSV file to write")
    parser.add_argument("--layouts", nargs="+", default=["qwen2-audio-7b", "qwen2.5-omni-7b"], choices=LAYOUTS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 128])
    parser.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096, 16384])
    parser.add_argument("--kept-fractions", nargs="+", type=float, default=[1.0, 0.7, 0.5, 0.3])
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    parser.add_argument("--block-size", type=int, default=16, choices=[16, 32])
    parser.add_argument("--max-memory-gib", type=float, default=60.0,
                        help="skip configurations whose KV cache plus SDPA's gathered copies (3x) exceed this")
    parser.add_argument("--tile-slots", nargs="+", type=int, default=[0],
                        help="kernel variants: key slots per loop iteration (0: the kernel's default)")
    parser.add_argument("--target-programs", nargs="+", type=int, default=[0],
                        help="kernel variants: programs the decode split aims at (0: the kernel's default)")
    parser.add_argument("--prefill-lengths", nargs="+", type=int, default=[],
                        help="time whole-prompt prefill steps of these lengths (per --batches) instead of decode")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also time the default kernel replayed from a CUDA graph (decode; GPU only)")
    parser.add_argument("--smoke", action="store_true", help="tiny run on CPU under the Triton interpreter")
    args = parser.parse_args(argv)
    if args.cuda_graph and not torch.cuda.is_available():
        parser.error("--cuda-graph needs a CUDA GPU")
    if args.smoke:
        args.layouts, args.batches, args.contexts, args.dtype = ["tiny"], [2], [160], "float16"
        args.prefill_lengths = [40] if args.prefill_lengths else []
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    kernel = load_kernel(args.smoke)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vllm_attention = load_vllm_attention()
    dtype = getattr(torch, args.dtype)
    variants = [(tile or None, target or None) for tile in args.tile_slots for target in args.target_programs]
    rows = []
    for layout in args.layouts if args.prefill_lengths else []:
        for batch in args.batches:
            for length in args.prefill_lengths:
                rows += run_prefill_config(kernel, layout, batch, length, dtype, args.block_size, args.smoke, device,
                                           [tile or None for tile in args.tile_slots])
    for layout in args.layouts if not args.prefill_lengths else []:
        _, num_kv_heads, head_size = LAYOUTS[layout]
        for batch in args.batches:
            for context in args.contexts:
                memory_gib = 3 * 2 * batch * context * num_kv_heads * head_size * dtype.itemsize / 2**30
                if memory_gib > args.max_memory_gib:
                    print(f"skip {layout} batch {batch} context {context}: {memory_gib:.1f} GiB > --max-memory-gib")
                    continue
                rows += run_config(kernel, vllm_attention, layout, batch, context, args.kept_fractions, dtype,
                                   args.block_size, args.smoke, device, variants, args.cuda_graph)
                if device == "cuda":
                    torch.cuda.empty_cache()
    write_csv(rows, args.out)
    for row in rows:
        ratios = " ".join(f"{k}={v:.2f}" for k, v in row.items() if k.startswith("speedup"))
        rate = f"{row['tflop_s']:8.1f} TFLOP/s" if "tflop_s" in row else f"{row['bandwidth_gb_s']:8.1f} GB/s"
        print(f"{row['layout']:16} b{row['batch']:<4} ctx{row['context']:<6} {row['impl']:36} "
              f"kept {row['kept_fraction']:.1f} {row['time_us']:10.1f} us {rate} {ratios}")
    print(f"wrote {len(rows)} rows to {args.out}")
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
