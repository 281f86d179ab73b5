"""The frozen audio tower's outputs per clip (after the average pool and LayerNorm, before the projector), for
training: the encoder is frozen, so its outputs are computed once per clip.

``Qwen2AudioEncoder`` only accepts 30 s (3,000 mel frames) and masks the padding. :func:`encode` runs it on the
real frames plus a margin (:mod:`headrouter_vllm.models.audio_window`, which vLLM engines use too) and keeps the
real tokens. The tests hold it equal to the full model on padded input.
"""

from __future__ import annotations

import torch

from headrouter_vllm.models.audio_window import MARGIN_FRAMES, audio_token_count, encode_window

__all__ = ["MARGIN_FRAMES", "audio_token_count", "encode", "encode_reference"]


@torch.no_grad()
def encode(encoder, features: torch.Tensor, feature_mask: torch.Tensor) -> torch.Tensor:
    """[tokens, d_model] for one clip; ``features`` [1, mel, 3000], ``feature_mask`` [1, 3000]."""
    frames = feature_mask.sum(-1)
    return encode_window(encoder, features, frames)[0, : audio_token_count(int(frames[0]))]


@torch.no_grad()
def encode_reference(model, features: torch.Tensor, feature_mask: torch.Tensor) -> torch.Tensor:
    """What ``Qwen2AudioForConditionalGeneration`` feeds its projector on the padded 30 s input."""
    captured = {}
    hook = model.model.multi_modal_projector.register_forward_hook(
        lambda module, args, output: captured.setdefault("x", args[0]))
    n = audio_token_count(int(feature_mask.sum()))
    try:
        model.model(input_ids=torch.tensor([[model.config.audio_token_id] * n]), input_features=features,
                    feature_attention_mask=feature_mask)
    finally:
        hook.remove()
    return captured["x"].reshape(-1, captured["x"].shape[-1])[:n]
