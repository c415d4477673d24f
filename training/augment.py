"""Speech the demo model never heard from its corpus: the same clips, changed the way users' audio differs.

The teacher's video follows the clean speech, so an augmented copy of a clip's audio keeps its latents and
only changes what the audio path hears: another voice height (pitch), a noisy room, a reverberant one, a
telephone line, a quiet or loud microphone, music playing under the speech (and in its pauses, where the
mouth must stay shut). Each clip gets a few variants of its per-video-frame features, stored beside the
latents (`AugmentedFeatures`), and the DiT's audio stage trains on them for a share of its windows
(`DiTTrainConfig.audio_augment`). The DSP is librosa's and scipy's.

Variant ``v`` of a clip depends only on ``(seed, v)``: variants 0-2 take two of ``AUGMENTATIONS``; from
``MUSIC_FROM_VARIANT`` on, each also has music mixed in first (so the room and the line colour it too).
A store built with fewer variants is completed in place (`build_augmented`), earlier variants unchanged.
"""

from __future__ import annotations

import zlib

import librosa
import numpy as np
from scipy.signal import butter, fftconvolve, sosfilt

from audio.features.base import AudioFeatures
from audio.pcm import MODEL_SAMPLE_RATE
from training.latents import KeyedFiles

AUGMENTATIONS = ("pitch", "noise", "reverb", "telephone", "level")
MUSIC_FROM_VARIANT = 3
MUSIC_SNR_DB = (5.0, 20.0)  # the speech's level over the music's
_SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
_PROGRESSIONS = ((0, 4, 5, 3), (0, 5, 3, 4), (1, 4, 0, 5), (0, 3, 0, 4), (5, 3, 0, 4))  # scale degrees, a bar each


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


def _tone(midi: float, n: int, harmonics: int, rng: np.random.Generator) -> np.ndarray:
    """`n` samples of a harmonic tone (amplitude 1/k per harmonic k, below Nyquist), random phases."""
    f0 = 440.0 * 2 ** ((midi - 69) / 12)
    t = np.arange(n) / MODEL_SAMPLE_RATE
    out = np.zeros(n)
    for k in range(1, harmonics + 1):
        if k * f0 < MODEL_SAMPLE_RATE / 2 - 500:
            out += np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi)) / k
    return out


def _add(track: np.ndarray, start: int, note: np.ndarray) -> None:
    """`note` added into `track` from sample `start` (either may be cut off at the track's ends)."""
    a, b = max(start, 0), min(start + note.size, track.size)
    if a < b:
        track[a:b] += note[a - start: b - start]


def music(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Instrumental music under the speech, its level 5-20 dB below the speech's: a chord progression on
    a pad, a bass line, a plucked melody and (mostly) drums, 70-140 bpm in a random key, starting at a random
    point of its bar. It plays through the pauses too, where the teacher's mouth stays shut."""
    sr, n = MODEL_SAMPLE_RATE, x.size
    beat = int(sr * 60 / rng.uniform(70, 140))
    root = int(rng.integers(40, 52))  # E2..D#3: the bass's octave
    scale = _SCALES[str(rng.choice(list(_SCALES)))]
    chords = _PROGRESSIONS[int(rng.integers(len(_PROGRESSIONS)))]
    note = lambda degree: root + 12 * (degree // 7) + scale[degree % 7]  # noqa: E731
    pad, bass, melody, drums = (np.zeros(n) for _ in range(4))
    decay = lambda m, s: np.exp(-np.arange(m) / (s * sr))  # noqa: E731
    start = -int(rng.integers(0, 4 * beat))
    ramp = np.arange(4 * beat)
    bar_env = np.minimum(1, np.minimum(ramp / (0.05 * sr), (4 * beat - ramp) / (0.1 * sr)))  # 50 ms in, 100 ms out
    for bar, t0 in enumerate(range(start, n, 4 * beat)):
        degree = chords[bar % len(chords)]
        for third in (0, 2, 4):  # a triad an octave up, soft
            _add(pad, t0, 0.3 * bar_env * _tone(note(degree + third) + 12, 4 * beat, 6, rng))
        for b in range(4):
            _add(bass, t0 + b * beat, decay(beat, 0.25) * _tone(note(degree), beat, 4, rng))
            for half in (0, 1):  # eighth notes of the chord's scale, some rests
                if rng.random() < 0.65:
                    m = note(degree + int(rng.choice([0, 2, 4, 7, 9]))) + 24
                    _add(melody, t0 + b * beat + half * beat // 2, decay(beat, 0.12) * _tone(m, beat, 5, rng))
    if rng.random() < 0.8:
        hit = np.arange(int(0.25 * sr)) / sr
        kick = np.sin(2 * np.pi * np.cumsum(45 + 90 * np.exp(-hit / 0.03)) / sr) * np.exp(-hit / 0.12)
        for k, t0 in enumerate(range(start, n, beat)):
            noise_burst = rng.standard_normal(beat // 2)
            if k % 2 == 0:
                _add(drums, t0, kick)
            else:  # a snare: noise, its body a little low-passed
                _add(drums, t0, 0.5 * np.convolve(noise_burst, [0.5, 0.5], "same") * decay(beat // 2, 0.08))
            _add(drums, t0 + beat // 2, 0.2 * np.diff(noise_burst, prepend=0) * decay(beat // 2, 0.02))  # hi-hat
    parts = [p / (np.sqrt(np.mean(p ** 2)) + 1e-9) for p in (pad, bass, melody, drums)]
    mix = sum(w * p for w, p in zip(rng.uniform(0.3, 1.0, size=4), parts))
    mix /= np.sqrt(np.mean(mix ** 2)) + 1e-9
    speech = np.sqrt(np.mean(x[np.abs(x) > 1e-3].astype(np.float64) ** 2)) if np.any(np.abs(x) > 1e-3) else 0.1
    return (x + speech * 10 ** (-rng.uniform(*MUSIC_SNR_DB) / 20) * mix).astype(np.float32)


_FUNCS = {"music": music, "pitch": pitch, "noise": noise, "reverb": reverb, "telephone": telephone, "level": level}


def apply(x: np.ndarray, names, rng: np.random.Generator) -> np.ndarray:
    """The augmentations `names`, in that order, to 16 kHz mono `x`."""
    for name in names:
        x = _FUNCS[name](x, rng)
    return x


def augment(x: np.ndarray, rng: np.random.Generator, count: int = 2) -> tuple[np.ndarray, tuple[str, ...]]:
    """`count` different augmentations of 16 kHz mono `x`, in a random order -> (audio, their names)."""
    names = tuple(str(n) for n in rng.choice(AUGMENTATIONS, size=count, replace=False))
    return apply(x, names, rng), names


def clip_seed(seed: int, key: str) -> int:
    """A clip's augmentation seed: its store key's, so that it does not move when other clips are added."""
    return seed * 100_003 + zlib.crc32(key.encode())


def variant_names(seed: int, v: int) -> tuple[str, ...]:
    """The augmentations of variant `v` of the clip seeded `seed`, in the order they are applied."""
    names = tuple(str(n) for n in np.random.default_rng([seed, v]).choice(AUGMENTATIONS, size=2, replace=False))
    return ("music", *names) if v >= MUSIC_FROM_VARIANT else names


def augmented_features(features: AudioFeatures, audio: np.ndarray, num_video: int, variants: int,
                       seed: int, first: int = 0) -> np.ndarray:
    """(variants - first, faces, num_video, D): per-frame features of augmented copies `first..variants-1`
    of a clip's per-face 16 kHz audio (faces, n). Every face of a variant gets the same augmentations (one
    room); in a variant with music, the faces hear the same music (a two-face scene shares its room)."""
    out = []
    for v in range(first, variants):
        names = variant_names(seed, v)
        faces = []
        for f, track in enumerate(audio):
            x = track.astype(np.float32)
            if "music" in names:  # one piece for every face: seeded by the variant, not the face
                x = music(x, np.random.default_rng([seed, v, 0x6D]))
            rest = [n for n in names if n != "music"]
            faces.append(features(apply(x, rest, np.random.default_rng([seed, v, f])), num_video))
        out.append(np.stack(faces))
    return np.stack(out).astype(np.float32)


class AugmentedFeatures(KeyedFiles):
    """Augmented feature variants per latent-store key, one .npy each, written atomically. `variants`: read
    only the first that many (a round that trained before later variants existed hears what it heard)."""

    suffix = ".npy"

    def __init__(self, root, variants: int | None = None) -> None:
        super().__init__(root)
        self.variants = variants

    def write(self, key: str, feats: np.ndarray) -> None:
        self._write_atomic(key, lambda tmp: np.save(tmp, feats))

    def read(self, key: str) -> np.ndarray:
        feats = np.load(self.path(key))
        return feats if self.variants is None else feats[:self.variants]


def build_augmented(clips, latents, features: AudioFeatures, out: AugmentedFeatures, variants: int = 3,
                    seed: int = 0, log=print) -> int:
    """`variants` variants for every training clip of `latents` (a LatentStore), from the clip store
    `clips`' audio: clips not yet in `out` get all of them, clips with fewer get the rest appended
    (resumable). Returns how many clips were written."""
    done = 0
    for key in latents.keys():
        have = np.load(out.path(key)) if key in out else None  # every variant, whatever `out` reads
        if have is not None and have.shape[0] >= variants:
            continue
        lc = latents.read(key)
        if lc.split != "train":
            continue
        audio = clips.read(key).audio  # (faces, n) 16 kHz
        n_video = lc.features.shape[1]
        first = 0 if have is None else have.shape[0]
        new = augmented_features(features, audio, n_video, variants, clip_seed(seed, key), first)
        out.write(key, new if have is None else np.concatenate([have, new]))
        done += 1
        if done % 20 == 0:
            log(f"augmented {done} clips")
    return done
