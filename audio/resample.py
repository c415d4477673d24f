"""Down-mix and resample any PCM (8-96 kHz, any channel count, int16 / float, planar or interleaved)
to the model's 16 kHz mono float32, one stateful resampler per stream.

Resampling is libsoxr's (the ``soxr`` package, already installed as a librosa dependency). Its stream
output is delay-compensated: output sample ``n`` is the signal at time ``n / 16000`` s, exactly as the
one-shot ``soxr.resample`` computes it, so chunked output equals one-shot output sample for sample
(offset 0). The price is latency: soxr holds back a variable amount of output until enough input has
arrived to filter it (``pending_output_samples``; at 48 kHz "HQ" with 20 ms input frames it stays
under ~37 ms, at 8 kHz under ~115 ms). ``flush()`` releases the tail.

Down-mixing is the mean of the channels (for stereo, ``(L + R) / 2``). Non-finite samples are replaced
(NaN -> 0, +-inf -> +-1) and counted in ``nonfinite_samples``: this is the boundary that repairs live
input, so that one bad packet never takes down a session.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import soxr

from audio.pcm import MODEL_SAMPLE_RATE, check_sample_rate, sanitize, to_float32

Layout = Literal["interleaved", "planar"]
Quality = Literal["QQ", "LQ", "MQ", "HQ", "VHQ"]


@dataclass(frozen=True)
class PcmFormat:
    """How a stream's PCM chunks are laid out.

    ``interleaved`` (packed): frames of ``channels`` consecutive values; arrays may be ``(N, C)``, flat
    ``(N * C,)`` or PyAV's packed ``(1, N * C)``. ``planar``: ``(C, N)``. Mono may be any of these.
    """

    sample_rate: int
    channels: int = 1
    layout: Layout = "interleaved"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sample_rate", check_sample_rate(self.sample_rate))
        if isinstance(self.channels, bool) or int(self.channels) != self.channels or self.channels < 1:
            raise ValueError(f"channels must be a positive integer, got {self.channels!r}")
        if self.layout not in ("interleaved", "planar"):
            raise ValueError(f"layout must be 'interleaved' or 'planar', got {self.layout!r}")


def downmix(pcm: np.ndarray, fmt: PcmFormat) -> tuple[np.ndarray, int]:
    """One chunk of PCM in ``fmt`` -> (mono float32 at ``fmt.sample_rate``, non-finite samples replaced)."""
    x = np.asarray(pcm)
    if x.size == 0:
        return np.zeros(0, dtype=np.float32), 0
    c = fmt.channels
    if fmt.layout == "planar" and c > 1:
        if x.ndim != 2 or x.shape[0] != c:
            raise ValueError(f"planar {c}-channel PCM must have shape ({c}, num_samples), got {x.shape}")
        frames = x.T
    else:
        if x.ndim > 2 or (x.ndim == 2 and x.shape[-1] != c and x.shape[0] != 1):
            raise ValueError(
                f"interleaved {c}-channel PCM must have shape (num_samples, {c}), (num_samples*{c},) or "
                f"(1, num_samples*{c}); got {x.shape}"
            )
        flat = x.reshape(-1)
        if flat.size % c:
            raise ValueError(
                f"interleaved chunk of {flat.size} values is not a whole number of {c}-channel samples"
            )
        frames = flat.reshape(-1, c)
    mono = to_float32(frames, name="pcm")
    mono, bad = sanitize(mono)
    mono = mono[:, 0] if c == 1 else mono.mean(axis=1, dtype=np.float32)
    return np.ascontiguousarray(mono, dtype=np.float32), bad


def pcm_from_av_frame(frame: Any) -> tuple[np.ndarray, PcmFormat]:
    """Unpack a PyAV ``AudioFrame`` (e.g. from aiortc: s16, packed stereo, 48 kHz) -> (array, format)."""
    fmt = PcmFormat(
        sample_rate=frame.sample_rate,
        channels=frame.layout.nb_channels,
        layout="planar" if frame.format.is_planar else "interleaved",
    )
    return frame.to_ndarray(), fmt


class StreamResampler:
    """Stateful per-stream down-mixer + resampler to 16 kHz mono float32.

    ``process(chunk)`` accepts chunks of any size (empty and one-sample chunks included) and returns
    whatever output is ready; ``flush()`` ends the stream and returns the tail. Passing a different
    ``fmt`` to ``process`` (the sender changed rate or channels) flushes the old stream first.
    """

    def __init__(self, fmt: PcmFormat, *, out_rate: int = MODEL_SAMPLE_RATE, quality: Quality = "HQ"):
        self.out_rate = int(out_rate)
        self.quality: Quality = quality
        self.nonfinite_samples = 0  # replaced NaN / inf input samples
        self.input_samples = 0  # per channel, at the input rate(s)
        self.output_samples = 0
        self._fmt = fmt
        self._stream = self._open(fmt)

    def _open(self, fmt: PcmFormat) -> soxr.ResampleStream | None:
        if fmt.sample_rate == self.out_rate:
            return None  # pass-through, zero delay
        return soxr.ResampleStream(fmt.sample_rate, self.out_rate, 1, dtype="float32", quality=self.quality)

    @property
    def fmt(self) -> PcmFormat:
        return self._fmt

    @property
    def pending_output_samples(self) -> float:
        """Output samples (at ``out_rate``) held back by the filter; the current latency."""
        return 0.0 if self._stream is None else float(self._stream.delay())

    def process(self, pcm: np.ndarray, fmt: PcmFormat | None = None) -> np.ndarray:
        """Down-mix and resample one chunk; returns the 16 kHz mono float32 output now available."""
        head = np.zeros(0, dtype=np.float32)
        if fmt is not None and fmt != self._fmt:
            head = self.flush()
            self._fmt = fmt
            self._stream = self._open(fmt)
        mono, bad = downmix(pcm, self._fmt)
        self.nonfinite_samples += bad
        self.input_samples += mono.size
        out = mono if self._stream is None else self._stream.resample_chunk(mono, last=False)
        return self._emit(np.concatenate([head, out]) if head.size else out)

    def flush(self) -> np.ndarray:
        """Emit the held-back tail and reset, ready for a new stream of the same format."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        tail = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self._stream = self._open(self._fmt)
        return self._emit(tail)

    def reset(self) -> None:
        """Drop held-back samples without emitting them (barge-in)."""
        self._stream = self._open(self._fmt)

    def _emit(self, out: np.ndarray) -> np.ndarray:
        out = np.asarray(out, dtype=np.float32)
        self.output_samples += out.size
        return out


def resample_audio(pcm: np.ndarray, fmt: PcmFormat, *, out_rate: int = MODEL_SAMPLE_RATE,
                   quality: Quality = "HQ") -> np.ndarray:
    """One-shot down-mix + resample of a whole signal (same math as ``StreamResampler``).

    Raises ValueError on non-finite samples: offline input is expected to be clean.
    """
    mono, bad = downmix(pcm, fmt)
    if bad:
        raise ValueError(f"{bad} samples are NaN or infinite; clean them with audio.pcm.sanitize first")
    if fmt.sample_rate == out_rate or mono.size == 0:
        return mono
    return np.asarray(soxr.resample(mono, fmt.sample_rate, out_rate, quality=quality), dtype=np.float32)
