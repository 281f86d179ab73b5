"""Qwen2-Audio's audio tower on the real audio only (``patch/qwen2_audio_encoder.py``, ``models/audio_window.py``):
equal to HF transformers' full padded model on the tiny Qwen2-Audio, and on or off per engine as documented. The
engine check (greedy output with the option on = vanilla's) is in ``tests/test_engine.py``
(``test_encoder_window_engine_equals_vanilla``)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from headrouter_vllm.config import ConfigError, encoder_window

SECONDS = (1.0, 1.01, 2.5, 7.0, 13.3, 29.9, 30.0)  # 1.01 s: 101 mel frames, an odd count (odd conv positions too)


@pytest.fixture(scope="module")
def hf(tiny_model):
    from tests.hf_reference import load

    model, processor = load(tiny_model)
    model.eval()
    return model, processor


def wave(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * 16000))) / 16000
    return (0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def features(processor, seconds):
    out = processor.feature_extractor([wave(s, i) for i, s in enumerate(seconds)], sampling_rate=16000,
                                      return_attention_mask=True, padding="max_length", return_tensors="pt")
    return out["input_features"], out["attention_mask"]


@torch.no_grad()
def hf_projected(model, f, fm) -> torch.Tensor:
    """HF transformers' path on one padded 30 s clip, as ``Qwen2AudioModel.forward`` runs it: its key-padding mask
    (``create_bidirectional_mask``), the tower on all 3,000 frames, the projector, the clip's real tokens."""
    from transformers.masking_utils import create_bidirectional_mask

    tower = model.model.audio_tower
    conv_positions, tokens = tower._get_feat_extract_output_lengths(fm.sum(-1))
    keep = (torch.arange(1500)[None] < conv_positions[:, None]).long()
    mask = create_bidirectional_mask(config=tower.config, inputs_embeds=torch.zeros(1, 1500, 1), attention_mask=keep)
    hidden = tower(f, attention_mask=mask).last_hidden_state
    return model.model.multi_modal_projector(hidden)[0, : int(tokens[0])]


def vllm_model(model, on: bool):
    """What vLLM's ``_process_audio_input`` reads of its model (tower, projector), with HF's modules in them."""
    return types.SimpleNamespace(audio_tower=model.model.audio_tower,
                                 multi_modal_projector=model.model.multi_modal_projector,
                                 headrouter_encoder_window=on)


def vllm_process(model, f, fm, on: bool, widths: list):
    """vLLM 0.32's method (unpatched) or the patched one; ``widths`` gets the mel width conv1 saw."""
    from vllm.model_executor.models.qwen2_audio import Qwen2AudioForConditionalGeneration

    from headrouter_vllm.patch.qwen2_audio_encoder import process_audio_input

    method = Qwen2AudioForConditionalGeneration._process_audio_input
    vllm_method = getattr(method, "__wrapped__", method)  # vLLM's own, whether the patch is applied or not
    hook = model.model.audio_tower.conv1.register_forward_hook(lambda m, a, out: widths.append(a[0].shape[-1]))
    try:
        audio_input = dict(type="audio_features", input_features=f, feature_attention_mask=fm)
        with torch.no_grad():
            return process_audio_input(vllm_model(model, on), audio_input, vllm_method)
    finally:
        hook.remove()


@pytest.mark.parametrize("batch", [(s,) for s in SECONDS] + [(7.0, 1.0, 13.3, 2.5, 1.01), SECONDS],
                         ids=lambda b: "+".join(f"{s}s" for s in b))
def test_window_equals_the_full_padded_model(hf, batch):
    """Every clip's tokens, alone and in a mixed batch (the window of its longest clip): equal to HF's padded 30 s
    model and to vLLM's unpatched method, in fp32; the tower saw the longest clip plus the margin, rounded to even."""
    from headrouter_vllm.models.audio_window import audio_token_count, window_frames

    model, processor = hf
    f, fm = features(processor, batch)
    assert f.shape[-1] == 3000
    frames = fm.sum(-1).tolist()
    widths, vanilla_widths = [], []
    ours = vllm_process(model, f, fm, True, widths)
    vanilla = vllm_process(model, f, fm, False, vanilla_widths)
    assert vanilla_widths == [3000]
    assert widths == [min(3000, max(frames) + 8 + (max(frames) + 8) % 2)] == [window_frames(max(frames), 3000)]
    assert len(ours) == len(vanilla) == len(batch)
    for i, (got, base) in enumerate(zip(ours, vanilla, strict=True)):
        ref = hf_projected(model, f[i:i + 1], fm[i:i + 1])
        assert got.shape == base.shape == ref.shape == (audio_token_count(frames[i]), ref.shape[-1])
        scale = ref.abs().max()
        assert (got - ref).abs().max() <= 1e-5 * scale, (batch[i], float((got - ref).abs().max() / scale))
        assert (base - ref).abs().max() <= 1e-5 * scale


def test_window_needs_real_frames(hf):
    from headrouter_vllm.models.audio_window import encode_window, window_frames

    model, processor = hf
    f, fm = features(processor, (1.0,))
    with pytest.raises(ValueError, match="at least one real mel frame"):
        encode_window(model.model.audio_tower, f, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"in \[1, 3000\]"):
        window_frames(3001, 3000)


def fake(additional_config):
    return types.SimpleNamespace(additional_config=additional_config)


def test_on_in_headrouter_engines_off_in_vanilla_ones_unless_asked():
    assert encoder_window(fake({"headrouter": {}})) is True
    assert encoder_window(fake({"headrouter": {"encoder_window": False}})) is False
    assert encoder_window(fake({})) is False
    assert encoder_window(fake(None)) is False
    assert encoder_window(fake({"headrouter_encoder_window": True})) is True
    assert encoder_window(fake({"headrouter_encoder_window": False})) is False


@pytest.mark.parametrize("extra,message", [
    ({"headrouter_encoder_window": "yes"}, "headrouter_encoder_window must be true or false, got 'yes'"),
    ({"headrouter_encoder_window": 1}, "must be true or false, got 1"),
    ({"headrouter": {"encoder_window": "on"}}, "headrouter.encoder_window must be true or false, got 'on'"),
    ({"headrouter": {}, "headrouter_encoder_window": True}, "set headrouter.encoder_window there instead"),
])
def test_bad_values_stop_startup(extra, message):
    """Checked where vLLM builds the engine config (the platform hook), vanilla engines included."""
    from headrouter_vllm.patch.platform_config import configure_engine
    from tests.test_config import fake_vllm_config

    with pytest.raises(ConfigError) as info:
        configure_engine(fake_vllm_config(extra))
    assert message in str(info.value)


def test_patch_is_applied_once_and_reverts():
    from vllm.model_executor.models.qwen2_audio import Qwen2AudioForConditionalGeneration as Model

    from headrouter_vllm import patch
    from headrouter_vllm.patch import qwen2_audio_encoder

    before = (Model.__init__, Model._process_audio_input)
    applied = "qwen2_audio_encoder" in patch.applied()
    if applied:
        patch.revert_all()
    vllm_own = (Model.__init__, Model._process_audio_input)
    undo = qwen2_audio_encoder.apply()
    try:
        assert Model._process_audio_input.__wrapped__ is vllm_own[1]
        assert Model.__init__.__wrapped__ is vllm_own[0]
    finally:
        undo()
    assert (Model.__init__, Model._process_audio_input) == vllm_own
    if applied:
        from headrouter_vllm.plugin import register

        register()
        assert (Model.__init__, Model._process_audio_input) != vllm_own
    else:
        assert (Model.__init__, Model._process_audio_input) == before
