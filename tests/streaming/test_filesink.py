"""The mp4 sink: H.264 + AAC in sync from AvatarFrames, atomic on disk, read back with PyAV."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from avatar.types import AvatarFrame, frame_sample_bounds
from streaming.filesink import Mp4FileSink, partial_path, probe_media, remove_stale_partials

RATE, FPS = 48_000, 25


def _tone(seconds: float, rate: int = RATE) -> np.ndarray:
    """A rising chirp (200 Hz -> 2 kHz): never periodic, so the alignment below has one answer."""
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * (200 * t + 900 * t**2 / max(seconds, 1e-3))
    return (0.3 * np.sin(phase) * (0.6 + 0.4 * np.sin(2 * np.pi * 2 * t))).astype(np.float32)


def _frames(pcm: np.ndarray, hw=(32, 32), pts=None, rate: int = RATE):
    n = -(-pcm.size * FPS // rate)
    for i in (range(n) if pts is None else pts):
        a, b = frame_sample_bounds(i, rate, FPS)
        video = np.full((*hw, 3), (i * 7) % 256, np.uint8)
        video[: hw[0] // 2, :, 0] = 255 - video[0, 0, 0]  # some structure for the encoder
        yield AvatarFrame(video=video, audio=pcm[a:b], sample_rate=rate, pts=i, fps=FPS)


def _lag_and_corr(decoded: np.ndarray, ref: np.ndarray, max_lag: int = 2048) -> tuple[int, float]:
    """The shift of `decoded` against `ref` (AAC priming, if the container did not trim it) and the
    correlation after removing it."""
    seg = ref[: 4 * max_lag]
    scores = [np.dot(decoded[lag:lag + seg.size], seg) for lag in range(max_lag)]
    lag = int(np.argmax(scores))
    n = min(ref.size, decoded.size - lag)
    return lag, float(np.corrcoef(decoded[lag:lag + n], ref[:n])[0, 1])


def _top_level_boxes(path) -> list[str]:
    """ISO-BMFF top-level box types in file order (size: 32-bit, or 64-bit when the 32-bit size is 1)."""
    data, names, at = path.read_bytes(), [], 0
    while at + 8 <= len(data):
        size, kind = int.from_bytes(data[at:at + 4], "big"), data[at + 4:at + 8].decode("latin-1")
        if size == 1:
            size = int.from_bytes(data[at + 8:at + 16], "big")
        names.append(kind)
        at += size if size else len(data)
    return names


def test_mp4_has_h264_and_aac_in_sync_from_zero(tmp_path):
    pcm = _tone(2.01)  # not a whole number of frames
    path = tmp_path / "clip.mp4"
    with Mp4FileSink(path) as sink:
        for f in _frames(pcm):
            sink.write(f)
    info = probe_media(path)
    v, a = info["streams"]["video"], info["streams"]["audio"]
    assert (v["codec"], a["codec"]) == ("h264", "aac") and info["video_size"] == (32, 32, "yuv420p")
    assert info["video_frames"] == 51 and info["audio_rate"] == RATE
    assert v["start_s"] == a["start_s"] == 0 and info["first_video_s"] == info["first_audio_s"] == 0
    assert abs(v["duration_s"] - 51 / FPS) < 1e-6 and abs(a["duration_s"] - pcm.size / RATE) < 1 / FPS
    lag, corr = _lag_and_corr(info["audio"], pcm)
    assert lag <= 1 and corr >= 0.99  # the edit list trims the encoder's priming: no A/V offset
    boxes = _top_level_boxes(path)
    assert boxes.index("moov") < boxes.index("mdat")  # faststart: the index comes before the media
    assert list(tmp_path.iterdir()) == [path]  # the temporary file became the output


def test_odd_sizes_are_padded_to_even(tmp_path):
    path = tmp_path / "odd.mp4"
    with Mp4FileSink(path) as sink:
        for f in _frames(_tone(0.2), hw=(33, 31)):
            sink.write(f)
    info = probe_media(path)
    assert info["video_size"] == (34, 32, "yuv420p") and info["video_frames"] == 5


def test_a_pts_gap_is_filled_with_silence_so_later_audio_stays_aligned(tmp_path):
    pcm = _tone(0.8)  # 20 frames; frames 8..11 never arrive
    path = tmp_path / "gap.mp4"
    with Mp4FileSink(path) as sink:
        for f in _frames(pcm, pts=[*range(8), *range(12, 20)]):
            sink.write(f)
        assert sink.samples_written == pcm.size
    info = probe_media(path)
    assert info["video_frames"] == 16
    a, b = frame_sample_bounds(8, RATE, FPS)[0], frame_sample_bounds(12, RATE, FPS)[0]
    out = info["audio"]
    assert np.abs(out[a + 1200:b - 1200]).max() < 0.01  # silence where the frames were missing
    assert np.corrcoef(out[b + 1200:pcm.size - 1200], pcm[b + 1200:pcm.size - 1200])[0, 1] > 0.99


def test_abort_and_errors_leave_nothing_at_the_final_path(tmp_path):
    path = tmp_path / "never.mp4"
    sink = Mp4FileSink(path)
    frames = list(_frames(_tone(0.4)))
    for f in frames[:5]:
        sink.write(f)
    assert sink.temp_path.exists() and sink.temp_path.parent == tmp_path and sink.temp_path.name.startswith(".")
    sink.abort()
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(ValueError, match="is \\(16, 16\\)"):
        with Mp4FileSink(path) as sink:
            sink.write(frames[0])
            sink.write(next(_frames(_tone(0.04), hw=(16, 16), pts=[1])))  # size change mid-stream
    with pytest.raises(ValueError, match="pts must increase"):
        with Mp4FileSink(path) as sink:
            sink.write(frames[3])
            sink.write(frames[2])
    with pytest.raises(ValueError, match="no frames were written"):
        Mp4FileSink(path).close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Mp4FileSink(tmp_path / "missing" / "x.mp4")


def test_stale_partials_of_dead_processes_are_removed(tmp_path):
    final = tmp_path / "a.mp4"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = partial_path(final)
    theirs = mine.with_name(mine.name.replace(f"-{os.getpid()}.", f"-{dead.pid}."))
    other_host = mine.with_name(f".a.mp4.elsewhere-{dead.pid}.partial")
    for p in (mine, theirs, other_host):
        p.write_bytes(b"half an mp4")
    assert remove_stale_partials(final) == [theirs]
    assert mine.exists() and other_host.exists() and not theirs.exists()


def test_streaming_does_not_import_torch():
    code = "import sys, streaming.filesink; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
