"""Patch: size vLLM's encoder cache for the longest audio Qwen2.5-Omni takes (300 s), not Qwen2-Audio's 30 s.

vLLM 0.32's ``Qwen2_5OmniThinkerProcessingInfo.get_mm_max_tokens_per_item`` reuses Qwen2-Audio's answer: 750
tokens (30 s). The encoder cache and the per-step encoder budget are sized from it (at least
``max_num_batched_tokens``), so a clip over about 40 s is refused at the door ("exceeds the pre-allocated encoder
cache size") unless ``max_num_batched_tokens`` is raised to its token count, which also makes every prefill chunk
that large. The Omni processor itself takes up to its feature extractor's ``chunk_length`` (300 s, 7,500 tokens).
The patched method reports that. Applied in every process and to vanilla engines too: it is a fix of vLLM's sizing,
and a side-by-side benchmark must give both engines the same encoder cache.
"""

from __future__ import annotations


def max_audio_tokens(feature_extractor) -> int:
    """Audio tokens of the longest clip the processor takes (Whisper frames -> /2 conv -> /2 pooling)."""
    frames = int(feature_extractor.chunk_length * feature_extractor.sampling_rate) // feature_extractor.hop_length
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def apply():
    from vllm.model_executor.models.qwen2_5_omni_thinker import Qwen2_5OmniThinkerProcessingInfo

    original = Qwen2_5OmniThinkerProcessingInfo.get_mm_max_tokens_per_item

    def get_mm_max_tokens_per_item(self, seq_len, mm_counts=None):
        tokens = dict(original(self, seq_len, mm_counts))
        if "audio" in tokens:
            tokens["audio"] = max(tokens["audio"], max_audio_tokens(self.get_feature_extractor()))
        return tokens

    Qwen2_5OmniThinkerProcessingInfo.get_mm_max_tokens_per_item = get_mm_max_tokens_per_item
    return lambda: setattr(Qwen2_5OmniThinkerProcessingInfo, "get_mm_max_tokens_per_item", original)
