"""``headrouter-vllm demo``: one spoken-audio request through an in-process vLLM engine at several
retentions, on a model built locally (no download). Prints the answer, audio tokens kept and KV blocks
freed per retention. Retention 1.0 is the unpruned (vanilla) baseline."""

from __future__ import annotations

import os
import tempfile
import time

DEMO_TEXT = "the quick brown fox jumps over the lazy dog, and then it runs far away into the forest"
QUESTION = "What is said in this audio clip?"


def audio_prompt(question: str) -> str:
    return ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n{question}<|im_end|>\n<|im_start|>assistant\n")


def run_demo(model: str | None, retentions: list[float], max_tokens: int, semantics: str) -> list[dict]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: read the block pool
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # the demo prints its own table
    from headrouter_vllm.audio import speak

    with tempfile.TemporaryDirectory(prefix="headrouter-demo-") as tmp:
        if model is None:
            from headrouter_vllm.models.build import build_tiny_qwen2_audio

            print("building tiny-qwen2-audio (random weights, local tokenizer) ...", flush=True)
            model = str(build_tiny_qwen2_audio(os.path.join(tmp, "tiny-qwen2-audio")))
        from vllm import LLM, SamplingParams

        from headrouter_vllm import inprocess
        from headrouter_vllm.api.options import route_args

        wave = speak(DEMO_TEXT)
        llm = LLM(model=model, dtype="float32", max_model_len=2048, block_size=32, enforce_eager=True, seed=0,
                  limit_mm_per_prompt={"audio": 1},
                  additional_config={"headrouter": {"retention": 1.0, "semantics": semantics}})
        scheduler = inprocess.scheduler(llm)
        free_at_start = inprocess.num_free_blocks(llm)
        rows = []
        for r in retentions:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                                    extra_args=route_args(retention=r))
            t0 = time.perf_counter()
            out = llm.generate({"prompt": audio_prompt(QUESTION), "multi_modal_data": {"audio": (wave, 16000)}},
                               params, use_tqdm=False)[0]
            elapsed = time.perf_counter() - t0
            record = next((rec for rec in reversed(scheduler.hr_records)
                           if rec.request_id.split("-")[0] == out.request_id.split("-")[0]), None)
            rows.append(dict(retention=r, audio_tokens=record.audio_tokens if record else None,
                             kept=record.kept_tokens if record else None,
                             blocks_freed=record.blocks_freed if record else 0,
                             seconds=elapsed, text=out.outputs[0].text, tokens=list(out.outputs[0].token_ids)))
        assert inprocess.num_free_blocks(llm) == free_at_start, "KV blocks leaked"
        return rows


def print_rows(rows: list[dict]) -> None:
    print(f"\n{'retention':>9}  {'audio kept':>10}  {'blocks freed':>12}  {'time':>6}  answer (random weights: tokens, "
          "not words)")
    for row in rows:
        kept = "all" if row["kept"] is None else f"{row['kept']}/{row['audio_tokens']}"
        print(f"{row['retention']:>9.2f}  {kept:>10}  {row['blocks_freed']:>12}  {row['seconds']:>5.2f}s  "
              f"{row['text'][:60]!r}")
    print("\nKV blocks are 32 tokens; freed blocks went back to vLLM's pool right after the prompt step.")
