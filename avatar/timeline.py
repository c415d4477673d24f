"""A session's audio timeline: the PCM that goes out with the frames, and the features that drive them.

Each speaker has a `SpeakerTrack`: pushed PCM is converted once to the session's output rate (a
pass-through when the rates match, so outgoing audio is the incoming audio, sample for sample) and kept
in a `PcmBuffer` addressed by absolute sample index; the same samples, resampled to 16 kHz, feed the
audio front end's feature stream, whose frame k is the session's video frame `feature_origin + k`.
Silence inserted to keep video flowing (idle, end of segment) is marked as padding, so frames know they
are idle, and counted. When each sample reached the timeline (pushed or inserted) is kept while the
sample is, so a block can say how long it waited for its audio. The 16 kHz stream also passes a voice
activity detector, so a block knows which of several voices are speaking (`voice_activity`).
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from audio.align import video_frames_for_block
from audio.buffer import PcmBuffer
from audio.features.base import AudioFeatures
from audio.pcm import MODEL_SAMPLE_RATE, SAMPLES_PER_VIDEO_FRAME
from audio.resample import PcmFormat, StreamResampler
from audio.vad import VadConfig, VoiceActivityDetector

VAD_FRAMES_PER_VIDEO_FRAME = SAMPLES_PER_VIDEO_FRAME // VadConfig().frame_samples  # 2 (20 ms in 40 ms)


def voiced_frames(decisions: np.ndarray) -> np.ndarray:
    """16 kHz VAD decisions (one per 20 ms) -> one per complete video frame: speech in any of its 20 ms."""
    n = decisions.size // VAD_FRAMES_PER_VIDEO_FRAME * VAD_FRAMES_PER_VIDEO_FRAME
    return np.asarray(decisions[:n], bool).reshape(-1, VAD_FRAMES_PER_VIDEO_FRAME).any(1)


def latent_voice_activity(voiced: np.ndarray, first_latent: int, count: int, base: int = 0) -> np.ndarray:
    """(count,) share of each latent's video frames (`video_frames_for_block`) with speech; `voiced[k]` is
    video frame `base + k`, frames outside it count as silent."""
    out = np.zeros(count, np.float32)
    for i in range(count):
        frames = video_frames_for_block(first_latent + i, 1)
        a, b = max(frames.start - base, 0), max(frames.stop - base, 0)
        out[i] = voiced[a:b].sum() / len(frames)
    return out


class SpeakerTrack:
    """One speaker's audio: output-rate samples + 16 kHz feature stream."""

    def __init__(self, features: AudioFeatures, out_rate: int, fps: int, max_seconds: float,
                 detect_voice: bool = False) -> None:
        """`detect_voice`: run the voice activity detector (`voice_activity`; a session with several
        speakers needs it, one with a single voice does not)."""
        self.features = features
        self.detect_voice = detect_voice
        self.out_rate, self.fps = out_rate, fps
        self.pcm = PcmBuffer(int(max_seconds * out_rate))  # bounded: the oldest samples are dropped (counted)
        self.silence_samples = 0  # inserted by pad() and truncate_at(), at the output rate
        self._to_out: StreamResampler | None = None
        self._to_16k = StreamResampler(PcmFormat(out_rate), out_rate=MODEL_SAMPLE_RATE)
        # (pcm end after an append, time.monotonic()), trimmed with the audio; the bound only matters for a
        # caller pushing tiny chunks far ahead (80 s of 20 ms packets)
        self._arrivals: deque[tuple[int, float]] = deque(maxlen=4096)
        self._restart_features(0)

    def _restart_features(self, video_frame: int) -> None:
        self.stream = self.features.stream()
        self.feature_origin = video_frame  # session video frame of the stream's frame 0
        self.feats = np.zeros((0, self.features.feature_dim), np.float32)
        self.feat_base = video_frame  # session video frame of feats[0]
        self.vad = VoiceActivityDetector()  # on the 16 kHz stream, so its frames line up with the features'
        self._vad_pending = np.zeros(0, bool)  # decisions of a video frame not yet complete
        self.voiced = np.zeros(0, bool)  # per video frame from `voiced_base`: speech in any of its 20 ms
        self.voiced_base = video_frame

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
        n = max(0, num_samples)
        self.silence_samples += n
        self._append(np.zeros(n, np.float32), padding=True)

    def _append(self, x: np.ndarray, padding: bool) -> None:
        self.pcm.append(x, padding=padding)
        self._arrived()
        x16 = self._to_16k.process(x)
        new = self.stream.push(x16)
        if new.size:
            self.feats = np.concatenate([self.feats, new])
        if self.detect_voice:
            decisions = np.concatenate([self._vad_pending, self.vad.push(x16)])
            done = voiced_frames(decisions)
            if done.size:
                self.voiced = np.concatenate([self.voiced, done])
            self._vad_pending = decisions[done.size * VAD_FRAMES_PER_VIDEO_FRAME:]

    def _arrived(self) -> None:
        if self._arrivals and self._arrivals[-1][0] == self.pcm.end:
            return  # nothing appended (an empty push): keep the earlier time for those samples
        self._arrivals.append((self.pcm.end, time.monotonic()))

    def arrived_at(self, sample: int) -> float | None:
        """time.monotonic() when output-rate sample `sample` reached the timeline (None: not yet, or gone)."""
        for end, at in self._arrivals:  # oldest first; about one block's packets since `consumed` trimmed it
            if end > sample:
                return at
        return None

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

    def voice_activity(self, first_latent: int, count: int) -> np.ndarray:
        """(count,) share of each latent's video frames with speech (frames not yet heard: silent)."""
        if not self.detect_voice:
            raise RuntimeError("this track was made without voice detection (detect_voice=False)")
        return latent_voice_activity(self.voiced, first_latent, count, self.voiced_base)

    def consumed(self, video_frame: int) -> None:
        """Frames before `video_frame` are out: drop their features, voice activity and audio."""
        cut = video_frame - self.feat_base
        if cut > 0:
            self.feats = self.feats[cut:]
            self.feat_base = video_frame
        cut = video_frame - self.voiced_base
        if cut > 0:
            self.voiced = self.voiced[cut:]
            self.voiced_base = video_frame
        first_kept = video_frame * self.out_rate // self.fps
        self.pcm.trim(first_kept)
        while self._arrivals and self._arrivals[0][0] <= first_kept:  # no earlier sample is looked up again
            self._arrivals.popleft()

    def truncate_at(self, video_frame: int) -> int:
        """Barge-in: drop everything from `video_frame` on and restart the feature stream there."""
        boundary = video_frame * self.out_rate // self.fps
        dropped = self.pcm.truncate(boundary)
        if self.pcm.end < boundary:  # audio had not reached the cut yet: keep the clock aligned
            gap = boundary - self.pcm.end  # (the feature stream restarts at the cut: it needs none of it)
            self.pcm.append(np.zeros(gap, np.float32), padding=True)
            self.silence_samples += gap
        while self._arrivals and self._arrivals[-1][0] > boundary:  # those samples are gone; new ones come
            self._arrivals.pop()
        self._arrived()
        self._to_16k.reset()
        if self._to_out is not None:
            self._to_out.reset()
        self._restart_features(video_frame)
        return dropped

    def _origin_sample(self) -> int:
        return self.feature_origin * self.out_rate // self.fps
