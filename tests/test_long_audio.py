"""Long audio and several clips in one request, in the engine on CPU, against the HF reference.

* A 300 s clip on the tiny Qwen2.5-Omni thinker (7,500 audio tokens; Qwen2-Audio stops at 30 s): chunked prefill
  spans eight chunks, the probe sums its rows in the last one, every vacated and freed KV slot is poisoned, and the
  blocks given back are the plan's.
* Two clips in one request, for both model families: each clip is routed and pruned on its own (its own keep count
  and selection), the probe rows being the text after the last clip.
"""

from __future__ import annotations

import numpy as np
import pytest

from headrouter_vllm.demo import audio_prompt
from tests.conftest import TINY_MODELS
from tests.hf_reference import keep_count, reference
from tests.test_engine import BLOCK, cdiv

NEW_TOKENS = 8
LONG_SECONDS = 300
CHUNK = 1024  # tokens per prefill step: the 300 s prompt takes eight


def long_clip(speech, seconds: float) -> np.ndarray:
    """``seconds`` of speech: the test sentences over and over, each repeat a little quieter (not periodic)."""
    base = np.concatenate([speech["long"], np.zeros(1600, np.float32), speech["short"], np.zeros(3200, np.float32)])
    repeats = int(np.ceil(seconds * 16000 / base.size))
    wave = np.concatenate([base * (1.0 - 0.01 * i) for i in range(repeats)])
    return wave[:int(seconds * 16000)].astype(np.float32)


def generate(llm, prompt, waves, retention, **route):
    from vllm import SamplingParams

    from headrouter_vllm import inprocess
    from headrouter_vllm.options import route_args

    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True,
                            extra_args=route_args(retention=retention, **route))
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"audio": [(w, 16000) for w in waves]}}, params,
                       use_tqdm=False)[0]
    rid = out.request_id.split("-")[0]
    record = next((r for r in inprocess.scheduler(llm).hr_records if r.request_id.split("-")[0] == rid), None)
    logs = inprocess.model_runner(llm).hr_log
    log = next((g for g in logs if g.req_id.split("-")[0] == rid), None)
    return dict(tokens=list(out.outputs[0].token_ids), prompt_ids=list(out.prompt_token_ids), record=record, log=log)


def make_llm(model_dir, max_model_len, clips, poison=None, headrouter=None, **kwargs):
    import os

    from vllm import LLM

    if poison is not None:
        os.environ["HEADROUTER_POISON_FREED_KV"] = str(poison)
    try:
        return LLM(model=model_dir, dtype="float32", max_model_len=max_model_len, block_size=BLOCK,
                   enforce_eager=True, seed=0, enable_prefix_caching=False,
                   limit_mm_per_prompt={"audio": clips, "image": 0, "video": 0},
                   additional_config={"headrouter": {"retention": 1.0, **(headrouter or {})}}, **kwargs)
    finally:
        os.environ.pop("HEADROUTER_POISON_FREED_KV", None)


@pytest.fixture(scope="module")
def long_runs(tiny_models, speech):
    """The 300 s clip on the Omni thinker: unrouted and at 0.5, with 1024-token prefill chunks and poisoned KV."""
    import gc

    from headrouter_vllm import inprocess

    model = tiny_models("qwen2.5-omni")
    prompt = audio_prompt("Transcribe the audio. Please answer the question.", "qwen2.5-omni")
    wave = long_clip(speech, LONG_SECONDS)
    llm = make_llm(model, 8192, 1, poison=1e4, enable_chunked_prefill=True, max_num_batched_tokens=CHUNK)
    free = inprocess.num_free_blocks(llm)
    runs = {r: generate(llm, prompt, [wave], r) for r in (1.0, 0.5)}
    runs["free"], runs["free_after"] = free, inprocess.num_free_blocks(llm)
    del llm
    gc.collect()
    runs["hf"] = {r: reference(model, prompt, wave, r, NEW_TOKENS) for r in (1.0, 0.5)}
    return runs


def test_300_s_clip_is_7500_audio_tokens_over_eight_prefill_chunks(long_runs):
    ref = long_runs["hf"][1.0]
    assert ref["audio_tokens"] == 25 * LONG_SECONDS
    assert long_runs[1.0]["prompt_ids"] == ref["prompt_ids"]
    assert cdiv(ref["length"], CHUNK) == 8


def test_300_s_clip_unrouted_equals_hf(long_runs):
    got = long_runs[1.0]
    assert got["log"] is None and got["record"] is None
    assert got["tokens"] == long_runs["hf"][1.0]["tokens"]


def test_300_s_clip_pruned_equals_hf_and_frees_the_planned_blocks(long_runs):
    """The probe accumulated over the last chunk's rows selects what the HF reference selects from the whole
    prompt; the 1e4-poisoned vacated and freed slots are never read; half the audio's blocks go back."""
    got, ref = long_runs[0.5], long_runs["hf"][0.5]
    assert got["log"].kept == ref["kept"] and len(ref["kept"]) == keep_count(0.5, 7500)
    assert got["tokens"] == ref["tokens"]
    length, removed = ref["length"], 7500 - len(ref["kept"])
    assert got["record"].blocks_before == cdiv(length, BLOCK)
    assert got["record"].blocks_after == cdiv(length - removed, BLOCK)
    assert got["record"].blocks_freed >= removed // BLOCK
    assert long_runs["free_after"] == long_runs["free"]


@pytest.fixture(scope="module", params=list(TINY_MODELS))
def two_clip_runs(request, tiny_models, speech):
    """Two clips in one request (the short one first), each routed on its own; prompt and first-token probes."""
    import gc

    from headrouter_vllm import inprocess

    family = request.param
    model = tiny_models(family)
    prompt = audio_prompt("Transcribe both clips. Please answer the question.", family, clips=2)
    waves = [speech["short"], speech["long"]]
    runs = {"family": family, "model": model, "prompt": prompt, "waves": waves}
    for probe_point, kwargs in (("prompt", {}), ("first_token", dict(enable_chunked_prefill=True,
                                                                     max_num_batched_tokens=64))):
        llm = make_llm(model, 1024, 2, poison=1e4, **kwargs)
        free = inprocess.num_free_blocks(llm)
        for r in (1.0, 0.5, 0.3):
            runs[probe_point, r] = generate(llm, prompt, waves, r, probe_point=probe_point)
        runs[probe_point, "leak"] = free - inprocess.num_free_blocks(llm)
        del llm
        gc.collect()
    return runs


@pytest.mark.parametrize("probe_point", ["prompt", "first_token"])
@pytest.mark.parametrize("retention", [0.5, 0.3])
def test_each_clip_is_routed_on_its_own(two_clip_runs, probe_point, retention):
    runs = two_clip_runs
    got = runs[probe_point, retention]
    ref = reference(runs["model"], runs["prompt"], runs["waves"], retention, NEW_TOKENS, probe_point=probe_point)
    assert got["prompt_ids"] == ref["prompt_ids"] and len(ref["spans"]) == 2
    assert ref["keeps"] == [keep_count(retention, n) for _, n in ref["spans"]]  # a budget per clip
    for (start, n), keep in zip(ref["spans"], ref["keeps"], strict=True):  # each clip keeps its own share
        assert sum(start <= p < start + n for p in got["log"].kept) == keep
    assert got["log"].kept == ref["kept"]
    assert got["tokens"] == ref["tokens"]
    removed = sum(n for _, n in ref["spans"]) - sum(ref["keeps"])
    extra = 1 if probe_point == "first_token" else 0  # compaction follows the first decode step
    assert got["record"].blocks_after == cdiv(ref["length"] + extra - removed, BLOCK)
    assert runs[probe_point, "leak"] == 0


def test_two_clips_unrouted_equal_hf(two_clip_runs):
    runs = two_clip_runs
    ref = reference(runs["model"], runs["prompt"], runs["waves"], 1.0, NEW_TOKENS)
    for probe_point in ("prompt", "first_token"):
        assert runs[probe_point, 1.0]["tokens"] == ref["tokens"] and runs[probe_point, 1.0]["log"] is None


def test_two_clips_per_head_pack_each_clip_and_equal_hf(tiny_models, speech, tmp_path):
    """per_head with two clips: each KV head keeps its own tokens of each clip (budgets per clip from the skewed
    profile), the request holds the mean budget of both clips (the heads' kept audio and the text between the clips
    packed into one region), and greedy decoding with each head reading its own packed cells (freed slots NaN) gives
    the HF per-head reference's tokens."""
    import gc
    import math

    from tests.test_engine_triton import skewed_profiles

    model = tiny_models("qwen2-audio")
    profiles = skewed_profiles(model)
    path = tmp_path / "per-head.json"
    profiles.save(path)
    prompt = audio_prompt("Transcribe both clips. Please answer the question.", "qwen2-audio", clips=2)
    waves = [speech["short"], speech["long"]]
    llm = make_llm(model, 1024, 2, poison=math.nan,
                   headrouter={"mode": "per_head", "attention": "torch", "profiles": str(path)})
    try:
        got = generate(llm, prompt, waves, 0.3)
    finally:
        del llm
        gc.collect()
    ref = reference(model, prompt, waves, 0.3, NEW_TOKENS, mode="per_head", profiles=profiles)
    assert len(ref["spans"]) == 2 and got["log"].kept_per_head == ref["kept_per_head"]
    assert len({len(k) for k in ref["kept_per_head"]}) > 1  # unequal budgets, packed
    removed = sum(n for _, n in ref["spans"]) - sum(ref["keeps"])
    assert got["record"].blocks_after == cdiv(ref["length"] - removed, BLOCK)
    assert got["tokens"] == ref["tokens"]
