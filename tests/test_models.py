"""Local model builders: deterministic, loadable by transformers, checkpoint keys vLLM loads."""

from __future__ import annotations

import hashlib
import json

import torch


def digest(path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_tiny_model_is_deterministic_peaky_and_tied(tiny_model, tmp_path):
    from pathlib import Path

    from safetensors.torch import load_file

    from headrouter_vllm.models.build import build_tiny_qwen2_audio

    again = build_tiny_qwen2_audio(tmp_path / "again")
    assert digest(Path(tiny_model)) == digest(again)
    state = load_file(str(again / "model.safetensors"))
    assert torch.equal(state["language_model.lm_head.weight"], state["language_model.model.embed_tokens.weight"])
    assert not any(k.startswith("language_model.model.model.") for k in state)
    assert 0.18 < float(state["language_model.model.layers.0.self_attn.q_proj.weight"].std()) < 0.22
    config = json.loads((again / "config.json").read_text())
    assert config["architectures"] == ["Qwen2AudioForConditionalGeneration"]


def test_7b_shape_config(tmp_path):
    from transformers import AutoConfig, AutoProcessor

    from headrouter_vllm.models.build import make_model

    out = make_model("qwen2-audio-7b-shape", tmp_path / "m")
    config = AutoConfig.from_pretrained(out)
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        4096, 32, 32, 32)
    assert config.audio_config.d_model == 1280 and not (out / "model.safetensors").exists()
    processor = AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>") == config.audio_token_index


def test_tiny_omni_is_deterministic_peaky_tied_and_in_vllm_layout(tiny_models, tmp_path):
    from pathlib import Path

    from safetensors.torch import load_file

    from headrouter_vllm.models.omni import build_tiny_qwen2_5_omni

    again = build_tiny_qwen2_5_omni(tmp_path / "again")
    assert digest(Path(tiny_models("qwen2.5-omni"))) == digest(again)
    state = load_file(str(again / "model.safetensors"))
    assert all(k.startswith("thinker.") for k in state)  # vLLM maps thinker.model. -> language_model.model.
    assert torch.equal(state["thinker.lm_head.weight"], state["thinker.model.embed_tokens.weight"])
    assert 0.18 < float(state["thinker.model.layers.0.self_attn.q_proj.weight"].std()) < 0.22
    config = json.loads((again / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5OmniModel"] and config["enable_audio_output"] is False
    text = config["thinker_config"]["text_config"]
    assert (text["num_attention_heads"], text["num_key_value_heads"]) == (8, 2)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2


def test_omni_processor_takes_audio_up_to_300_s_and_cuts_longer(tiny_models):
    """25 audio tokens per second up to 300 s, where the processor cuts: the adapter refuses longer audio (400)."""
    import numpy as np
    from transformers import AutoProcessor

    from headrouter_vllm.demo import audio_prompt
    from headrouter_vllm.models import QWEN2_5_OMNI

    processor = AutoProcessor.from_pretrained(tiny_models("qwen2.5-omni"))
    audio_id = processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    prompt = audio_prompt("What is said?", "qwen2.5-omni")
    counts = {}
    for seconds in (45, 300, 320):
        wave = np.zeros(16000 * seconds, dtype=np.float32)
        ids = processor(text=prompt, audio=[wave], sampling_rate=16000, return_tensors="pt")["input_ids"]
        counts[seconds] = int((ids == audio_id).sum())
    assert counts == {45: 1125, 300: 7500, 320: 7500}
    assert QWEN2_5_OMNI.max_audio_seconds == 300


def test_omni_real_shape_configs(tmp_path):
    from transformers import AutoConfig, AutoProcessor

    from headrouter_vllm.models.build import make_model

    for name, heads in (("qwen2.5-omni-7b-shape", (3584, 28, 28, 4)), ("qwen2.5-omni-3b-shape", (2048, 36, 16, 2))):
        out = make_model(name, tmp_path / name)
        thinker = AutoConfig.from_pretrained(out).thinker_config
        text = thinker.text_config
        assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == heads
        assert (out / "HEADROUTER_DUMMY_WEIGHTS").exists() and not (out / "model.safetensors").exists()
        processor = AutoProcessor.from_pretrained(out)
        assert processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>") == thinker.audio_token_index


def test_audio_spans_from_vllm_placeholders():
    """One span per audio item, or per run of audio embeddings where an item interleaves them with other tokens
    (Omni's audio inside a video); other modalities are not audio."""
    from types import SimpleNamespace

    from vllm.multimodal.inputs import PlaceholderRange

    from headrouter_vllm.models import audio_spans

    def feature(modality, offset, length, is_embed=None):
        mask = None if is_embed is None else torch.tensor(is_embed, dtype=torch.bool)
        return SimpleNamespace(modality=modality, mm_position=PlaceholderRange(offset, length, is_embed=mask))

    interleaved = [0, 1, 1, 1, 0, 0, 1, 1, 0]  # video, 3 audio, 2 video, 2 audio, video
    features = [feature("audio", 40, 5), feature("image", 10, 8), feature("audio", 60, 9, interleaved),
                feature("audio", 3, 4, [0, 1, 1, 0])]
    assert audio_spans(features) == [(4, 2), (40, 5), (61, 3), (66, 2)]
    assert audio_spans(None) == [] and audio_spans([feature("audio", 0, 3, [0, 0, 0])]) == []
