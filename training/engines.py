"""Speech from engines the demo model never trained on, for `eval demo`'s held-out engine family.

The corpus is espeak-ng only (training/corpus.py), so a held-out espeak voice still shares its engine's
formant synthesis with every training clip; users bring other engines. Flite (CMU's diphone and
unit-selection voices, Debian package `flite`) is a different synthesis family: its held-out clips read
the corpus's held-out sentences, so neither the engine, the voice nor the sentences were ever trained on.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import numpy as np

from audio.io import read_audio
from audio.pcm import MODEL_SAMPLE_RATE
from training.corpus import at_speech_level, ensure_tool, sentences, trim_silence

FLITE_VOICES = ("slt", "rms", "awb", "kal16")  # US female, US male, Scottish male, US male (diphone)
PAUSE_S = 0.4  # between sentences
SENTENCES_PER_CLIP = 3


def synthesize_flite(text: str, voice: str = "slt") -> np.ndarray:
    """Speak `text` with flite: 16 kHz mono float32, leading/trailing near-silence trimmed."""
    if not text.strip():
        raise ValueError("synthesize_flite needs non-empty text")
    exe = ensure_tool("flite", "flite", install=False)
    with tempfile.TemporaryDirectory(prefix="flite-") as tmp:
        out = Path(tmp) / "speech.wav"
        done = subprocess.run([exe, "-voice", voice, "-o", str(out)], input=text.encode(), capture_output=True,
                              check=False)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"flite failed for voice {voice!r}: {done.stderr.decode(errors='replace').strip()}")
        wav = read_audio(out, sample_rate=MODEL_SAMPLE_RATE)
    return trim_silence(wav, "flite", f"voice {voice!r} and text {text[:40]!r}")


def flite_held_out_speech(clips: int = len(FLITE_VOICES), install: bool = True) -> list[np.ndarray]:
    """`clips` clips (one flite voice each, in turn) reading held-out corpus sentences, SENTENCES_PER_CLIP each,
    PAUSE_S apart, speech at the corpus's level."""
    ensure_tool("flite", "flite", install)
    texts = [sentences("heldout")[k] for k in sorted(sentences("heldout"))]
    gap = np.zeros(int(PAUSE_S * MODEL_SAMPLE_RATE), np.float32)
    out = []
    for i in range(clips):
        voice = FLITE_VOICES[i % len(FLITE_VOICES)]
        chosen = [texts[(SENTENCES_PER_CLIP * i + k) % len(texts)] for k in range(SENTENCES_PER_CLIP)]
        pieces = [synthesize_flite(t, voice) for t in chosen]
        audio = np.concatenate([gap, *(x for p in pieces for x in (p, gap))])
        out.append(at_speech_level(audio, np.concatenate(pieces)))
    return out
