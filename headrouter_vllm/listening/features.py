"""The frozen audio tower's outputs per clip (after the average pool and LayerNorm, before the projector), for
training: the encoder is frozen, so its outputs are computed once per clip.

``Qwen2AudioEncoder`` only accepts 30 s (3,000 mel frames) and masks the padding. :func:`encode` runs the same
computation on a window of the real frames plus a margin (the convolutions see the same boundary frames; the
pad region of a Whisper log-mel is not zero), with the same key-padding mask, and keeps the real tokens:
``F = (M - 1) // 2 + 1`` conv positions and ``(F - 2) // 2 + 1`` pooled tokens for ``M`` real frames. The tests
hold it equal to the full model on padded input.
"""

from __future__ import annotations

import torch

MARGIN_FRAMES = 8


def audio_token_count(mel_frames: int) -> int:
    return ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1


@torch.no_grad()
def encode(encoder, features: torch.Tensor, feature_mask: torch.Tensor) -> torch.Tensor:
    """[tokens, d_model] for one clip; ``features`` [1, mel, 3000], ``feature_mask`` [1, 3000]."""
    from transformers.masking_utils import create_bidirectional_mask

    frames = int(feature_mask.sum())
    conv_positions = (frames - 1) // 2 + 1
    window = min(features.shape[-1], frames + MARGIN_FRAMES + (frames + MARGIN_FRAMES) % 2)
    x = features[:, :, :window].to(encoder.conv1.weight.dtype)
    h = torch.nn.functional.gelu(encoder.conv1(x))
    h = torch.nn.functional.gelu(encoder.conv2(h)).permute(0, 2, 1)
    h = h + encoder.embed_positions.weight[: h.shape[1]]
    keep = (torch.arange(h.shape[1]) < conv_positions).long()[None]
    mask = create_bidirectional_mask(config=encoder.config, inputs_embeds=h, attention_mask=keep)
    for layer in encoder.layers:
        h = layer(h, mask)
        h = h[0] if isinstance(h, tuple) else h
    h = encoder.avg_pooler(h.permute(0, 2, 1)).permute(0, 2, 1)
    return encoder.layer_norm(h)[0, : audio_token_count(frames)]


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
