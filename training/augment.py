"""Speech the demo model never heard from espeak-ng: the same clips, changed the way users' audio differs.

The teacher's video follows the clean speech, so an augmented copy of a clip's audio keeps its latents and
only changes what the audio path hears: another voice height (pitch), a noisy room, a reverberant one, a
telephone line, a quiet or loud microphone. Each clip gets a few variants of its per-video-frame
features, stored beside the latents (`AugmentedFeatures`), and the DiT's audio stage trains on them for a
share of its windows (`DiTTrainConfig.audio_augment`). The DSP is librosa's and scipy's.
"""

from __future__ import annotations

import librosa
import numpy as np
from scipy.signal import butter, fftconvolve, sosfilt

from audio.features.base import AudioFeatures
from audio.pcm import MODEL_SAMPLE_RATE
from training.latents import KeyedFiles

AUGMENTATIONS = ("pitch", "noise", "reverb", "telephone", "level")


def pitch(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Up or down 2-5 semitones, same duration (a higher or lower voice, same timing)."""
    steps = float(rng.uniform(2, 5) * rng.choice([-1, 1]))
    return librosa.effects.pitch_shift(x, sr=MODEL_SAMPLE_RATE, n_steps=steps).astype(np.float32)


def noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pink-ish background noise at 10-30 dB below the speech's level (a fan, a street)."""
    level = np.sqrt(np.mean(x.astype(np.float64) ** 2)) or 0.05  # a silent track gets noise of typical speech
    white = rng.standard_normal(x.size)
    pink = np.cumsum(white) * 0.02 + white  # a low-frequency tilt, then levelled
    pink = (pink - pink.mean()) / (pink.std() + 1e-9)
    snr_db = rng.uniform(10, 30)
    return (x + level * 10 ** (-snr_db / 20) * pink).astype(np.float32)


def reverb(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A room: exponentially decaying noise as impulse response (RT60 0.2-0.8 s), direct sound first."""
    rt60 = rng.uniform(0.2, 0.8)
    t = np.arange(int(rt60 * MODEL_SAMPLE_RATE)) / MODEL_SAMPLE_RATE
    ir = rng.standard_normal(t.size) * np.exp(-6.9 * t / rt60) * rng.uniform(0.1, 0.4)
    ir[0] = 1.0
    wet = fftconvolve(x, ir)[:x.size]
    return (wet * (np.abs(x).max() / (np.abs(wet).max() + 1e-9))).astype(np.float32)


def telephone(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """300-3400 Hz band (a phone line, a cheap headset)."""
    lo, hi = rng.uniform(250, 400), rng.uniform(3000, 3600)
    sos = butter(4, [lo, hi], btype="bandpass", fs=MODEL_SAMPLE_RATE, output="sos")
    return sosfilt(sos, x).astype(np.float32)


def level(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """12 dB quieter to 6 dB louder (clipped as a real input would be)."""
    return np.clip(x * 10 ** (rng.uniform(-12, 6) / 20), -1, 1).astype(np.float32)


_FUNCS = {"pitch": pitch, "noise": noise, "reverb": reverb, "telephone": telephone, "level": level}


def apply(x: np.ndarray, names, rng: np.random.Generator) -> np.ndarray:
    """The augmentations `names`, in that order, to 16 kHz mono `x`."""
    for name in names:
        x = _FUNCS[name](x, rng)
    return x


def augment(x: np.ndarray, rng: np.random.Generator, count: int = 2) -> tuple[np.ndarray, tuple[str, ...]]:
    """`count` different augmentations of 16 kHz mono `x`, in a random order -> (audio, their names)."""
    names = tuple(str(n) for n in rng.choice(AUGMENTATIONS, size=count, replace=False))
    return apply(x, names, rng), names


def augmented_features(features: AudioFeatures, audio: np.ndarray, num_video: int, variants: int,
                       seed: int) -> np.ndarray:
    """(variants, faces, num_video, D): per-frame features of `variants` augmented copies of a clip's
    per-face 16 kHz audio (faces, n); every face of a variant gets the same augmentations (one room)."""
    out = []
    for v in range(variants):
        names = np.random.default_rng([seed, v]).choice(AUGMENTATIONS, size=2, replace=False)
        faces = [features(apply(track.astype(np.float32), names, np.random.default_rng([seed, v, f])), num_video)
                 for f, track in enumerate(audio)]
        out.append(np.stack(faces))
    return np.stack(out).astype(np.float32)


class AugmentedFeatures(KeyedFiles):
    """Augmented feature variants per latent-store key, one .npy each, written atomically."""

    suffix = ".npy"

    def write(self, key: str, feats: np.ndarray) -> None:
        self._write_atomic(key, lambda tmp: np.save(tmp, feats))

    def read(self, key: str) -> np.ndarray:
        return np.load(self.path(key))


def build_augmented(clips, latents, features: AudioFeatures, out: AugmentedFeatures, variants: int = 3,
                    seed: int = 0, log=print) -> int:
    """Variants for every training clip of `latents` (a LatentStore) not yet in `out` (resumable), from the
    clip store `clips`' audio. Returns how many clips were done."""
    done = 0
    for i, key in enumerate(latents.keys()):
        if key in out:
            continue
        lc = latents.read(key)
        if lc.split != "train":
            continue
        audio = clips.read(key).audio  # (faces, n) 16 kHz
        n_video = lc.features.shape[1]
        out.write(key, augmented_features(features, audio, n_video, variants, seed * 100_003 + i))
        done += 1
        if done % 20 == 0:
            log(f"augmented {done} clips")
    return done
