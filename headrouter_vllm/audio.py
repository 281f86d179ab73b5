"""Local test audio: speech from espeak-ng (resampled to 16 kHz with sox). Nothing is downloaded."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000


def speak(text: str, voice: str = "en") -> np.ndarray:
    """``text`` spoken by espeak-ng as a float32 mono wave at 16 kHz."""
    import soundfile as sf

    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (apt-get install -y espeak-ng sox)")
    with tempfile.TemporaryDirectory() as tmp:
        raw, wav = Path(tmp) / "raw.wav", Path(tmp) / "16k.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(raw), text], check=True, capture_output=True)
        # -D: no dither (sox adds random dither noise by default: the wave would differ run to run)
        subprocess.run(["sox", "-D", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", str(wav)], check=True,
                       capture_output=True)
        wave, rate = sf.read(str(wav), dtype="float32")
    assert rate == SAMPLE_RATE
    return wave


def to_wav_bytes(wave: np.ndarray, rate: int = SAMPLE_RATE, subtype: str = "PCM_16") -> bytes:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, rate, format="WAV", subtype=subtype)
    return buf.getvalue()
