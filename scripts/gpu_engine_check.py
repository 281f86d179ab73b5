"""The GPU serving checks a CPU cannot run: vanilla vLLM and HeadRouter on the same CUDA device, same requests.

On a GPU, for the tiny Qwen2-Audio model (built locally, random weights) in bf16, one engine after another:

* ``vanilla``: vLLM as deployed (its default backend and CUDA graph mode, FULL_AND_PIECEWISE);
* ``headrouter``: shared mode on vLLM's own backend, the same graph mode;
* ``headrouter_no_graphs``: the same with ``cudagraph_mode NONE`` (the same compiled model, no graph replay);
* ``per_head``: HeadRouter's backend, PIECEWISE graphs.

Checks (exit 1 if any fails): unrouted requests (retention 1.0) give vanilla's greedy tokens; routed requests give
the same kept counts, freed blocks and greedy tokens with and without graph replay (a compacted request replayed in
a captured FULL graph = the same request run without graphs); every engine's KV pool returns to its start. Writes
``engine-check.json`` (per engine: graph mode, attention impls, per request tokens and report) to ``--out``.

On CPU (``--cpu-rehearsal``; the CI runs it) the same script runs on CPU_ATTN with graphs off, so it cannot rot.
Usage: python scripts/gpu_engine_check.py --out RESULTS [--model DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in process: read the block pool and the runner
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")

RETENTIONS = (1.0, 0.5, 0.3)
SENTENCES = {"short": "hello world, this is a test of the tiny audio model",
             "long": "the quick brown fox jumps over the lazy dog, and then it runs far away into the forest"}
ENGINES = {
    "vanilla": dict(headrouter=None),
    "headrouter": dict(headrouter={}),
    "headrouter_no_graphs": dict(headrouter={}, compilation_config={"cudagraph_mode": "NONE"}),
    "per_head": dict(headrouter={"mode": "per_head"}),
}


def run(model: str, name: str, dtype: str, new_tokens: int, cpu: bool) -> dict:
    from vllm import LLM, SamplingParams

    from headrouter_vllm import inprocess
    from headrouter_vllm.audio import speak
    from headrouter_vllm.demo import audio_prompt
    from headrouter_vllm.names import REPORT_KEY
    from headrouter_vllm.options import route_args

    settings = dict(ENGINES[name])
    section = settings.pop("headrouter")
    extra = {} if section is None else {"additional_config": {"headrouter": {"retention": 1.0, **section}}}
    if cpu:
        settings.pop("compilation_config", None)  # no graphs on CPU
    llm = LLM(model=model, dtype=dtype, max_model_len=1024, block_size=16 if not cpu else 32, seed=0,
              enable_prefix_caching=False, limit_mm_per_prompt={"audio": 1}, enforce_eager=cpu, **extra, **settings)
    free_at_start = inprocess.num_free_blocks(llm)
    cases = [(clip, r) for clip in SENTENCES for r in RETENTIONS]
    waves = {clip: speak(text) for clip, text in SENTENCES.items()}
    prompt = audio_prompt("What is said in this audio clip?")
    outputs = llm.generate(
        [{"prompt": prompt, "multi_modal_data": {"audio": (waves[clip], 16000)}} for clip, _ in cases],
        [SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True,
                        extra_args=None if section is None else route_args(retention=r)) for _, r in cases],
        use_tqdm=False)
    runner = inprocess.model_runner(llm)
    context = runner.compilation_config.static_forward_context
    result = {
        "cudagraph_mode": llm.llm_engine.vllm_config.compilation_config.cudagraph_mode.name,
        "attention_impls": sorted({type(layer.impl).__name__ for layer in context.values() if hasattr(layer, "impl")}),
        "requests": {f"{clip}_r{r}": {"tokens": list(out.outputs[0].token_ids),
                                      "report": (out.kv_transfer_params or {}).get(REPORT_KEY)}
                     for (clip, r), out in zip(cases, outputs, strict=True)},
        "pool_returned": inprocess.num_free_blocks(llm) == free_at_start,
    }
    del runner, context, llm
    gc.collect()
    return result


def check(results: dict) -> list[str]:
    failures = []
    vanilla, ours, no_graphs = results["vanilla"], results["headrouter"], results["headrouter_no_graphs"]
    for name, request in ours["requests"].items():
        if name.endswith("_r1.0") and request["tokens"] != vanilla["requests"][name]["tokens"]:
            failures.append(f"{name}: HeadRouter at retention 1.0 differs from vanilla")
        if not name.endswith("_r1.0"):
            other = no_graphs["requests"][name]
            if request["tokens"] != other["tokens"]:
                failures.append(f"{name}: tokens differ with and without CUDA graph replay")
            for key in ("kept_audio_tokens", "kv_blocks_freed"):
                if request["report"][key] != other["report"][key]:
                    failures.append(f"{name}: {key} differs with and without CUDA graph replay")
            if request["report"]["kv_blocks_freed"] <= 0:
                failures.append(f"{name}: no KV block was freed")
    failures += [f"{engine}: the KV pool did not return to its start" for engine, r in results.items()
                 if not r["pool_returned"]]
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", help="a Qwen2-Audio checkpoint (default: tiny-qwen2-audio, built here)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--cpu-rehearsal", action="store_true", help="run on CPU (CPU_ATTN, fp32, no graphs)")
    args = parser.parse_args(argv)
    import torch

    if not args.cpu_rehearsal and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --cpu-rehearsal)")
    model = args.model
    if model is None:
        from headrouter_vllm.models.build import make_model

        model = str(make_model("tiny-qwen2-audio", Path(tempfile.mkdtemp(prefix="gpu-engine-check-")) / "model"))
    dtype = "float32" if args.cpu_rehearsal else "bfloat16"
    results = {name: run(model, name, dtype, args.new_tokens, args.cpu_rehearsal) for name in args.engines}
    failures = check(results) if {"vanilla", "headrouter", "headrouter_no_graphs"} <= set(results) else []
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engine-check.json").write_text(json.dumps({"failures": failures, "engines": results}, indent=1))
    for name, result in results.items():
        print(f"{name}: graphs {result['cudagraph_mode']}, attention {result['attention_impls']}")
    print("\n".join(failures) if failures else "engine check: all passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
