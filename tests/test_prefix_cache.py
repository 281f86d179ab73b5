"""Prefix caching with HeadRouter on (#30): requests that are not routed cache and hit exactly as in vanilla vLLM
with prefix caching; a routed request reuses only the whole blocks before its first audio token, and the blocks it
rewrites never serve another request.

Three in-process engines on the tiny Qwen2-Audio run the same requests one after another (so the cache fills as a
server's would): vanilla with prefix caching, HeadRouter with prefix caching (vacated and freed slots poisoned with
1e4), and HeadRouter without it (the routed reference). The requests share a long system prompt, ask two questions
about the same clip, and include a second turn that resends the first (the conversation as chat clients send it).
"""

from __future__ import annotations

import gc
import os

import pytest

BLOCK = 32
NEW_TOKENS = 12
SYSTEM = ("You are a helpful assistant that listens carefully to audio clips. Answer briefly and precisely, say what "
          "you heard, and never invent words that were not spoken. If the audio is unclear, say so.")


def prompt(turns: list[tuple[str, str | None]], audio_first: bool = True) -> str:
    """A chat prompt: the shared system message, the clip in the first user turn, then each (question, answer)."""
    from headrouter_vllm.models import adapter_by_family

    audio = adapter_by_family("qwen2-audio").audio_placeholder.format(n=1)
    text = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
    for i, (question, answer) in enumerate(turns):
        text += f"<|im_start|>user\n{audio if i == 0 else ''}{question}<|im_end|>\n<|im_start|>assistant\n"
        if answer is not None:
            text += f"{answer}<|im_end|>\n"
    return text


# (name, clip, turns, retention or None for unrouted), run in this order
REQUESTS = [
    ("unrouted_q1", "long", [("What is said in this audio clip?", None)], None),
    ("unrouted_q2", "long", [("Transcribe the audio.", None)], None),  # vanilla hits the system prompt and the clip
    ("routed_q1", "long", [("What is said in this audio clip?", None)], 0.5),  # the clip is cached: must not hit it
    ("routed_other_clip", "short", [("Transcribe the audio.", None)], 0.5),
    ("routed_second_turn", "long", [("What is said in this audio clip?", "It is about a fox."),
                                    ("And then what happens?", None)], 0.3),
    ("unrouted_second_turn", "long", [("What is said in this audio clip?", "It is about a fox."),
                                      ("And then what happens?", None)], None),
    ("unrouted_q1_again", "long", [("What is said in this audio clip?", None)], None),  # after the routed ones
]
UNROUTED = [name for name, *_, r in REQUESTS if r is None]
ROUTED = [name for name, *_, r in REQUESTS if r is not None]


def run(model: str, speech, headrouter: bool, prefix_caching: bool, poison: float | None = None,
        names: list[str] | None = None) -> dict:
    from vllm import LLM, SamplingParams

    from headrouter_vllm import inprocess
    from headrouter_vllm.options import route_args

    if poison is not None:
        os.environ["HEADROUTER_POISON_FREED_KV"] = str(poison)
    try:
        extra = {"additional_config": {"headrouter": {"retention": 1.0}}} if headrouter else {}
        llm = LLM(model=model, dtype="float32", max_model_len=1024, block_size=BLOCK, enforce_eager=True, seed=0,
                  max_num_seqs=8, enable_prefix_caching=prefix_caching, limit_mm_per_prompt={"audio": 1}, **extra)
    finally:
        os.environ.pop("HEADROUTER_POISON_FREED_KV", None)
    free_at_start = inprocess.num_free_blocks(llm)
    result = {}
    for name, clip, turns, retention in REQUESTS:
        if names is not None and name not in names:
            continue
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0,
                                extra_args=None if retention is None else route_args(retention=retention))
        out = llm.generate({"prompt": prompt(turns), "multi_modal_data": {"audio": (speech[clip], 16000)}}, params,
                           use_tqdm=False)[0]
        tokens = list(out.outputs[0].token_ids)
        logprobs = [step[t].logprob for step, t in zip(out.outputs[0].logprobs, tokens, strict=True)]
        result[name] = dict(tokens=tokens, logprobs=logprobs, cached=out.num_cached_tokens or 0,
                            prompt_ids=list(out.prompt_token_ids))
    result["blocks_back"] = inprocess.num_free_blocks(llm) == free_at_start
    del llm
    gc.collect()
    return result


@pytest.fixture(scope="module")
def runs(tiny_model, speech) -> dict:
    # vanilla runs the unrouted requests only: its cache then holds exactly what they computed, which is all
    # HeadRouter's cache may hold beyond the routed requests' system-prompt blocks
    return {"vanilla": run(tiny_model, speech, headrouter=False, prefix_caching=True, names=UNROUTED),
            "headrouter": run(tiny_model, speech, headrouter=True, prefix_caching=True, poison=1e4),
            "uncached": run(tiny_model, speech, headrouter=True, prefix_caching=False)}


def first_audio_token(prompt_ids: list[int], tiny_model) -> int:
    from transformers import AutoConfig

    return prompt_ids.index(AutoConfig.from_pretrained(tiny_model).audio_token_id)


@pytest.mark.parametrize("name", UNROUTED)
def test_unrouted_requests_cache_and_hit_as_in_vanilla(runs, name):
    vanilla, ours = runs["vanilla"][name], runs["headrouter"][name]
    assert ours["tokens"] == vanilla["tokens"]
    assert ours["cached"] == vanilla["cached"]
    assert ours["logprobs"] == pytest.approx(vanilla["logprobs"], abs=1e-4)


def test_vanilla_reuses_the_clip_and_the_earlier_turn(runs, tiny_model):
    """The workload exercises the cache: vanilla's second question about the clip hits past the audio, and the
    second turn hits its first turn (so the routed requests' lower hits below are a real difference)."""
    vanilla = runs["vanilla"]
    start = first_audio_token(vanilla["unrouted_q2"]["prompt_ids"], tiny_model)
    assert vanilla["unrouted_q2"]["cached"] > start + BLOCK
    assert vanilla["unrouted_second_turn"]["cached"] > start + BLOCK


@pytest.mark.parametrize("name", ROUTED)
def test_routed_requests_hit_only_before_their_audio_and_equal_uncached(runs, name, tiny_model):
    ours, uncached = runs["headrouter"][name], runs["uncached"][name]
    start = first_audio_token(ours["prompt_ids"], tiny_model)
    assert 0 < ours["cached"] <= start // BLOCK * BLOCK  # the system prompt's whole blocks, nothing of the audio
    assert ours["tokens"] == uncached["tokens"]
    assert ours["logprobs"] == pytest.approx(uncached["logprobs"], abs=1e-4)


def test_unrouted_request_after_routed_ones_reads_no_rewritten_block(runs):
    """The same request before and after routed requests over the same clip (whose compaction poisoned every slot
    it vacated with 1e4): the same tokens as vanilla, from the same cache hits (the routed requests added none)."""
    ours = runs["headrouter"]
    assert ours["unrouted_q1_again"]["tokens"] == ours["unrouted_q1"]["tokens"] == runs["vanilla"]["unrouted_q1"][
        "tokens"]
    assert ours["unrouted_q1_again"]["cached"] == runs["vanilla"]["unrouted_q1_again"]["cached"] > 0


def test_every_block_comes_back(runs):
    assert runs["headrouter"]["blocks_back"] and runs["vanilla"]["blocks_back"]
