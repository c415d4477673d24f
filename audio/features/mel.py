"""Built-in log-mel front end: no weights, exact streaming. Used by the embedded demo model.

Per video frame (640 samples) it takes the four 10 ms hops inside the frame; hop ``k`` is analysed by
a 25 ms Hann window centred on the middle of the hop, i.e. samples ``[160 k - 120, 160 k + 280)``.
Power spectrum -> librosa's Slaney mel filterbank (the one Whisper uses) -> ``log10`` (floored) ->
mean over the four hops -> ``(x + 4) / 4`` (Whisper's scaling, without its per-clip clamp, which would
make a frame depend on the whole clip). So video frame ``f`` depends on samples
``[640 f - 120, 640 f + 760)`` only: 7.5 ms of left context and 7.5 ms of lookahead. With
``lead_samples`` every window moves that much later (a model that hears its audio early: frame ``f``
gets the features of samples ``[640 f - 120 + lead, 640 f + 760 + lead)``), and the lookahead grows by it.

Streaming equals offline bit for bit: every frame is computed by the same row-wise FFT and a
per-frame stacked matmul whatever the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from audio.features.base import AudioFeatures, StreamTiming
from audio.pcm import MODEL_SAMPLE_RATE, SAMPLES_PER_VIDEO_FRAME


@dataclass(frozen=True)
class MelConfig:
    n_mels: int = 80
    n_fft: int = 400  # 25 ms analysis window
    hop_samples: int = 160  # 10 ms; must divide the 640-sample video frame
    fmin_hz: float = 0.0
    fmax_hz: float = 8000.0
    log_floor: float = 1e-8  # power floor before log10
    lead_samples: int = 0  # analysis windows this much later than the frame (see the module docstring)

    def __post_init__(self) -> None:
        if self.hop_samples <= 0 or SAMPLES_PER_VIDEO_FRAME % self.hop_samples:
            raise ValueError(f"hop_samples={self.hop_samples} must divide {SAMPLES_PER_VIDEO_FRAME}")
        if self.n_fft < self.hop_samples or (self.n_fft - self.hop_samples) % 2:
            raise ValueError("n_fft must be >= hop_samples and differ from it by an even number")
        if not 0 <= self.fmin_hz < self.fmax_hz <= MODEL_SAMPLE_RATE / 2:
            raise ValueError(f"need 0 <= fmin_hz < fmax_hz <= {MODEL_SAMPLE_RATE // 2}")
        if self.n_mels < 1:
            raise ValueError("n_mels must be >= 1")
        if self.lead_samples < 0:
            raise ValueError(f"lead_samples must be >= 0, got {self.lead_samples}")

    @property
    def hops_per_video_frame(self) -> int:
        return SAMPLES_PER_VIDEO_FRAME // self.hop_samples

    @property
    def context_samples(self) -> int:
        """Samples each side of a frame the centred analysis windows reach (120 by default)."""
        return (self.n_fft - self.hop_samples) // 2


MEL_SILENCE = (math.log10(MelConfig.log_floor) + 4.0) / 4.0  # every band of an all-zero frame (default floor)


class MelFeatures(AudioFeatures):
    """Log-mel per video frame: ``(T_video, n_mels)`` float32, roughly in [-1, 1.5]."""

    frames_independent = True

    def __init__(self, config: MelConfig | None = None):
        import librosa  # only the filterbank and window come from librosa

        self.config = c = config or MelConfig()
        self.feature_dim = c.n_mels
        self.lead_samples = c.lead_samples
        self.timing = StreamTiming(c.context_samples, c.context_samples + c.lead_samples, chunk_frames=1)
        self._window = librosa.filters.get_window("hann", c.n_fft, fftbins=True).astype(np.float32)
        fb = librosa.filters.mel(sr=MODEL_SAMPLE_RATE, n_fft=c.n_fft, n_mels=c.n_mels, fmin=c.fmin_hz,
                                 fmax=c.fmax_hz, htk=False, norm="slaney")
        self._mel_t = np.ascontiguousarray(fb.T, dtype=np.float32)  # (n_freq, n_mels)

    def _encode_window(self, window: np.ndarray, first_frame: int, num_frames: int,
                       valid: tuple[int, int]) -> np.ndarray:
        c = self.config
        hops = c.hops_per_video_frame
        # window = samples [640 f0 - ctx, 640 (f0 + n) + ctx + lead): past the lead, exactly 4n analysis
        # windows at hop 160
        frames = np.lib.stride_tricks.sliding_window_view(window[c.lead_samples:], c.n_fft)[:: c.hop_samples]
        frames = frames[: num_frames * hops] * self._window  # (4n, n_fft)
        spec = np.fft.rfft(frames, axis=-1)  # (4n, n_freq) complex64
        power = spec.real * spec.real + spec.imag * spec.imag
        mel = np.matmul(power.reshape(num_frames, hops, -1), self._mel_t)  # (n, 4, n_mels), per-frame gemm
        log_mel = np.log10(np.maximum(mel, np.float32(c.log_floor)))
        return ((log_mel.mean(axis=1) + 4.0) / 4.0).astype(np.float32)
