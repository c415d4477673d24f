"""A session's audio timeline: the PCM that goes out with the frames, and the features that drive them.

Each speaker has a `SpeakerTrack`: pushed PCM is converted once to the session's output rate (a
pass-through when the rates match, so outgoing audio is the incoming audio, sample for sample) and kept
on a `PcmTimeline` addressed by absolute sample index; the same samples, resampled to 16 kHz, feed the
audio front end's feature stream, whose frame k is the session's video frame `feature_origin + k`.
Silence inserted to keep video flowing (idle, end of segment) is recorded, so frames know they are idle.
"""

from __future__ import annotations

import numpy as np

from audio.features.base import AudioFeatures
from audio.pcm import MODEL_SAMPLE_RATE, SAMPLES_PER_VIDEO_FRAME
from audio.resample import PcmFormat, StreamResampler


class PcmTimeline:
    """Mono float32 samples by absolute index; bounded (oldest dropped and counted).

    Storage is one array with spare room at its end: appending a 20 ms packet copies the packet, not
    the whole buffer (the live server appends 50 packets a second per call)."""

    def __init__(self, max_samples: int) -> None:
        self.max_samples = max_samples
        self.start = 0  # absolute index of buf[0]
        self._store = np.zeros(0, np.float32)
        self._lo = self._hi = 0  # the live samples are _store[_lo:_hi]
        self.dropped = 0
        self.padding: list[list[int]] = []  # [start, end) ranges of inserted silence, merged

    @property
    def buf(self) -> np.ndarray:
        return self._store[self._lo:self._hi]

    @property
    def end(self) -> int:
        return self.start + (self._hi - self._lo)

    def append(self, x: np.ndarray, padding: bool = False) -> None:
        if not x.size:
            return
        if padding:
            if self.padding and self.padding[-1][1] == self.end:
                self.padding[-1][1] += x.size
            else:
                self.padding.append([self.end, self.end + x.size])
        n = self._hi - self._lo
        if self._hi + x.size > self._store.size:  # no room at the end: compact, growing if needed
            store = np.empty(max(2 * (n + x.size), 4096), np.float32)
            store[:n] = self._store[self._lo:self._hi]
            self._store, self._lo, self._hi = store, 0, n
        self._store[self._hi:self._hi + x.size] = x
        self._hi += x.size
        over = self._hi - self._lo - self.max_samples
        if over > 0:  # drop oldest: a consumer this far behind has lost that audio anyway
            self.dropped += over
            self.trim(self.start + over)

    def take(self, a: int, b: int) -> np.ndarray:
        """Samples [a, b); zeros where the timeline has nothing (dropped or not yet pushed)."""
        out = np.zeros(b - a, np.float32)
        lo, hi = max(a, self.start), min(b, self.end)
        if hi > lo:
            out[lo - a:hi - a] = self.buf[lo - self.start:hi - self.start]
        return out

    def is_padding(self, a: int, b: int) -> bool:
        return any(s <= a and b <= e for s, e in self.padding)

    def trim(self, before: int) -> None:
        """Forget samples before `before` (consumed)."""
        cut = min(max(0, before - self.start), self._hi - self._lo)
        if cut:
            self._lo += cut
            self.start += cut
        self.padding = [[max(s, self.start), e] for s, e in self.padding if e > self.start]

    def truncate(self, end: int) -> int:
        """Drop samples at and after `end` (barge-in); returns how many were dropped."""
        keep = max(0, end - self.start)
        dropped = max(0, (self._hi - self._lo) - keep)
        self._hi = min(self._hi, self._lo + keep)
        self.padding = [[s, min(e, end)] for s, e in self.padding if s < end]
        return dropped


class SpeakerTrack:
    """One speaker's audio: output-rate timeline + 16 kHz feature stream."""

    def __init__(self, features: AudioFeatures, out_rate: int, fps: int, max_seconds: float) -> None:
        self.features = features
        self.out_rate, self.fps = out_rate, fps
        self.timeline = PcmTimeline(int(max_seconds * out_rate))
        self._to_out: StreamResampler | None = None
        self._to_16k = StreamResampler(PcmFormat(out_rate), out_rate=MODEL_SAMPLE_RATE)
        self._restart_features(0)

    def _restart_features(self, video_frame: int) -> None:
        self.stream = self.features.stream()
        self.feature_origin = video_frame  # session video frame of the stream's frame 0
        self.feats = np.zeros((0, self.features.feature_dim), np.float32)
        self.feat_base = video_frame  # session video frame of feats[0]

    # ---- input -----------------------------------------------------------------------------------
    def push(self, pcm: np.ndarray, fmt: PcmFormat) -> int:
        """Convert to the output rate and append. Returns non-finite samples replaced."""
        if self._to_out is None or self._to_out.fmt != fmt:
            self._to_out = StreamResampler(fmt, out_rate=self.out_rate)
        before = self._to_out.nonfinite_samples
        x = self._to_out.process(pcm)
        self._append(x, padding=False)
        return self._to_out.nonfinite_samples - before

    def pad(self, num_samples: int) -> None:
        """Insert silence at the end (idle video, or completing the last block of a segment)."""
        self._append(np.zeros(max(0, num_samples), np.float32), padding=True)

    def _append(self, x: np.ndarray, padding: bool) -> None:
        self.timeline.append(x, padding=padding)
        new = self.stream.push(self._to_16k.process(x))
        if new.size:
            self.feats = np.concatenate([self.feats, new])

    # ---- output ----------------------------------------------------------------------------------
    @property
    def features_ready(self) -> int:
        """Session video frames [.., features_ready) whose features exist."""
        return self.feat_base + self.feats.shape[0]

    def samples_for_features(self, video_end: int) -> int:
        """Output-rate samples the timeline must reach for the features of frames < video_end."""
        need_16k = (video_end - self.feature_origin) * SAMPLES_PER_VIDEO_FRAME + self.stream.timing.lookahead_samples
        delay = self._to_16k.pending_output_samples
        return self._origin_sample() + -(-int((need_16k + delay) * self.out_rate) // MODEL_SAMPLE_RATE)

    def take_features(self, v0: int, v1: int) -> np.ndarray:
        """(v1 - v0, D) features of session video frames [v0, v1)."""
        if v0 < self.feat_base or v1 > self.features_ready:
            raise RuntimeError(f"features for frames [{v0}, {v1}) not available "
                               f"(have [{self.feat_base}, {self.features_ready}))")
        return self.feats[v0 - self.feat_base:v1 - self.feat_base]

    def consumed(self, video_frame: int) -> None:
        """Frames before `video_frame` are out: drop their features and audio."""
        cut = video_frame - self.feat_base
        if cut > 0:
            self.feats = self.feats[cut:]
            self.feat_base = video_frame
        self.timeline.trim(video_frame * self.out_rate // self.fps)

    def truncate_at(self, video_frame: int) -> int:
        """Barge-in: drop everything from `video_frame` on and restart the feature stream there."""
        boundary = video_frame * self.out_rate // self.fps
        dropped = self.timeline.truncate(boundary)
        if self.timeline.end < boundary:  # audio had not reached the cut yet: keep the clock aligned
            self.timeline.append(np.zeros(boundary - self.timeline.end, np.float32), padding=True)
        self._to_16k.reset()
        if self._to_out is not None:
            self._to_out.reset()
        self._restart_features(video_frame)
        return dropped

    def _origin_sample(self) -> int:
        return self.feature_origin * self.out_rate // self.fps
