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
