"""Qwen2-Audio's Whisper-style audio tower run on the real audio of a batch only, not on the 30 s padding.

The processor pads every clip to 3,000 mel frames and ``Qwen2AudioEncoder`` masks the padded key positions, so its
outputs at the real positions depend only on the real frames and the few pad frames the convolutions see at the
boundary (the pad region of a Whisper log-mel is not zero). :func:`encode_window` runs the same computation on the
first ``window_frames(longest real clip)`` frames: the real frames plus a margin, rounded up to even; with the same
key-padding mask vLLM builds, at the conv positions past each clip's real length. A clip of ``M`` real frames has
``F = (M - 1) // 2 + 1`` conv positions and ``(F - 2) // 2 + 1`` pooled tokens; the last pooled token of an odd
``F`` averages one pad position, which the window covers too (it reads frames up to ``M + 2``).

Used by training (:mod:`headrouter_vllm.listening.features`, one clip) and by vLLM engines
(``patch/qwen2_audio_encoder.py``, a batch); both are tested against HF transformers' full padded model.
No vLLM import here.
"""

from __future__ import annotations

import torch

# pad frames after the longest real clip that the window keeps: the convolutions of the last real (and the one
# pooled pad) position read up to 2 frames past the real audio; 8 leaves room
MARGIN_FRAMES = 8


def audio_token_count(mel_frames: int) -> int:
    """Audio tokens of a clip with ``mel_frames`` real frames (conv stride 2, then the average pool of 2)."""
    return ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1


def window_frames(longest: int, total: int) -> int:
    """Mel frames the tower runs on for a batch whose longest real clip has ``longest`` frames, of ``total``."""
    if isinstance(longest, bool) or not isinstance(longest, int) or not 0 < longest <= total:
        raise ValueError(f"a clip's real mel frames must be an integer in [1, {total}], got {longest!r}")
    window = longest + MARGIN_FRAMES
    return min(total, window + window % 2)  # even: the stride-2 conv then ends on a whole position


@torch.no_grad()
def encode_window(encoder, features: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """``encoder``'s ``last_hidden_state`` on the window: [batch, pooled tokens of the window, d_model].

    ``features`` [batch, mel, 3000] (padded as the processor pads), ``frames`` [batch] each clip's real mel frames
    (``feature_attention_mask.sum(-1)``). Row ``b``'s first ``audio_token_count(frames[b])`` tokens equal the
    full model's; the rest are padding, as in the full model's output.
    """
    if features.dim() != 3 or frames.dim() != 1 or frames.shape[0] != features.shape[0]:
        raise ValueError(f"features must be [batch, mel, frames] and frames [batch], got {tuple(features.shape)} "
                         f"and {tuple(frames.shape)}")
    if int(frames.min()) < 1:
        raise ValueError(f"every clip needs at least one real mel frame, got {frames.tolist()}")
    weight = encoder.conv1.weight
    window = window_frames(int(frames.max()), features.shape[-1])
    x = features[:, :, :window].to(dtype=weight.dtype, device=weight.device)
    h = torch.nn.functional.gelu(encoder.conv1(x))
    h = torch.nn.functional.gelu(encoder.conv2(h)).permute(0, 2, 1)
    h = h + encoder.embed_positions.weight[: h.shape[1]]
    h = torch.nn.functional.dropout(h, p=encoder.dropout, training=encoder.training)
    # the mask vLLM's Qwen2-Audio builds for the full input, cut to the window: -inf at the padded keys
    conv_positions = (frames.to(weight.device) - 1) // 2 + 1
    padded = torch.arange(h.shape[1], device=weight.device)[None] >= conv_positions[:, None]
    mask = torch.zeros(padded.shape[0], 1, h.shape[1], h.shape[1], dtype=weight.dtype, device=weight.device)
    mask.masked_fill_(padded[:, None, None, :], float("-inf"))
    for layer in encoder.layers:
        h = layer(h, mask)
        h = h[0] if isinstance(h, tuple) else h
    h = encoder.avg_pooler(h.permute(0, 2, 1)).permute(0, 2, 1)
    return encoder.layer_norm(h)
