"""Speech / silence per 20 ms frame: an energy gate with an adaptive noise floor and hysteresis.

Per frame the energy is ``10 log10(mean(x^2))`` in dB re full scale. The noise floor is the minimum
energy over the last ``floor_window_ms`` (minimum statistics: speech has gaps between words, so within
a second or two the quietest frame is background; a sound that never stops, like a hum, becomes
background after one window). A frame opens the gate when it is ``on_margin_db`` above the floor (and
above ``min_speech_dbfs``); the gate stays open until the energy has stayed below the lower "off"
threshold (``off_margin_db``) for ``hangover_ms``, which bridges the short dips between words, so a
pause is reported about ``hangover_ms`` after the speech stops.

It is causal and frame-local, so streaming (``VoiceActivityDetector.push``) and offline
(``detect_speech``) give identical decisions. ``speech_segments`` turns decisions into
``(start_ms, end_ms)`` intervals. Silero-VAD would be more robust to loud non-speech noise; this gate
is enough for idle behaviour and metrics on clean speech and on the espeak fixtures (see tests).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from audio.pcm import MODEL_SAMPLE_RATE, as_mono_float32

_EPS = 1e-12


@dataclass(frozen=True)
class VadConfig:
    frame_ms: int = 20
    sample_rate: int = MODEL_SAMPLE_RATE
    on_margin_db: float = 15.0  # open when energy > floor + this ...
    off_margin_db: float = 9.0  # ... and count towards closing when energy < floor + this
    min_speech_dbfs: float = -55.0  # never open below this absolute level
    hangover_ms: int = 200  # stay open this long after the energy falls (bridges word gaps)
    floor_window_ms: int = 1500  # noise floor = quietest frame in this much recent audio

    def __post_init__(self) -> None:
        if self.frame_ms <= 0 or (self.sample_rate * self.frame_ms) % 1000:
            raise ValueError(f"frame_ms={self.frame_ms} must be positive and a whole number of samples")
        if self.off_margin_db > self.on_margin_db:
            raise ValueError("off_margin_db must not exceed on_margin_db (hysteresis)")
        if self.hangover_ms < 0:
            raise ValueError("hangover_ms must be >= 0")
        if self.floor_window_ms < self.frame_ms:
            raise ValueError("floor_window_ms must cover at least one frame")

    @property
    def frame_samples(self) -> int:
        return self.sample_rate * self.frame_ms // 1000

    @property
    def hangover_frames(self) -> int:
        return -(-self.hangover_ms // self.frame_ms)

    @property
    def floor_window_frames(self) -> int:
        return self.floor_window_ms // self.frame_ms


def frame_energy_dbfs(samples: np.ndarray, frame_samples: int) -> np.ndarray:
    """Energy in dBFS of each complete frame of ``frame_samples`` (a trailing partial frame is ignored)."""
    n = samples.size // frame_samples
    frames = samples[: n * frame_samples].reshape(n, frame_samples).astype(np.float64)
    return 10.0 * np.log10(np.mean(frames * frames, axis=1) + _EPS)


class VoiceActivityDetector:
    """Streaming VAD: ``push(samples)`` -> one bool (speech) per completed 20 ms frame."""

    def __init__(self, config: VadConfig | None = None):
        self.config = config or VadConfig()
        self.reset()

    def reset(self) -> None:
        self._pending = np.zeros(0, dtype=np.float32)
        self._recent: deque[tuple[int, float]] = deque()  # (frame, energy), energies increasing
        self._floor = 0.0
        self._speech = False
        self._below = 0  # consecutive frames below the off threshold while open
        self.frames_done = 0

    @property
    def is_speech(self) -> bool:
        """Decision for the latest completed frame."""
        return self._speech

    @property
    def noise_floor_dbfs(self) -> float:
        return self._floor

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Feed 16 kHz mono samples (any count); return decisions for the frames completed by them."""
        x = as_mono_float32(samples, name="VoiceActivityDetector.push")
        buf = np.concatenate([self._pending, x]) if self._pending.size else x
        fs = self.config.frame_samples
        n = buf.size // fs
        self._pending = buf[n * fs:].copy()
        return self._decide(frame_energy_dbfs(buf[: n * fs], fs))

    def flush(self) -> np.ndarray:
        """Decide a trailing partial frame (zero-padded) and empty the input buffer."""
        if not self._pending.size:
            return np.zeros(0, dtype=bool)
        tail = np.zeros(self.config.frame_samples, dtype=np.float32)
        tail[: self._pending.size] = self._pending
        self._pending = np.zeros(0, dtype=np.float32)
        return self._decide(frame_energy_dbfs(tail, self.config.frame_samples))

    def _decide(self, energy_dbfs: np.ndarray) -> np.ndarray:
        c = self.config
        out = np.zeros(energy_dbfs.size, dtype=bool)
        for i, e in enumerate(energy_dbfs.tolist()):
            # 1. noise floor: running minimum over the window (monotonic deque)
            frame = self.frames_done + i
            while self._recent and self._recent[-1][1] >= e:
                self._recent.pop()
            self._recent.append((frame, e))
            if self._recent[0][0] <= frame - c.floor_window_frames:
                self._recent.popleft()
            self._floor = self._recent[0][1]
            on = max(self._floor + c.on_margin_db, c.min_speech_dbfs)
            off = max(self._floor + c.off_margin_db, c.min_speech_dbfs - (c.on_margin_db - c.off_margin_db))
            # 2. gate with hysteresis and hangover
            if not self._speech:
                if e > on:
                    self._speech, self._below = True, 0
            elif e < off:
                self._below += 1
                if self._below > c.hangover_frames:
                    self._speech = False
            else:
                self._below = 0
            out[i] = self._speech
        self.frames_done += energy_dbfs.size
        return out


def detect_speech(wav16k: np.ndarray, config: VadConfig | None = None) -> np.ndarray:
    """Offline VAD: one bool per 20 ms frame, ``ceil(len / frame)`` frames (last one zero-padded)."""
    vad = VoiceActivityDetector(config)
    return np.concatenate([vad.push(wav16k), vad.flush()])


def speech_segments(decisions: np.ndarray, frame_ms: int = 20) -> list[tuple[int, int]]:
    """Runs of True in per-frame decisions -> ``[(start_ms, end_ms), ...]``."""
    d = np.asarray(decisions, dtype=bool).astype(np.int8)
    edges = np.diff(np.concatenate([[0], d, [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [(int(s) * frame_ms, int(e) * frame_ms) for s, e in zip(starts, ends, strict=True)]


def silence_segments(decisions: np.ndarray, frame_ms: int = 20) -> list[tuple[int, int]]:
    """Runs of False (pauses) -> ``[(start_ms, end_ms), ...]``."""
    return speech_segments(~np.asarray(decisions, dtype=bool), frame_ms)
