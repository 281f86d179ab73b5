"""Checkpoint helpers shared by the local model builders (:mod:`.build`, :mod:`.omni`,
:mod:`headrouter_vllm.listening.model`): the Qwen2-Audio config, the Whisper feature extractor, the saved processor
and the safetensors layout vLLM loads.

A leaf module: it imports no builder, so the builders import it and :mod:`.build` imports the builders, with no cycle.
"""

from __future__ import annotations

from pathlib import Path

AUDIO_SPECIALS = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")


def save_processor(out: Path, tok, mel_bins: int = 128) -> None:
    """The Qwen2-Audio processor (Whisper features, ``tok``, its chat template) and the generation config."""
    from transformers import GenerationConfig, Qwen2AudioProcessor

    fe = feature_extractor(mel_bins)
    Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tok, chat_template=tok.chat_template).save_pretrained(out)
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(out)


def feature_extractor(mel_bins: int = 128, chunk_length: int = 30):
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=mel_bins, sampling_rate=16000, hop_length=160,
                                   chunk_length=chunk_length, n_fft=400)


def qwen2_audio_config(tok, audio: dict, text: dict, dtype: str):
    from transformers import Qwen2AudioConfig, Qwen2AudioEncoderConfig, Qwen2Config

    text_cfg = Qwen2Config(tie_word_embeddings=True, bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, **text)
    audio = {"num_mel_bins": 128, "max_source_positions": 1500, **audio}
    cfg = Qwen2AudioConfig(audio_config=Qwen2AudioEncoderConfig(**audio),
                           text_config=text_cfg, audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"))
    cfg.dtype = dtype
    cfg.architectures = ["Qwen2AudioForConditionalGeneration"]
    return cfg


def save_checkpoint(model, cfg, tok, out: Path) -> None:
    """Write the checkpoint in the original Qwen2-Audio key layout that vLLM loads (transformers 5.x would
    write language_model.model.model.*), with lm_head tied as vLLM ties it (transformers' Qwen2Audio does not
    tie: the explicit lm_head makes both see the same weights)."""
    from safetensors.torch import save_file

    state = {}
    for name, p in model.state_dict().items():
        key = name.replace("model.language_model.", "language_model.model.").replace(
            "model.audio_tower.", "audio_tower.").replace("model.multi_modal_projector.", "multi_modal_projector.")
        key = key.replace("lm_head.", "language_model.lm_head.") if key.startswith("lm_head.") else key
        state[key] = p.detach().contiguous().clone()
    state["language_model.lm_head.weight"] = state["language_model.model.embed_tokens.weight"].clone()
    cfg.save_pretrained(out)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(out)
    save_processor(out, tok, mel_bins=cfg.audio_config.num_mel_bins)
