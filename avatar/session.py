"""One avatar session: the public contract (event-loop side) and its per-block work (engine side).

Event-loop side, never blocking: `push_audio`, `end_segment`, `interrupt`, `close`, `async for`.
Engine side: `ready` / `deadline` for scheduling, `generate` (the worker thread: the next block of
audio into latents) and `finish` (the decode thread, or the worker itself: latents into frames, out).
The sides share a lock around the audio timeline and a thread-safe hand-off of finished items into an
asyncio queue. Silence is inserted here and nowhere else: a live (`realtime`) session tops its input
up as the wall clock moves (`_top_up`), so idle frames keep coming without audio (before the first
push, while a caller is paused, across network stalls) and speech that resumes lands at its own time;
a block whose audio is later than `jitter_ms`, and a segment's last block, are completed with silence.
Bounds, and what happens at them:
- input audio: `max_buffered_audio_s` per speaker; beyond it the oldest samples are dropped (counted);
- output: at `max_pending_frames` unsent frames the session is not scheduled (generation pauses;
  nothing is computed only to be thrown away);
- lateness (live, causal generation): a block due more than `max_lag_s` ago is held instead of generated
  (`hold`): its frames repeat the last frame, with all of their audio, at a fraction of a block's cost
  (counted as `held_frames`). An engine that cannot keep up shows fewer fresh frames, never a growing delay.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from audio.align import group_by_latent, video_frames_for_block
from audio.pcm import MEDIA_SAMPLE_RATE
from audio.resample import PcmFormat
from avatar.decoder import FrameDecoder, first_latent_samples, opens_moving
from avatar.generator import Conditions, Unit
from avatar.timeline import SpeakerTrack
from avatar.types import (AvatarFrame, SegmentEnd, SessionError, SessionItem, SessionStats, Timing,
                          frame_sample_bounds)

_CLOSED = object()
TOP_UP_PERIOD_S = 0.02  # how often a live session checks whether its input lags the wall clock


@dataclass(frozen=True)
class SessionOptions:
    sample_rate: int | None = None  # output audio rate; default: the rate of the first push
    realtime: bool = True  # live: insert silence when audio is late, so video never stops
    jitter_ms: float = 120.0  # how late live audio may be before silence completes its block instead
    max_buffered_audio_s: float = 60.0
    max_pending_frames: int = 50
    speakers: int = 1  # >1: one audio stream and one FAA face mask per speaker
    seed: int = 0
    max_lag_s: float | None = 1.5  # live: hold blocks due longer ago than this (None: never; a block is
    # generated once its audio is in, ~0.3-0.7 s after its first frame's time, so this is the delay a
    # caller can be left behind by before the avatar gives up fresh frames to catch up)


class GeneratedUnit(NamedTuple):
    """Latents on their way to the decoder, with what `finish` needs to emit their frames."""

    session: AvatarSession
    latents: torch.Tensor
    first_video: int  # pts of the unit's first frame
    epoch: int
    features_ms: float
    denoise_ms: float
    started: float  # perf_counter at the start of `generate`
    wait_ms: float  # the unit's audio arriving (TakenUnit.wait_ms)
    held_frames: int = 0  # > 0: a held unit (`hold`): that many frames repeat the last one, nothing to decode


class TakenUnit(NamedTuple):
    """A unit's audio, taken off the timeline, waiting for its latents (generated alone or in a batch)."""

    audio: torch.Tensor | None  # (1, n, 4, D) per latent frame
    face_audio: torch.Tensor | None  # (1, speakers, n, 4, D)
    face_activity: torch.Tensor | None  # (1, speakers, n): voice activity per latent (several speakers)
    first_video: int
    epoch: int
    features_ms: float
    started: float
    wait_ms: float  # its first output sample arriving -> the last sample its features need arriving


class AvatarSession:
    """Audio in, paired video+audio frames out, for as long as the session lives."""

    def __init__(self, session_id: str, generator, cond: Conditions, decoder: FrameDecoder,
                 features, fps: int, options: SessionOptions, loop: asyncio.AbstractEventLoop,
                 wake=lambda: None) -> None:
        self.id = session_id
        self.generator, self.cond, self.decoder, self.features = generator, cond, decoder, features
        self.fps, self.options = fps, options
        self.stats = SessionStats()
        self._loop = loop
        self._wake = wake  # tells the engine there may be work
        self._queue: asyncio.Queue = asyncio.Queue()
        self._lock = threading.RLock()
        self._pending = 0  # items posted and not yet taken by the consumer
        self._epoch = 0  # bumped by interrupt(): older items are dropped on the way out
        self._taken_to = 0  # end video frame of the last block whose audio generation took
        self._closed = False
        self._failed: str | None = None
        self.t0 = time.monotonic()  # audio clock anchor: sample k is due at t0 + k / rate
        self.out_rate: int | None = options.sample_rate
        self.tracks: list[SpeakerTrack] = []
        self._segment = 0
        self._segment_ends: deque[tuple[int, int]] = deque()  # (segment, end sample at out rate)
        self._flush_to = 0  # non-realtime: generate until this output sample is covered
        self._arrivals: deque[tuple[int, float]] = deque(maxlen=512)  # (end sample, wall time) per push
        self.state = generator.init_state(cond, seed=options.seed)  # CausalState or OverlapState
        self.next_video = 0  # next video frame to emit (its pts); generation may be one block ahead
        self._last_latent: torch.Tensor | None = None  # the worker's: what `hold` repeats
        self._last_frame: np.ndarray | None = None  # the decoding thread's: what a held unit shows
        self._opening: GeneratedUnit | None = None  # the decoding thread's: the reference alone, waiting
        # for the first generated latent to open the decoder at (`_decode`)
        if options.realtime:
            self._call_in_loop(self._top_up)

    # ---- event-loop side ----------------------------------------------------------------------
    def push_audio(self, pcm: np.ndarray, sample_rate: int, speaker: int = 0, channels: int = 1,
                   layout: str = "interleaved") -> None:
        """Append audio (any size, int16 or float, any rate 8-96 kHz). Never blocks on generation."""
        if self._closed:
            raise RuntimeError(f"session {self.id} is closed")
        if not 0 <= speaker < self.options.speakers:
            raise ValueError(f"speaker {speaker} outside 0..{self.options.speakers - 1}")
        fmt = PcmFormat(sample_rate, channels, layout)  # validates the rate (8-96 kHz)
        with self._lock:
            self._ensure_tracks(sample_rate)
            track = self.tracks[speaker]
            before = track.pcm.dropped
            self.stats.nonfinite_input_samples += track.push(pcm, fmt)
            self.stats.dropped_input_samples += track.pcm.dropped - before
            self._arrivals.append((track.pcm.end, time.monotonic()))
        self._wake()

    def end_segment(self) -> None:
        """Mark the end of a speech turn; a SegmentEnd follows the frame that carries its last sample."""
        with self._lock:
            end = max((t.pcm.end for t in self.tracks), default=0)
            self._segment_ends.append((self._segment, end))
            self._segment += 1
            self._flush_to = max(self._flush_to, end)
        self._wake()

    def interrupt(self) -> None:
        """Barge-in: drop queued audio and every unsent frame now."""
        with self._lock:
            # cut after the blocks already generated or in flight (their frames are dropped by the
            # epoch), so audio pushed from here on lands exactly where generation resumes
            cut = self._taken_to
            for t in self.tracks:
                self.stats.dropped_input_samples += t.truncate_at(cut)
            self._count_silence()
            self._epoch += 1
            self._segment_ends.clear()
            self._flush_to = 0
        while not self._queue.empty():
            item = self._queue.get_nowait()
            self._took(item)
            if item is _CLOSED:  # keep the end-of-stream marker
                self._queue.put_nowait(item)
                break
            self.stats.dropped_frames += isinstance(item[1], AvatarFrame)
        self._wake()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._call_in_loop(self._queue.put_nowait, _CLOSED)
            self._wake()

    def _call_in_loop(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the consumer's loop is gone: nobody is left to read
            pass

    def _top_up(self) -> None:
        """Live, on the event loop every TOP_UP_PERIOD_S: every speaker's input that lags the wall clock
        by more than half of `jitter_ms` is topped up with silence to there. Done as the clock moves, not
        a block at a time when a block falls due, so audio arriving after a gap (a pause, a stall)
        continues from the present; and half the allowance behind it, so that audio reaches each block
        before the block falls due (at the whole allowance) and is never cut by the silence completing it."""
        if self._closed:
            return
        with self._lock:
            self._ensure_tracks(self.options.sample_rate or MEDIA_SAMPLE_RATE)
            due = int((time.monotonic() - self.t0 - self.options.jitter_ms / 2000) * self.out_rate)
            late = [t for t in self.tracks if due > t.pcm.end]
            for t in late:
                t.pad(due - t.pcm.end)
            if late:
                self._count_silence()
        if late:
            self._wake()
        self._loop.call_later(TOP_UP_PERIOD_S, self._top_up)

    @property
    def closed(self) -> bool:
        return self._closed

    def __aiter__(self):
        return self

    async def __anext__(self) -> SessionItem:
        while True:
            item = await self._queue.get()
            self._took(item)
            if item is _CLOSED:
                self._queue.put_nowait(_CLOSED)  # later readers see the end too
                raise StopAsyncIteration
            epoch, payload = item
            if epoch == self._epoch or isinstance(payload, SessionError):
                return payload
            self.stats.dropped_frames += isinstance(payload, AvatarFrame)

    def _took(self, item) -> None:
        if item is not _CLOSED:
            with self._lock:
                self._pending -= 1

    # ---- engine side --------------------------------------------------------------------------
    def _ensure_tracks(self, rate: int) -> None:
        if self.tracks:
            return
        self.out_rate = self.out_rate or rate
        self.tracks = [SpeakerTrack(self.features, self.out_rate, self.fps, self.options.max_buffered_audio_s,
                                    detect_voice=self.options.speakers > 1)
                       for _ in range(self.options.speakers)]

    def next_span(self) -> tuple[Unit, range, range]:
        """The generator's next unit, the video frames it outputs, the video frames whose audio it needs."""
        unit: Unit = self.generator.next_unit(self.state)
        out = video_frames_for_block(unit.first, unit.count)
        need = video_frames_for_block(unit.audio_first, unit.audio_count)
        return unit, out, need

    def _needed_samples(self, video_end: int) -> int:
        return max(t.samples_for_features(video_end) for t in self.tracks)

    def ready(self, now: float) -> bool:
        if self._closed or self._failed is not None or self._pending >= self.options.max_pending_frames:
            return False
        with self._lock:
            if not self.tracks:
                if not self.options.realtime:
                    return False
                self._ensure_tracks(self.options.sample_rate or MEDIA_SAMPLE_RATE)
            v_end = self.next_span()[2].stop
            if all(t.features_ready >= v_end for t in self.tracks):
                return True
            if self.options.realtime:
                due = self.t0 + self._needed_samples(v_end) / self.out_rate + self.options.jitter_ms / 1000
                return now >= due
            return self._flush_to > self._taken_to * self.out_rate // self.fps

    def _count_silence(self) -> None:
        if self.tracks:
            self.stats.silence_inserted_s = max(t.silence_samples for t in self.tracks) / self.out_rate

    def deadline(self) -> float:
        """When this session's next block to generate is due on the wall clock (earliest first)."""
        return self.t0 + self._taken_to / self.fps

    def must_hold(self, now: float) -> bool:
        """A live session whose next block is due more than `max_lag_s` ago, and that can hold it."""
        lag = self.options.max_lag_s
        return (self.options.realtime and lag is not None and now - self.deadline() > lag
                and self._last_latent is not None and hasattr(self.generator, "hold_block"))

    def fail(self, message: str) -> None:
        self._failed = message
        self._post(SessionError(message))
        self.close()

    def _post(self, payload) -> None:
        with self._lock:
            self._pending += 1
            item = (self._epoch, payload)
        self._call_in_loop(self._queue.put_nowait, item)

    def step(self) -> None:
        """Generate, decode and emit the next unit, in this thread."""
        self.finish(self.generate())

    @torch.no_grad()
    def generate(self) -> GeneratedUnit:
        """Steps 1-4: the next unit's latents. Runs on the engine's worker thread."""
        taken = self.take_unit()
        t_gen = time.perf_counter()
        # 4. generate the latents (a batching engine runs this step for several sessions at once)
        latents = self.generator.generate_unit(self.state, taken.audio, taken.face_audio, taken.face_activity)
        return self.generated(taken, latents, (time.perf_counter() - t_gen) * 1e3)

    @torch.no_grad()
    def hold(self) -> GeneratedUnit:
        """Steps 1-3, then the held block instead of step 4 (`must_hold`): the audio is taken off the
        timeline as for a generated block, so frames and audio stay in step and none of it is lost."""
        taken = self.take_unit()
        t_gen = time.perf_counter()
        latents = self.generator.hold_block(self.state, self._last_latent, taken.audio, taken.face_audio)
        unit = self.generated(taken, latents, (time.perf_counter() - t_gen) * 1e3)
        return unit._replace(held_frames=self._taken_to - taken.first_video)

    def take_unit(self) -> TakenUnit:
        """Steps 1-3: take the next unit's audio off the timeline, as the generator's input tensors."""
        t_start = time.perf_counter()
        with self._lock:
            # 1. the unit: new latents -> video frames `out`; audio needed for video frames `need`
            unit, out, need = self.next_span()
            v0 = out.start
            self._taken_to = out.stop
            # 2. make sure the unit's features exist (silence pads late live audio / a segment's tail)
            for _ in range(16):
                if all(t.features_ready >= need.stop for t in self.tracks):
                    break
                target = self._needed_samples(need.stop)
                for t in self.tracks:  # at least one frame: a resampler may hold small pads back
                    t.pad(max(target - t.pcm.end, self.out_rate // self.fps))
            self._count_silence()
            feats = [t.take_features(need.start, need.stop) for t in self.tracks]
            activity = self._face_activity(unit)
            epoch = self._epoch
            wait_ms = self._wait_ms(v0, self._needed_samples(need.stop))
        # 3. features -> (1, n, 4, D) per latent frame (latent 0: video frame 0 replicated)
        audio, face_audio = self._audio_tensors(feats, unit.audio_first)
        return TakenUnit(audio, face_audio, activity, v0, epoch, (time.perf_counter() - t_start) * 1e3, t_start,
                         wait_ms)

    def _face_activity(self, unit: Unit) -> torch.Tensor | None:
        """(1, speakers, n) voice activity of each speaker over each latent the unit's audio covers, for
        face-aware guidance (`Guidance.quiet_audio_scale`); None with one speaker."""
        if len(self.tracks) < 2:
            return None
        act = np.stack([t.voice_activity(unit.audio_first, unit.audio_count) for t in self.tracks])
        return torch.from_numpy(act)[None]

    def _wait_ms(self, first_video: int, needed: int) -> float:
        """How long the unit waited for its audio: its first output sample arriving (pushed, or silence
        inserted) on any track -> the last sample its features need arriving on every track. Live speech
        waits about the unit's duration + the features' lookahead; audio pushed ahead waits ~0."""
        first = frame_sample_bounds(first_video, self.out_rate, self.fps)[0]
        firsts = [t.arrived_at(first) for t in self.tracks]
        lasts = [t.arrived_at(min(needed, t.pcm.end) - 1) for t in self.tracks]
        if None in firsts or None in lasts:  # not expected: the audio is on the timeline until consumed
            return 0.0
        return max(0.0, (max(lasts) - min(firsts)) * 1e3)

    def generated(self, taken: TakenUnit, latents: torch.Tensor, denoise_ms: float) -> GeneratedUnit:
        """Step 4's latents, on their way to `finish`."""
        self._last_latent = latents[:, :, -1:]
        return GeneratedUnit(self, latents, taken.first_video, taken.epoch, taken.features_ms, denoise_ms,
                             taken.started, taken.wait_ms)

    @torch.no_grad()
    def finish(self, unit: GeneratedUnit) -> None:
        """Steps 5-6 of a unit from `generate`, units in order: decode, pair frames with audio, emit."""
        t_dec0 = time.perf_counter()
        if self.decoder.latents_decoded == 0 and unit.first_video == 0 and unit.latents.shape[2] == 1 \
                and not unit.held_frames:
            self._opening = unit  # the reference alone (causal): frame 0 waits for the first generated latent
            self.decoder.settle(unit.latents)  # meanwhile the decoder settles on the reference (per avatar)
            return
        if self._opening is not None and unit.held_frames:  # nothing generated yet: the settled reference
            opening, self._opening = self._opening, None
            self._emit(self.decoder.open_still(), 0, opening.epoch, wait_ms=opening.wait_ms,
                       features_ms=opening.features_ms, denoise_ms=opening.denoise_ms)
        if unit.held_frames:  # 5'. a held unit repeats the last frame; its latents never reach the decoder,
            # whose caches stay at that frame. Not a block: the stage figures stay those of generated ones
            video = np.repeat(self._last_frame[None], unit.held_frames, axis=0)
            self._emit(video, unit.first_video, unit.epoch, held=True, wait_ms=unit.wait_ms,
                       features_ms=unit.features_ms, denoise_ms=unit.denoise_ms)
            self.stats.held_frames += unit.held_frames
            return
        # 5. decode to frames (the decoder's causal caches follow the units in order)
        video, opening = self._decode(unit)
        t_dec = time.perf_counter()
        decode_ms = (t_dec - t_dec0) * 1e3
        # 6. pair every frame with its audio and hand it out
        timing = dict(wait_ms=unit.wait_ms, features_ms=unit.features_ms, denoise_ms=unit.denoise_ms,
                      decode_ms=decode_ms)
        if opening is not None:  # frame 0 keeps its own unit's epoch: an interrupt since then drops it
            self._emit(video[:1], 0, opening.epoch, **timing)
            video = video[1:]
        self._emit(video, unit.first_video, unit.epoch, **timing)
        for name, ms in (("wait", unit.wait_ms), ("features", unit.features_ms), ("denoise", unit.denoise_ms),
                         ("decode", decode_ms), ("block", (t_dec - unit.started) * 1e3)):
            self.stats.stage_ms[name].append(ms)
        self.stats.blocks += 1

    def _decode(self, unit: GeneratedUnit) -> tuple[np.ndarray, GeneratedUnit | None]:
        """Step 5: `unit`'s frames, and the reference-only unit whose frame 0 leads them, if any. The first
        generated latent opens the decoder (`FrameDecoder.open_at`) and gives frame 0 in place of the
        reference latent's: the reference still conditions generation (the KV cache's sink), only the
        pixels of frame 0 change, and it is emitted with the first block instead of before it. Where
        speech starts in latent 1 (`_speaks_at_once`), frame 0 is the reference the decoder settled on and
        latent 1 decodes from it like any other latent."""
        latents, opening = unit.latents, None
        if self._opening is not None:  # causal: the reference came alone; this block starts at latent 1
            opening, self._opening = self._opening, None
            if self._speaks_at_once():  # frame 0 the settled reference, latent 1 moving from it
                return np.concatenate([self.decoder.open_still(), self.decoder.decode(latents)]), opening
        elif self.decoder.latents_decoded == 0 and unit.first_video == 0 and latents.shape[2] > 1:
            latents = latents[:, :, 1:]  # chunked generators: the first chunk starts with the reference
        else:
            return self.decoder.decode(latents), None
        frame0 = self.decoder.open_at(latents[:, :, :1])
        return np.concatenate([frame0, self.decoder.decode(latents)]), opening

    def _speaks_at_once(self) -> bool:
        """Latent 1's audio makes this stream open moving (`avatar.decoder.opens_moving`): held, speech
        that starts there froze for 200 ms (lip sync r 0.37-0.48 on a held-out clip whose speech starts
        80 ms in, 0.77-0.79 without its first 5 frames)."""
        span = first_latent_samples(self.out_rate, self.fps)
        with self._lock:
            return opens_moving([t.pcm.read(span.start, span.stop) for t in self.tracks], self.cond.faces)

    def _audio_tensors(self, feats: list[np.ndarray], start_latent: int):
        dev = self.generator.dit.device
        grouped = [torch.from_numpy(np.ascontiguousarray(group_by_latent(f, start_latent))) for f in feats]
        main = grouped[0] if len(grouped) == 1 else torch.stack(grouped).mean(0)  # mixed speakers drive Audio Pack
        audio = main[None].to(dev) if self.generator.dit.cfg.audio_dim else None
        face = None
        if self.cond.face_mask is not None and self.generator.dit.cfg.faa_layers:
            face = torch.stack(grouped)[None].to(dev)  # (1, speakers, n, 4, D)
        return audio, face

    def _emit(self, video: np.ndarray, v0: int, epoch: int, held: bool = False, **timing_ms) -> None:
        now = time.monotonic()
        with self._lock:
            for i, img in enumerate(video):
                v = v0 + i
                a, b = frame_sample_bounds(v, self.out_rate, self.fps)
                pcm = self.tracks[0].pcm.read(a, b)
                for t in self.tracks[1:]:
                    pcm = pcm + t.pcm.read(a, b)
                idle = all(t.pcm.is_padding(a, b) for t in self.tracks)
                arrived = next((w for e, w in self._arrivals if e >= b), None)
                timing = Timing(emit_ms=(now - arrived) * 1e3 if arrived else 0.0, **timing_ms)
                frame = AvatarFrame(video=img, audio=np.clip(pcm, -1, 1) if len(self.tracks) > 1 else pcm,
                                    sample_rate=self.out_rate, pts=v, fps=self.fps, segment=self._segment_of(b),
                                    idle=idle, held=held, timing=timing)
                if epoch == self._epoch:
                    self._post(frame)
                self.stats.frames += 1
                self.stats.idle_frames += idle
                while self._segment_ends and self._segment_ends[0][1] <= b:
                    seg, _ = self._segment_ends.popleft()
                    if epoch == self._epoch:
                        self._post(SegmentEnd(segment=seg, pts=v))
            self.next_video = v0 + len(video)
            self._last_frame = video[-1]
            keep = self.generator.history_latents  # an overlap prefix needs its audio again
            next_first = self.generator.next_unit(self.state).first
            keep_from = video_frames_for_block(max(0, next_first - keep), 1).start if keep else self.next_video
            for t in self.tracks:
                t.consumed(min(keep_from, self.next_video))

    def _segment_of(self, sample_end: int) -> int:
        return self._segment_ends[0][0] if self._segment_ends else self._segment
