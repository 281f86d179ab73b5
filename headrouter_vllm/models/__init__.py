"""Per-model-family facts HeadRouter needs: which vLLM attention layers are the decoder's, where the
audio spans are, and the default probe layer."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class ModelAdapter:
    family: str
    architectures: tuple[str, ...]
    # matches the vLLM attention layer names of the language model's decoder layers; group 1 = index
    decoder_layer_pattern: re.Pattern
    default_probe_layer: int = 2
    decoder_model: str = "language_model.model"  # the module holding the decoder layers (``.layers``)
    # longest audio clip the model takes; the processor would silently cut longer audio, we refuse it (400)
    max_audio_seconds: float | None = None
    # one audio part in the chat format; {n} numbers the parts from 1
    audio_placeholder: str = "<|audio_bos|><|AUDIO|><|audio_eos|>"
    other_modalities: tuple[str, ...] = ()  # what else the model takes (set to 0 items for audio-only serving)
    # audio tokens per second of a clip (Whisper's 100 frames/s, halved by its convolution and by the pooling)
    audio_tokens_per_second: float = 25.0

    def mm_limits(self, audio: int = 1) -> dict[str, int]:
        """``limit_mm_per_prompt`` for audio-only requests: vLLM then neither profiles nor reserves the rest."""
        return {"audio": audio, **dict.fromkeys(self.other_modalities, 0)}

    def decoder_layer_index(self, layer_name: str) -> int | None:
        m = self.decoder_layer_pattern.search(layer_name)
        return int(m.group(1)) if m else None


# Both families' language model is vLLM's Qwen2 under ``language_model``
QWEN2_DECODER_LAYERS = re.compile(r"^language_model\.model\.layers\.(\d+)\.self_attn\.attn$")

QWEN2_AUDIO = ModelAdapter(
    family="qwen2-audio",
    architectures=("Qwen2AudioForConditionalGeneration",),
    decoder_layer_pattern=QWEN2_DECODER_LAYERS,
    max_audio_seconds=30.0,
    audio_placeholder="Audio {n}: <|audio_bos|><|AUDIO|><|audio_eos|>\n",
)

# The Qwen2.5-Omni thinker: its language model is Qwen2 with M-RoPE. For audio-only prompts the three M-RoPE
# position rows are all the token index, so pruning keeps original positions exactly as for Qwen2-Audio (the runner
# never rewrites positions, only KV slots). Its placeholder is "<|audio_bos|>" + audio tokens + "<|audio_eos|>";
# vLLM's range covers only the audio tokens. Audio inside video (use_audio_in_video) interleaves audio and video
# tokens in one placeholder: each audio run is then a span of its own (untested: the CPU install decodes no video).
QWEN2_5_OMNI = ModelAdapter(
    family="qwen2.5-omni",
    architectures=("Qwen2_5OmniModel", "Qwen2_5OmniForConditionalGeneration",
                   "Qwen2_5OmniThinkerForConditionalGeneration"),
    decoder_layer_pattern=QWEN2_DECODER_LAYERS,
    max_audio_seconds=300.0,  # the feature extractor's chunk_length: the processor would cut longer audio
    other_modalities=("image", "video"),
)

ADAPTERS = (QWEN2_AUDIO, QWEN2_5_OMNI)


def adapter_by_family(family: str) -> ModelAdapter:
    for adapter in ADAPTERS:
        if adapter.family == family:
            return adapter
    raise ValueError(f"unknown model family {family!r}; choose one of {[a.family for a in ADAPTERS]}")


def adapter_for_model_dir(model: str) -> ModelAdapter:
    from transformers import AutoConfig

    return adapter_for(AutoConfig.from_pretrained(model))


def adapter_for(hf_config: Any) -> ModelAdapter:
    archs = tuple(getattr(hf_config, "architectures", None) or ())
    for adapter in ADAPTERS:
        if any(a in adapter.architectures for a in archs):
            return adapter
    supported = sorted(a for ad in ADAPTERS for a in ad.architectures)
    raise ValueError(f"HeadRouter does not support model architecture(s) {list(archs)}; supported: {supported}")


def audio_spans(mm_features: Any) -> list[tuple[int, int]]:
    """``(start, length)`` of each run of audio embedding tokens, in prompt order, from vLLM's
    ``MultiModalFeatureSpec.mm_position`` (a ``PlaceholderRange``). Qwen2-Audio's and Omni's audio ranges are
    exactly the audio tokens (``is_embed`` None or one run); where ``is_embed`` has several runs (Omni's audio inside
    a video, interleaved with video tokens every 2 s), each run is a span of its own."""
    spans = []
    for feature in mm_features or ():
        if feature.modality != "audio":
            continue
        rng = feature.mm_position
        offset = int(rng.offset)
        if rng.is_embed is None:
            spans.append((offset, int(rng.length)))
            continue
        idx = torch.nonzero(torch.as_tensor(rng.is_embed)).flatten()
        if idx.numel() == 0:
            continue
        breaks = (torch.nonzero(idx[1:] != idx[:-1] + 1).flatten() + 1).tolist()
        for a, b in zip([0, *breaks], [*breaks, idx.numel()], strict=True):
            spans.append((offset + int(idx[a]), b - a))
    return sorted(spans)


def resolve_probe_layer(config: Any, hf_config: Any, profiles: Any = None) -> int:
    """The probe layer an engine uses: the config's, else the profile file's, else the adapter's default; checked
    against the model (and against the profile file, which is only valid at the layer it was calibrated at)."""
    num_layers = hf_config.get_text_config().num_hidden_layers
    if config.probe_layer is not None:
        layer = config.probe_layer
    elif profiles is not None:
        layer = profiles.probe_layer
    else:
        layer = min(adapter_for(hf_config).default_probe_layer, num_layers - 1)
    if layer >= num_layers:
        raise ValueError(f"headrouter.probe_layer {layer} >= the model's {num_layers} layers")
    if profiles is not None:
        from headrouter_vllm.routing.profiles import ModelIdentity

        profiles.check_model(ModelIdentity.of(hf_config), layer)
    return layer
