"""Avatar frames -> H.264 + AAC in a container, through PyAV; mp4 files written atomically.

    with Mp4FileSink("out/talk.mp4") as sink:      # nothing appears at out/talk.mp4 until close()
        for frame in frames:                       # AvatarFrame: one video frame + its 1/fps of audio
            sink.write(frame)
    # close(): flush both encoders, finish the file (moov first: faststart), fsync, rename into place.
    # An exception inside the block calls abort(): the temporary file goes, the final path is untouched.

Sync comes from the frames: video pts = frame pts - first pts (so the file starts at 0) in 1/fps units,
audio pts = samples written so far in 1/sample_rate units, and every frame carries exactly its own
audio. A gap in frame pts (frames dropped upstream) is filled with silence so the audio stays aligned
with the video that follows it. PyAV converts RGB to yuv420p and re-chunks audio into AAC frames.

`AvSink` is container-agnostic (the broadcaster can open it on an RTMP/FLV or HLS target with its own
options); `Mp4FileSink` adds the temporary file and the rename. This module never imports torch.
"""

from __future__ import annotations

import os
import socket
from fractions import Fraction
from pathlib import Path
from typing import Protocol

import av
import numpy as np

from avatar.types import AvatarFrame, frame_sample_bounds

PARTIAL_SUFFIX = ".partial"  # temporary files: .<final name>.<host>-<pid>.partial, beside the final path
DEFAULT_VIDEO_OPTIONS = {"crf": "18", "preset": "medium"}  # libx264: visually lossless for talking heads
DEFAULT_AUDIO_BIT_RATE = 128_000


class MediaSink(Protocol):
    """Where a session's frames go (file, RTMP, HLS). `close` finishes the output; `abort` discards it."""

    def write(self, frame: AvatarFrame) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class AvSink:
    """H.264 (libx264, yuv420p) + AAC into any PyAV container target. Streams open on the first frame,
    which fixes the picture size (padded to even dimensions), the frame rate and the audio rate."""

    def __init__(self, target: str | Path, *, format: str, container_options: dict[str, str] | None = None,
                 video_options: dict[str, str] | None = None, audio_bit_rate: int = DEFAULT_AUDIO_BIT_RATE,
                 video_bit_rate: int | None = None, audio_layout: str = "mono") -> None:
        self.target = str(target)
        self.format = format
        self.container_options = dict(container_options or {})
        self.video_options = dict(DEFAULT_VIDEO_OPTIONS if video_options is None else video_options)
        self.audio_bit_rate = audio_bit_rate
        self.video_bit_rate = video_bit_rate  # None: quality-driven (crf in video_options); else bits/s
        self.audio_layout = audio_layout  # of the AAC track; the mono frames are up-mixed by the encoder
        self.frames_written = 0
        self.samples_written = 0
        self.bytes_written = 0  # muxed packet payload, both streams (bitrate estimates)
        self._container: av.container.OutputContainer | None = None
        self._video: av.VideoStream | None = None
        self._audio: av.AudioStream | None = None
        self._first_pts: int | None = None
        self._last_pts: int | None = None
        self._size_hw: tuple[int, int] | None = None  # of the incoming frames
        self._pad_hw = (0, 0)  # rows / columns added at the bottom / right for even dimensions
        self._fps = 0
        self._rate = 0
        self._closed = False

    # ---- writing --------------------------------------------------------------------------------
    def write(self, frame: AvatarFrame) -> None:
        if self._closed:
            raise RuntimeError(f"{self.target}: sink already closed")
        if self._container is None:
            self._open(frame)
        self._check(frame)
        assert self._first_pts is not None and self._video is not None and self._audio is not None
        pts = frame.pts - self._first_pts  # the file starts at 0 whatever the session's first pts was
        # 1. video: RGB in; the encoder's reformatter converts to yuv420p
        image = frame.video
        if any(self._pad_hw):
            image = np.pad(image, ((0, self._pad_hw[0]), (0, self._pad_hw[1]), (0, 0)), mode="edge")
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        vf.pts, vf.time_base = pts, Fraction(1, self._fps)
        self._mux(self._video.encode(vf))
        # 2. audio: silence for frames that never came (pts gap), then this frame's own samples
        start, _ = frame_sample_bounds(pts, self._rate, self._fps)
        if start > self.samples_written:
            self._write_audio(np.zeros(start - self.samples_written, np.float32))
        self._write_audio(np.asarray(frame.audio, dtype=np.float32))
        self.frames_written += 1
        self._last_pts = frame.pts

    def _write_audio(self, pcm: np.ndarray) -> None:
        if pcm.size == 0:
            return
        af = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm)[None, :], format="flt", layout="mono")
        af.sample_rate, af.pts, af.time_base = self._rate, self.samples_written, Fraction(1, self._rate)
        self._mux(self._audio.encode(af))  # the encoder re-chunks into 1024-sample AAC frames
        self.samples_written += pcm.size

    def _mux(self, packets) -> None:
        for packet in packets:
            self.bytes_written += packet.size
            self._container.mux(packet)

    def _open(self, frame: AvatarFrame) -> None:
        if frame.video.ndim != 3 or frame.video.shape[2] != 3 or frame.video.dtype != np.uint8:
            raise ValueError(f"{self.target}: video must be (H, W, 3) uint8 RGB, got {frame.video.shape} "
                             f"{frame.video.dtype}")
        h, w = frame.video.shape[:2]
        self._size_hw, self._pad_hw = (h, w), (h % 2, w % 2)  # yuv420p needs even dimensions
        self._fps, self._rate, self._first_pts = frame.fps, frame.sample_rate, frame.pts
        try:
            self._container = av.open(self.target, mode="w", format=self.format, options=self.container_options)
        except (av.error.FFmpegError, OSError) as err:
            raise OSError(f"cannot open {self.target!r} for writing ({self.format}): {err}") from None
        video = self._container.add_stream("libx264", rate=frame.fps, options=self.video_options)
        video.width, video.height, video.pix_fmt = w + self._pad_hw[1], h + self._pad_hw[0], "yuv420p"
        if self.video_bit_rate is not None:
            video.bit_rate = self.video_bit_rate
        audio = self._container.add_stream("aac", rate=frame.sample_rate, layout=self.audio_layout)
        audio.bit_rate = self.audio_bit_rate
        self._video, self._audio = video, audio

    def _check(self, frame: AvatarFrame) -> None:
        if frame.video.shape[:2] != self._size_hw:
            raise ValueError(f"{self.target}: frame {frame.pts} is {frame.video.shape[:2]}, the stream {self._size_hw}")
        if frame.sample_rate != self._rate or frame.fps != self._fps:
            raise ValueError(f"{self.target}: frame {frame.pts} has {frame.sample_rate} Hz / {frame.fps} fps, "
                             f"the stream {self._rate} Hz / {self._fps} fps")
        if self._last_pts is not None and frame.pts <= self._last_pts:
            raise ValueError(f"{self.target}: frame pts must increase ({frame.pts} after {self._last_pts})")
        if frame.audio.ndim != 1:
            raise ValueError(f"{self.target}: frame audio must be mono (samples,), got {frame.audio.shape}")

    # ---- finishing ------------------------------------------------------------------------------
    def close(self) -> None:
        """Flush both encoders and finish the container. Raises if no frame was written."""
        if self._closed:
            return
        if self._container is None:
            self._closed = True
            raise ValueError(f"{self.target}: no frames were written")
        self._mux(self._video.encode(None))
        self._mux(self._audio.encode(None))
        self._container.close()  # writes the trailer (with faststart: moves the index to the front)
        self._closed = True

    def abort(self) -> None:
        """Stop without finishing; errors while tearing down are ignored (the output is discarded)."""
        if self._container is not None and not self._closed:
            try:
                self._container.close()
            except (av.error.FFmpegError, OSError, ValueError):
                pass
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class Mp4FileSink(AvSink):
    """An mp4 file that exists at `path` complete or not at all: written to a temporary file in the same
    directory (same filesystem, so the rename is atomic), fsynced, then renamed over `path`."""

    def __init__(self, path: str | Path, *, video_options: dict[str, str] | None = None,
                 audio_bit_rate: int = DEFAULT_AUDIO_BIT_RATE) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"output directory {str(self.path.parent)!r} does not exist")
        self.temp_path = partial_path(self.path)
        super().__init__(self.temp_path, format="mp4", container_options={"movflags": "+faststart"},
                         video_options=video_options, audio_bit_rate=audio_bit_rate)

    def close(self) -> None:
        if self._closed:
            return
        try:
            super().close()
            fsync_path(self.temp_path)
            os.replace(self.temp_path, self.path)
            fsync_path(self.path.parent)
        except BaseException:
            self.temp_path.unlink(missing_ok=True)
            raise

    def abort(self) -> None:
        super().abort()
        self.temp_path.unlink(missing_ok=True)


def partial_path(final: Path) -> Path:
    """The temporary name for `final` owned by this process (host and pid in the name, for cleanup)."""
    return final.with_name(f".{final.name}.{socket.gethostname()}-{os.getpid()}{PARTIAL_SUFFIX}")


def remove_stale_partials(final: str | Path) -> list[Path]:
    """Delete temporary files of `final` left by processes on this host that no longer run (a killed
    render). Files of live processes and of other hosts (shared storage) are left alone."""
    final, host = Path(final), socket.gethostname()
    removed = []
    for p in final.parent.glob(f".{final.name}.*{PARTIAL_SUFFIX}"):
        owner = p.name[len(final.name) + 2:-len(PARTIAL_SUFFIX)]  # "<host>-<pid>"
        owner_host, _, pid = owner.rpartition("-")
        if owner_host == host and pid.isdigit() and not _alive(int(pid)):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries (a rename or a new file in it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def probe_media(path: str | Path) -> dict:
    """What a written file holds, read back with PyAV: container, per-stream codec, start and duration
    (seconds), decoded video frame count and size, and the decoded audio as mono float32."""
    with av.open(str(path)) as container:
        info: dict = {"format": container.format.name, "streams": {},
                      "duration_s": container.duration / 1e6 if container.duration is not None else None}
        for s in container.streams:
            info["streams"][s.type] = {
                "codec": s.codec_context.name, "time_base": s.time_base,
                "start_s": float(s.start_time * s.time_base) if s.start_time is not None else None,
                "duration_s": float(s.duration * s.time_base) if s.duration else None,
            }
        video_pts, audio, first_audio = [], [], None
        for frame in container.decode(*[s for s in container.streams if s.type in ("video", "audio")]):
            if isinstance(frame, av.VideoFrame):
                video_pts.append(float(frame.time))
                info.setdefault("video_size", (frame.height, frame.width, frame.format.name))
            else:
                first_audio = float(frame.time) if first_audio is None else first_audio
                info["audio_rate"] = frame.sample_rate
                pcm = frame.to_ndarray()  # (channels, n) planar or (1, n * channels) packed
                audio.append(pcm.mean(axis=0) if frame.format.is_planar else pcm.reshape(-1))
    info["video_frames"] = len(video_pts)
    info["first_video_s"] = min(video_pts) if video_pts else None
    info["first_audio_s"] = first_audio
    info["audio"] = np.concatenate(audio).astype(np.float32) if audio else np.zeros(0, np.float32)
    return info
