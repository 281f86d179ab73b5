"""What routing costs a request on a GPU: the probe and the KV compaction, against the prompt's own prefill attention.

HeadRouter adds two kernel calls per routed request, once, when its prompt step ends (``headrouter_vllm/runner.py``):

* **probe** (``paged_probe_scores``, at the probe layer only): the rows after the audio (the question) attend over the
  whole prompt; the softmax mass each query head puts on each audio key is the routing signal;
* **compaction** (``compact_kv``, in every layer): each KV head's kept audio slots move to the front of the span and
  the question behind them, in place; the runner calls it once per finishing request and layer.

For each head layout x clip length x kept fraction (x compaction tile, the slots moved per step), this times both for
one request (as the runner calls them) and, as the yardstick, causal SDPA (FlashAttention) over the same prompt: one
layer of the prefill attention the request has just paid. Per row: time, bytes moved (compaction: K and V of every
moved slot, read and written), bandwidth, and the per-request totals (compaction x the model's layers). Prompts are
``[16 system][audio: 25 tokens per second][64 question]``; KV heads keep 0.5x..1.5x of the mean budget, as per_head
routing gives (shared mode moves the same bytes at equal budgets). Output: CSV with the device name in every row.

GPU:        python benchmarks/kernels/bench_route_ops.py --out bench_route_ops.csv
CPU smoke:  python benchmarks/kernels/bench_route_ops.py --smoke --out smoke.csv   (tiny, Triton interpreter)
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location("bench_head_sparse", Path(__file__).with_name("bench_head_sparse.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

NUM_LAYERS = {"qwen2-audio-7b": 32, "qwen2.5-omni-7b": 28, "tiny": 4}
AUDIO_TOKENS_PER_SECOND = 25
MODULES = ("headrouter_vllm.kernels.compact_kv.triton", "headrouter_vllm.kernels.probe_scores.triton")


def load_kernels(smoke: bool):
    return bench.load_kernels(smoke, "bench_route_ops.py", *MODULES)


def kept_slot_lists(budgets: torch.Tensor, span_start: int, span: int, seed: int = 0) -> torch.Tensor:
    """int32 ``[1, Hkv, max budget]``: per KV head a random ascending subset of the span of its budget, -1 padded."""
    generator = torch.Generator().manual_seed(seed)
    width = int(budgets.max())
    kept = torch.full((1, budgets.numel(), width), -1, dtype=torch.int32)
    for head, count in enumerate(budgets.tolist()):
        chosen = torch.randperm(span, generator=generator)[:count].sort().values + span_start
        kept[0, head, :count] = chosen.to(torch.int32)
    return kept


def run_config(compact, probe, layout: str, clip_seconds: float, fractions: list[float], tiles: list[int | None],
               probe_variants: list[tuple[int | None, int | None]], dtype: torch.dtype, block_size: int,
               question: int, smoke: bool, device: str) -> list[dict]:
    num_heads, num_kv_heads, head_size = bench.LAYOUTS[layout]
    span = round(clip_seconds * AUDIO_TOKENS_PER_SECOND)
    prompt = bench.AUDIO_START + span + question
    element = torch.tensor([], dtype=dtype).element_size()
    cache, key_cache, value_cache, block_table = bench.paged_cache(layout, 1, prompt, dtype, block_size, device)
    as_int = {"dtype": torch.int32, "device": device}
    scale = head_size ** -0.5
    base = {**bench.row_base(device, layout, dtype, block_size, 1, prompt), "clip_seconds": clip_seconds,
            "audio_slots": span, "num_layers": NUM_LAYERS[layout]}

    # the yardstick: one layer's causal prefill attention over the prompt, on contiguous K/V
    k_dense, v_dense = bench.gathered_kv(cache, block_table, prompt)
    q_dense = torch.randn(1, num_heads, prompt, head_size, dtype=dtype, device=device)
    sdpa = bench.timer(lambda: torch.nn.functional.scaled_dot_product_attention(
        q_dense, k_dense, v_dense, is_causal=True, scale=scale, enable_gqa=num_heads != num_kv_heads), smoke)
    rows = [{**base, "op": "prefill_attention_sdpa", "kept_fraction": 1.0, "time_us": sdpa}]

    # the probe: the question's rows over the prompt, mass on the audio span (once per request, probe layer only)
    query = torch.randn(question, num_heads, head_size, dtype=dtype, device=device)
    cu_rows = torch.tensor([0, question], **as_int)
    positions = torch.arange(prompt - question, prompt, **as_int)
    span_start = torch.tensor([bench.AUDIO_START], **as_int)
    span_len = torch.tensor([span], **as_int)
    read = 2 * prompt * num_kv_heads * head_size * element  # keys read twice (softmax sums, then the span's mass)
    for block_m, tile_slots in probe_variants:
        micros = bench.timer(lambda block_m=block_m, tile_slots=tile_slots: probe.paged_probe_scores(
            query, cu_rows, positions, key_cache, block_table, span_start, span_len, scale, span,
            block_m=block_m, tile_slots=tile_slots, max_rows_per_seq=question), smoke)
        name = f"probe_rows{block_m or 'default'}_tile{tile_slots or 'default'}" if block_m or tile_slots else "probe"
        rows.append({**base, "op": name, "kept_fraction": 1.0, "time_us": micros, "bytes_moved": read,
                     "bandwidth_gb_s": read / micros / 1e3, "per_request_us": micros,
                     "vs_prefill_attention_per_layer": micros / sdpa})

    total_len = torch.tensor([prompt], **as_int)
    for fraction in fractions:
        budgets = bench.head_budgets(fraction, span, num_kv_heads)
        kept = kept_slot_lists(budgets, bench.AUDIO_START, span).to(device)
        moved = int(budgets.sum()) + question * num_kv_heads  # slots, summed over KV heads
        moved_bytes = 2 * 2 * moved * head_size * element  # K and V, read and written
        for tile in tiles:
            micros = bench.timer(lambda kept=kept, tile=tile: compact.compact_kv(
                key_cache, value_cache, block_table, span_start, span_len, total_len, kept, tile=tile,
                max_suffix_len=question), smoke)
            rows.append({**base, "op": f"compact_tile{tile or 'default'}", "kept_fraction": fraction, "time_us": micros,
                         "bytes_moved": moved_bytes, "bandwidth_gb_s": moved_bytes / micros / 1e3,
                         "per_request_us": micros * NUM_LAYERS[layout],
                         "vs_prefill_attention_per_layer": micros / sdpa})
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_route_ops.csv", help="CSV file to write")
    parser.add_argument("--layouts", nargs="+", default=["qwen2-audio-7b", "qwen2.5-omni-7b"], choices=NUM_LAYERS)
    parser.add_argument("--clip-seconds", nargs="+", type=float, default=[10, 30, 300])
    parser.add_argument("--kept-fractions", nargs="+", type=float, default=[0.7, 0.5, 0.3])
    parser.add_argument("--tiles", nargs="+", type=int, default=[0, 16, 32, 128],
                        help="compaction variants: moves per program (0: the kernel's default, as the runner calls it)")
    parser.add_argument("--probe-block-m", nargs="+", type=int, default=[0],
                        help="probe variants: rows per chunk (0: the kernel's default)")
    parser.add_argument("--probe-tile-slots", nargs="+", type=int, default=[0],
                        help="probe variants: keys per iteration (0: the kernel's default)")
    parser.add_argument("--question-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    parser.add_argument("--block-size", type=int, default=16, choices=[16, 32])
    parser.add_argument("--smoke", action="store_true", help="tiny run on CPU under the Triton interpreter")
    args = parser.parse_args(argv)
    if args.smoke:
        args.layouts, args.clip_seconds, args.tiles, args.dtype = ["tiny"], [2.0], [0], "float16"
        args.question_tokens = 16
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    compact, probe = load_kernels(args.smoke)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    tiles = [tile or None for tile in args.tiles]
    probe_variants = [(m or None, t or None) for m in args.probe_block_m for t in args.probe_tile_slots]
    rows = []
    for layout in args.layouts:
        for seconds in args.clip_seconds:
            rows += run_config(compact, probe, layout, seconds, args.kept_fractions, tiles, probe_variants, dtype,
                               args.block_size, args.question_tokens, args.smoke, device)
    bench.write_csv(rows, args.out)
    for row in rows:
        rate = f"{row['bandwidth_gb_s']:8.1f} GB/s" if "bandwidth_gb_s" in row else " " * 13
        total = f"per request {row['per_request_us']:9.1f} us" if "per_request_us" in row else ""
        print(f"{row['layout']:16} {row['clip_seconds']:5.0f} s {row['op']:24} kept {row['kept_fraction']:.1f} "
              f"{row['time_us']:9.1f} us {rate} {total}")
    print(f"wrote {len(rows)} rows to {args.out}")
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
