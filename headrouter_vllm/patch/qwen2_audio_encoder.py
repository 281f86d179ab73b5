"""Patch: Qwen2-Audio's audio tower runs on the real audio of each encoder batch, not on the 30 s padding.

vLLM 0.32's ``Qwen2AudioForConditionalGeneration._process_audio_input`` (model_executor/models/qwen2_audio.py)
calls ``self.audio_tower(input_features, attention_mask=audio_attention_mask)`` on the processor's [clips, 128,
3000] features with a key-padding mask: a 5 s clip pays for 30 s. The patched method runs the tower on the window
of the longest real clip of the batch plus a margin (``models/audio_window.py``, the code training uses), then
vLLM's own projector, masking and split: the same tuple of [tokens, hidden] tensors, equal within float tolerance.

Per engine: ``__init__`` is wrapped to record ``config.encoder_window(vllm_config)`` on the model (on by default in
HeadRouter engines, ``additional_config.headrouter_encoder_window`` in vanilla ones). Other inputs (audio
embeddings, a list of features, a window that is the whole input) go to vLLM's method unchanged.

Qwen2.5-Omni needs no patch: vLLM 0.32's ``Qwen2_5OmniThinkerMultiModalProcessor._postprocess_hf_mm_data`` keeps
only the real frames (``input_features.permute(0, 2, 1)[feature_attention_mask.bool()]``) and its
``_process_audio_input`` passes ``feature_lens=audio_feature_lengths`` to the tower.
"""

from __future__ import annotations

import functools

ATTRIBUTE = "headrouter_encoder_window"  # on the model instance: this engine's setting


def process_audio_input(model, audio_input, original):
    """``_process_audio_input`` with the tower on the window; vLLM's ``original`` where there is nothing to cut."""
    import torch
    from vllm.utils.gpu_sync_debug import gpu_sync_allowed

    from headrouter_vllm.models.audio_window import encode_window, window_frames

    if not getattr(model, ATTRIBUTE, False) or audio_input["type"] != "audio_features":
        return original(model, audio_input)
    features, feature_mask = audio_input["input_features"], audio_input["feature_attention_mask"]
    if not isinstance(features, torch.Tensor) or features.dim() != 3:
        return original(model, audio_input)
    frames = feature_mask.sum(-1)
    with gpu_sync_allowed():  # the window size is a host integer (vLLM's split below syncs as well)
        longest = int(frames.max())
    if window_frames(longest, features.shape[-1]) >= features.shape[-1]:
        return original(model, audio_input)  # a clip of about 30 s: nothing to cut
    hidden = encode_window(model.audio_tower, features, frames)
    _, output_lengths = model.audio_tower._get_feat_extract_output_lengths(frames)
    # from here as vLLM's method: project, keep each clip's real tokens, split per clip
    audio_features = model.multi_modal_projector(hidden)
    num_audios, max_audio_tokens, embed_dim = audio_features.shape
    output_lengths = output_lengths.unsqueeze(1)
    keep = torch.arange(max_audio_tokens, device=output_lengths.device).expand(num_audios, max_audio_tokens)
    keep = keep < output_lengths
    with gpu_sync_allowed():
        kept = audio_features[keep].view(-1, embed_dim)
        return torch.split(kept, output_lengths.flatten().tolist())


def apply():
    from vllm.model_executor.models.qwen2_audio import Qwen2AudioForConditionalGeneration as Model

    from headrouter_vllm.config import encoder_window

    original_init, original_process = Model.__init__, Model._process_audio_input

    @functools.wraps(original_init)  # keeps vLLM's signature (its loader reads it) and ``__wrapped__``
    def __init__(self, *, vllm_config, prefix: str = ""):
        original_init(self, vllm_config=vllm_config, prefix=prefix)
        setattr(self, ATTRIBUTE, encoder_window(vllm_config))

    @functools.wraps(original_process)
    def _process_audio_input(self, audio_input):
        return process_audio_input(self, audio_input, original_process)

    Model.__init__, Model._process_audio_input = __init__, _process_audio_input

    def undo() -> None:
        Model.__init__, Model._process_audio_input = original_init, original_process

    return undo
