"""Read an audio file of any format soundfile (libsndfile) or PyAV (FFmpeg) decodes -> 16 kHz mono.

soundfile is tried first (wav, flac, ogg/vorbis, mp3; exact and fast); anything it cannot open (m4a /
aac, opus in mp4, video containers) goes through PyAV. Every failure is an ``AudioReadError`` that
names the file and the reason.

Truncated files: a cut FLAC or AAC stream fails to decode (error). A cut WAV still declares its full
data size and a cut Ogg lacks its end-of-stream marker; both are reported as truncated (error) unless
``allow_truncated=True``, which returns what decodes. An MP3 header's length is only an estimate
(exact with a Xing/Info tag, a guess for VBR without one), so an MP3 that decodes short gives a
``RuntimeWarning`` and its audio rather than an error. Sample rates outside 8-96 kHz are refused.

Long files: ``audio_duration`` reads the length a file declares without decoding it, and
``stream_audio`` yields the same samples as ``read_audio`` block by block (memory bounded by one
block), stopping with an error once more than ``max_duration_s`` has decoded, since a header can
understate the length.
"""

from __future__ import annotations

import itertools
import os
import re
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from audio.pcm import MODEL_SAMPLE_RATE, check_sample_rate
from audio.resample import PcmFormat, StreamResampler, resample_audio


class AudioReadError(ValueError):
    """An audio file could not be read; ``path`` and ``reason`` say which and why (bad input: a ValueError)."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read audio from {self.path!r}: {reason}")


# libsndfile's header log marks a data chunk larger than the file as "data : 96000 (should be 47978)",
# and an Ogg stream cut short as "File ended unexpectedly without an End-Of-Stream flag set".
_WAV_SHORT_DATA = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_OGG_CUT = "ended unexpectedly"
_WAV_UNKNOWN_SIZES = {0, 0xFFFFFFFF, 0x7FFFFFFF}  # written by streaming tools that never seek back


def read_audio(path: str | Path, *, sample_rate: int = MODEL_SAMPLE_RATE, allow_truncated: bool = False) -> np.ndarray:
    """Decode ``path`` to mono float32 at ``sample_rate`` (16 kHz by default).

    Raises:
        AudioReadError: missing / empty / not audio / undecodable / truncated (see module doc).
    """
    p = _checked_file(path)
    check_sample_rate(sample_rate)
    try:
        return _read_soundfile(p, sample_rate, allow_truncated)
    except _NotForSoundfile as sf_err:
        return np.concatenate([np.zeros(0, np.float32), *_pyav_chunks(p, sample_rate, allow_truncated,
                                                                      sf_reason=str(sf_err))])


def stream_audio(path: str | Path, *, sample_rate: int = MODEL_SAMPLE_RATE, block_s: float = 1.0,
                 max_duration_s: float | None = None) -> Iterator[np.ndarray]:
    """``read_audio``'s samples (mono float32 at ``sample_rate``) in blocks of about ``block_s`` seconds.

    Raises:
        AudioReadError: as ``read_audio``; also once more than ``max_duration_s`` seconds have decoded.
    """
    p = _checked_file(path)
    check_sample_rate(sample_rate)
    limit = None if max_duration_s is None else int(max_duration_s * sample_rate) + 1
    produced = 0
    chunks = _soundfile_chunks(p, sample_rate, block_s)
    try:
        first = [next(chunks)]  # libsndfile decides on opening whether it reads this format
    except _NotForSoundfile as sf_err:
        chunks, first = _pyav_chunks(p, sample_rate, False, sf_reason=str(sf_err)), []
    for block in itertools.chain(first, chunks):
        produced += block.size
        if limit is not None and produced > limit:
            raise AudioReadError(p, f"longer than the {max_duration_s:g} s allowed")
        yield block


def audio_duration(path: str | Path) -> float | None:
    """The length in seconds the file's header or container declares, read without decoding the audio;
    None when it declares none (a raw stream). Only an estimate for some formats (MP3 without a Xing tag)."""
    import soundfile as sf

    p = _checked_file(path)
    try:
        info = sf.info(str(p))
        return info.frames / info.samplerate if info.samplerate > 0 else None
    except sf.LibsndfileError:
        pass
    import av

    try:
        with av.open(str(p)) as container:
            if container.duration is not None:
                return container.duration / 1e6
            audio = container.streams.audio
            if audio and audio[0].duration is not None and audio[0].time_base is not None:
                return float(audio[0].duration * audio[0].time_base)
    except (av.error.FFmpegError, EOFError, OSError) as err:
        raise AudioReadError(p, f"not a recognised audio file (FFmpeg: {_av_reason(err)})") from None
    return None


def _checked_file(path: str | Path) -> Path:
    """A readable, non-empty regular file (a FIFO or device is refused before anything opens it)."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise AudioReadError(p, "no such file") from None
    except (OSError, ValueError) as err:  # a name too long, a NUL byte, a loop of links
        raise AudioReadError(p, f"cannot be opened ({err})") from None
    if not stat.S_ISREG(st.st_mode):
        raise AudioReadError(p, "not a regular file")
    if not os.access(p, os.R_OK):
        raise AudioReadError(p, "permission denied")
    if st.st_size == 0:
        raise AudioReadError(p, "file is empty (0 bytes)")
    return p


class _NotForSoundfile(Exception):
    """libsndfile cannot open this format; try PyAV."""


def _read_soundfile(p: Path, sample_rate: int, allow_truncated: bool) -> np.ndarray:
    import soundfile as sf

    try:
        info = sf.info(str(p), verbose=True)
    except sf.LibsndfileError as err:
        raise _NotForSoundfile(f"libsndfile: {err.error_string}") from None
    try:
        data, rate = sf.read(str(p), dtype="float32", always_2d=True)
    except sf.LibsndfileError as err:
        raise AudioReadError(p, f"decoding failed ({info.format} {info.subtype}): {err.error_string}") from None
    except RuntimeError as err:  # older soundfile raises RuntimeError for decode errors
        raise AudioReadError(p, f"decoding failed ({info.format} {info.subtype}): {err}") from None
    if not allow_truncated:
        _check_complete(p, info, decoded_frames=data.shape[0])
    if data.size and not np.isfinite(data).all():
        raise AudioReadError(p, "file contains NaN or infinite samples")
    return resample_audio(data, _format(p, rate, data.shape[1], "interleaved"), out_rate=sample_rate)


def _soundfile_chunks(p: Path, sample_rate: int, block_s: float) -> Iterator[np.ndarray]:
    """libsndfile's blocks, resampled as they come (soxr's stream output equals its one-shot output)."""
    import soundfile as sf

    try:
        info = sf.info(str(p), verbose=True)
    except sf.LibsndfileError as err:
        raise _NotForSoundfile(f"libsndfile: {err.error_string}") from None
    if info.format == "MP3":  # libsndfile's MP3 reads glitch at every block boundary: FFmpeg streams it
        raise _NotForSoundfile("libsndfile reads MP3 only whole")
    try:
        f = sf.SoundFile(str(p))
    except sf.LibsndfileError as err:
        raise _NotForSoundfile(f"libsndfile: {err.error_string}") from None
    with f:
        fmt = _format(p, f.samplerate, f.channels, "interleaved")
        resampler, decoded = StreamResampler(fmt, out_rate=sample_rate), 0
        try:
            for block in f.blocks(blocksize=max(1, int(block_s * f.samplerate)), dtype="float32", always_2d=True):
                if block.size and not np.isfinite(block).all():
                    raise AudioReadError(p, "file contains NaN or infinite samples")
                decoded += block.shape[0]
                yield resampler.process(block)
        except (sf.LibsndfileError, RuntimeError) as err:
            reason = getattr(err, "error_string", None) or str(err)
            raise AudioReadError(p, f"decoding failed ({info.format} {info.subtype}): {reason}") from None
        _check_complete(p, info, decoded_frames=decoded)
        yield resampler.flush()


def _check_complete(p: Path, info, decoded_frames: int) -> None:
    short = _WAV_SHORT_DATA.search(info.extra_info or "")
    if short and int(short.group(1)) not in _WAV_UNKNOWN_SIZES and int(short.group(1)) > int(short.group(2)):
        raise AudioReadError(
            p, f"truncated: the header declares {short.group(1)} data bytes but only {short.group(2)} are "
            "present (pass allow_truncated=True to read what is there)"
        )
    if _OGG_CUT in (info.extra_info or ""):
        raise AudioReadError(p, f"truncated: the {info.format} stream ends without its end-of-stream marker "
                             f"({decoded_frames} frames decodable; pass allow_truncated=True to read them)")
    # MP3 (and other formats without an exact length) only estimate it in the header
    if info.frames > 0 and decoded_frames < info.frames - max(1, info.frames // 100):
        warnings.warn(
            f"{p}: the header estimates {info.frames} frames but only {decoded_frames} decode; the file "
            "may be truncated (pass allow_truncated=True to silence this)", RuntimeWarning, stacklevel=4,
        )


def _format(p: Path, sample_rate: int, channels: int, layout: str) -> PcmFormat:
    try:
        return PcmFormat(sample_rate=sample_rate, channels=channels, layout=layout)  # type: ignore[arg-type]
    except ValueError as err:
        raise AudioReadError(p, str(err)) from None


def _pyav_chunks(p: Path, sample_rate: int, allow_truncated: bool, *, sf_reason: str) -> Iterator[np.ndarray]:
    """What FFmpeg decodes, resampled frame by frame."""
    import av

    try:
        container = av.open(str(p))
    except (av.error.FFmpegError, EOFError, OSError) as err:
        raise AudioReadError(p, f"not a recognised audio file ({sf_reason}; FFmpeg: {_av_reason(err)})") from None
    with container:
        if not container.streams.audio:
            raise AudioReadError(p, "the file has no audio stream")
        stream = container.streams.audio[0]
        resampler: StreamResampler | None = None
        try:
            for frame in container.decode(stream):
                pcm = frame.to_ndarray()
                fmt = _format(p, frame.sample_rate, frame.layout.nb_channels,
                              "planar" if frame.format.is_planar else "interleaved")
                if resampler is None:
                    resampler = StreamResampler(fmt, out_rate=sample_rate)
                out = resampler.process(pcm, fmt)
                if resampler.nonfinite_samples:
                    raise AudioReadError(p, "file contains NaN or infinite samples")
                yield out
        except (av.error.FFmpegError, EOFError) as err:
            if not allow_truncated or resampler is None:
                done_s = 0.0 if resampler is None else resampler.output_samples / sample_rate
                raise AudioReadError(
                    p, f"decoding failed after {done_s:.2f} s: {_av_reason(err)} (truncated or corrupt?)"
                ) from None
        if resampler is not None:
            yield resampler.flush()


def _av_reason(err: Exception) -> str:
    return getattr(err, "strerror", None) or str(err)
