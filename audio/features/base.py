"""The one interface every audio front end implements, and the windowed streaming machinery.

A front end turns 16 kHz mono audio into one feature vector per 25 fps video frame:

    fe(wav16k, num_video_frames) -> (T_video, D) float32          # offline
    stream = fe.stream(); stream.push(samples) -> (n_new, D)      # live, any chunk size
    stream.flush(num_video_frames=None) -> (n_rest, D)            # end of audio

Video frame ``f`` owns samples ``[640 f, 640 (f + 1))``. Streaming is defined by a window: the
features of a chunk of ``chunk_frames`` frames starting at frame ``f0`` are a function of the samples
``[640 f0 - left_context, 640 (f0 + chunk_frames) + lookahead)`` alone (zeros before the start of the
stream and after its end). The chunk grid starts at frame 0. ``window_features`` computes exactly the
same thing for a whole clip at once, so streaming == offline by construction, and the test suite
checks it numerically. A stream emits a chunk as soon as its lookahead has arrived; its worst-case
wait after the end of a frame's own audio is ``StreamTiming.max_wait_ms``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from audio.buffer import OverflowPolicy, PcmBuffer
from audio.pcm import (
    MODEL_SAMPLE_RATE,
    SAMPLES_PER_VIDEO_FRAME,
    VIDEO_FRAME_MS,
    as_mono_float32,
    check_num_video_frames,
)

_F = SAMPLES_PER_VIDEO_FRAME
_MAX_BATCH_FRAMES = 1024  # frame-independent front ends encode at most this many frames per call


@dataclass(frozen=True)
class StreamTiming:
    """How much audio a front end's streaming form needs around the frames it emits."""

    left_context_samples: int  # before the first frame of a chunk
    lookahead_samples: int  # after the last frame of a chunk
    chunk_frames: int  # frames computed together (1 = each frame as soon as its lookahead arrives)

    @property
    def left_context_ms(self) -> float:
        return 1000.0 * self.left_context_samples / MODEL_SAMPLE_RATE

    @property
    def lookahead_ms(self) -> float:
        return 1000.0 * self.lookahead_samples / MODEL_SAMPLE_RATE

    @property
    def max_wait_ms(self) -> float:
        """Longest time from the end of a frame's audio until its features can be computed:
        the first frame of a chunk waits for the rest of the chunk plus the lookahead."""
        return (self.chunk_frames - 1) * VIDEO_FRAME_MS + self.lookahead_ms

    def window_bounds(self, first_frame: int, num_frames: int) -> tuple[int, int]:
        """Absolute sample range ``[start, stop)`` the frames ``[first_frame, first_frame + n)`` need."""
        return (first_frame * _F - self.left_context_samples,
                (first_frame + num_frames) * _F + self.lookahead_samples)


class AudioFeatures(ABC):
    """A front end: offline ``__call__`` and a streaming form with bounded lookahead."""

    feature_dim: int
    timing: StreamTiming
    # True when each frame depends only on its own window, so any number of frames may be encoded in
    # one call; False: the encoder runs on the fixed chunk grid, one chunk per call.
    frames_independent: bool = False
    lead_samples: int = 0  # every window this much later than its frame: for a model trained to hear audio early

    @property
    def lookahead_ms(self) -> float:
        return self.timing.lookahead_ms

    def __call__(self, wav16k: np.ndarray, num_video_frames: int | None = None) -> np.ndarray:
        """Offline features ``(num_video_frames, feature_dim)`` float32 (default: ceil(len / 640))."""
        return self.window_features(wav16k, num_video_frames)

    def window_features(self, wav16k: np.ndarray, num_video_frames: int | None = None) -> np.ndarray:
        """Exactly what ``stream()`` emits for this audio, computed in one pass."""
        wav = as_mono_float32(wav16k, name="wav16k")
        t = check_num_video_frames(num_video_frames, wav.size)
        pcm = PcmBuffer(max(wav.size, 1))
        pcm.append(wav)
        return _run_chunks(self, pcm, 0, t, stream_end=wav.size)

    def stream(self) -> FeatureStream:
        """A new streaming state (weights are shared; each stream holds only its own audio)."""
        return FeatureStream(self)

    # ---- what a front end implements ---------------------------------------------------------------

    @abstractmethod
    def _encode_window(self, window: np.ndarray, first_frame: int, num_frames: int,
                       valid: tuple[int, int]) -> np.ndarray:
        """Features ``(num_frames, D)`` for frames ``[first_frame, first_frame + num_frames)`` from
        ``window`` = samples ``timing.window_bounds(first_frame, num_frames)``; ``valid`` is the part
        of the window (offsets into it) holding real audio rather than zero fill.

        With ``frames_independent`` the caller batches any number of frames into one call, so each
        frame's result must not depend on ``num_frames`` (bit for bit, for exact streaming); otherwise
        ``num_frames == timing.chunk_frames`` always."""


def _run_chunks(fe: AudioFeatures, pcm: PcmBuffer, first_frame: int, stop_frame: int,
                stream_end: int) -> np.ndarray:
    """Encode frames ``[first_frame, stop_frame)`` on the chunk grid (``first_frame`` on it)."""
    timing = fe.timing
    out = []
    f0 = first_frame
    while f0 < stop_frame:
        n = min(stop_frame - f0, _MAX_BATCH_FRAMES) if fe.frames_independent else timing.chunk_frames
        start, stop = timing.window_bounds(f0, n)
        window = pcm.read(start, stop)
        valid = (max(0, -start), min(stop, stream_end) - start)
        feats = fe._encode_window(window, f0, n, valid)
        out.append(feats[: stop_frame - f0])
        f0 += n
    if not out:
        return np.zeros((0, fe.feature_dim), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


class FeatureStream:
    """Streaming state of one audio stream for one front end.

    ``push`` accepts any number of samples (0 and 1 included) and returns the features of every frame
    whose window is now complete; memory stays bounded (left context + one chunk + lookahead + one
    piece of input). A stream is driven by one thread at a time (the engine's).
    """

    def __init__(self, fe: AudioFeatures, *, piece_samples: int = 4 * _F):
        self.fe = fe
        self.timing = fe.timing
        self._piece = max(piece_samples, self.timing.chunk_frames * _F)
        capacity = self.timing.left_context_samples + self.timing.chunk_frames * _F \
            + self.timing.lookahead_samples + self._piece + _F
        self._pcm = PcmBuffer(capacity, policy=OverflowPolicy.RAISE)  # sized so it never overflows
        self.frames_emitted = 0
        self._flushed = False

    @property
    def samples_received(self) -> int:
        return self._pcm.end

    @property
    def lookahead_ms(self) -> float:
        return self.timing.lookahead_ms

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Feed 16 kHz mono samples; return ``(n_new, D)`` features for the frames now complete."""
        if self._flushed:
            raise RuntimeError("push() after flush(); open a new stream for new audio")
        x = as_mono_float32(samples, name="FeatureStream.push")
        out = []
        for i in range(0, x.size, self._piece):
            self._pcm.append(x[i:i + self._piece])
            out.append(self._emit_ready())
        if not out:
            return np.zeros((0, self.fe.feature_dim), dtype=np.float32)
        return np.concatenate(out)

    def _emit_ready(self) -> np.ndarray:
        t = self.timing
        end = self._pcm.end
        ready = (end - t.lookahead_samples) // _F  # frames whose lookahead has fully arrived
        stop = self.frames_emitted + max(0, ready - self.frames_emitted) // t.chunk_frames * t.chunk_frames
        if stop <= self.frames_emitted:
            return np.zeros((0, self.fe.feature_dim), dtype=np.float32)
        feats = _run_chunks(self.fe, self._pcm, self.frames_emitted, stop, stream_end=end)
        self.frames_emitted = stop
        self._pcm.trim(stop * _F - t.left_context_samples)
        return feats

    def flush(self, num_video_frames: int | None = None) -> np.ndarray:
        """End of audio: emit the remaining frames (default: up to ceil(samples / 640)), their lookahead
        zero-filled. Frames beyond ``num_video_frames`` already emitted are not taken back."""
        self._flushed = True
        end = self._pcm.end
        t_total = check_num_video_frames(num_video_frames, end)
        if t_total <= self.frames_emitted:
            return np.zeros((0, self.fe.feature_dim), dtype=np.float32)
        feats = _run_chunks(self.fe, self._pcm, self.frames_emitted, t_total, stream_end=end)
        self.frames_emitted = t_total
        return feats
