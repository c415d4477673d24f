"""read_audio: formats via soundfile and PyAV, resampling to 16 kHz mono, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audio.io import AudioReadError, audio_duration, read_audio, stream_audio
from audio.resample import PcmFormat, resample_audio


@pytest.fixture(scope="module")
def voice(speech) -> np.ndarray:
    return speech["speech_en_gb_female.wav"][: 16000 * 2]


def write_m4a(path: Path, wav: np.ndarray, rate: int) -> None:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray((wav[None] * 32767).astype(np.int16), format="s16", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def corr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak normalised cross-correlation (lossy codecs add a small delay)."""
    from scipy.signal import correlate

    c = correlate(a.astype(np.float64), b.astype(np.float64), mode="full", method="fft")
    return float(c.max() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def test_committed_fixture_reads_exactly(speech, audio_fixture_dir):
    wav = read_audio(audio_fixture_dir / "speech_en_us_male.wav")
    assert wav.dtype == np.float32
    np.testing.assert_array_equal(wav, speech["speech_en_us_male.wav"])


@pytest.mark.parametrize("ext, subtype, exact", [("wav", "PCM_16", True), ("wav", "FLOAT", True),
                                                 ("flac", "PCM_16", True), ("ogg", "VORBIS", False),
                                                 ("mp3", "MPEG_LAYER_III", False)])
def test_soundfile_formats_at_other_rates_and_channels(tmp_path, voice, ext, subtype, exact):
    rate = 44100
    up = resample_audio(voice, PcmFormat(16000), out_rate=rate)
    stereo = np.stack([up, up], axis=1)
    path = tmp_path / f"voice.{ext}"
    sf.write(str(path), stereo, rate, subtype=subtype)
    wav = read_audio(path)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(wav.size - voice.size) <= 1200  # codec padding at most
    if exact:  # lossless: exactly our resampler applied to what the file holds
        held, held_rate = sf.read(str(path), dtype="float32")
        np.testing.assert_allclose(wav, resample_audio(held, PcmFormat(held_rate, 2)), atol=1e-6)
    assert corr(wav, voice) > 0.95


def test_m4a_goes_through_pyav(tmp_path, voice):
    path = tmp_path / "voice.m4a"
    write_m4a(path, resample_audio(voice, PcmFormat(16000), out_rate=24000), 24000)
    wav = read_audio(path)
    assert abs(wav.size - voice.size) <= 2048
    assert corr(wav, voice) > 0.9


def test_8_channel_96k_int_wav(tmp_path):
    t = np.arange(96000) / 96000
    x = np.repeat((0.5 * np.sin(2 * np.pi * 300 * t))[:, None], 8, axis=1)
    path = tmp_path / "surround.wav"
    sf.write(str(path), x, 96000, subtype="PCM_24")
    wav = read_audio(path)
    assert wav.size == 16000
    np.testing.assert_allclose(wav[400:-400], 0.5 * np.sin(2 * np.pi * 300 * np.arange(16000) / 16000)[400:-400],
                               atol=2e-3)


def test_other_output_rate(tmp_path, voice):
    path = tmp_path / "v.wav"
    sf.write(str(path), voice, 16000)
    assert read_audio(path, sample_rate=48000).size == voice.size * 3


@pytest.mark.parametrize("content, reason", [
    (None, "no such file"),
    (b"", "empty"),
    (b"this is not audio at all " * 20, "not a recognised audio file"),
])
def test_unreadable_files_name_the_file_and_reason(tmp_path, content, reason):
    path = tmp_path / "broken.wav"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(AudioReadError, match=reason) as info:
        read_audio(path)
    assert str(path) in str(info.value) and info.value.path == str(path)


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(AudioReadError, match="not a regular file"):
        read_audio(tmp_path)


@pytest.mark.parametrize("ext, subtype", [("wav", "PCM_16"), ("flac", "PCM_16"), ("ogg", "VORBIS"),
                                          ("mp3", "MPEG_LAYER_III")])
def test_truncated_files(tmp_path, voice, ext, subtype):
    full = tmp_path / f"full.{ext}"
    sf.write(str(full), voice, 16000, subtype=subtype)
    data = full.read_bytes()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(data[: len(data) // 2])
    if ext == "mp3":  # the header length is an estimate: a warning, and the audio up to the cut
        with pytest.warns(RuntimeWarning, match="may be truncated"):
            prefix = read_audio(cut)
    else:
        with pytest.raises(AudioReadError) as info:
            read_audio(cut)
        assert str(cut) in str(info.value)
        assert "truncated" in info.value.reason or "failed" in info.value.reason
        if ext == "wav":  # decodes up to the cut; the prefix is available on request
            prefix = read_audio(cut, allow_truncated=True)
    if ext in ("wav", "mp3"):
        assert 0.3 * voice.size < prefix.size < 0.7 * voice.size


def test_truncated_m4a(tmp_path, voice):
    full = tmp_path / "full.m4a"
    write_m4a(full, voice, 16000)
    data = full.read_bytes()
    cut = tmp_path / "cut.m4a"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioReadError, match=r"cut\.m4a"):
        read_audio(cut)


def test_video_without_audio_stream(tmp_path):
    import av

    path = tmp_path / "silent_video.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    with pytest.raises(AudioReadError, match="no audio stream"):
        read_audio(path)


def test_nan_in_float_wav_is_an_error(tmp_path):
    x = np.zeros(1600, dtype=np.float32)
    x[10] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(str(path), x, 16000, subtype="FLOAT")
    with pytest.raises(AudioReadError, match="NaN"):
        read_audio(path)


def test_unsupported_rate_is_an_error(tmp_path):
    path = tmp_path / "hi.wav"
    sf.write(str(path), np.zeros(1920, dtype=np.float32), 192000)
    with pytest.raises(AudioReadError, match="192000 Hz is outside"):
        read_audio(path)


def test_vbr_mp3_without_length_tag_is_not_an_error(tmp_path, voice):
    """VBR MP3 without a Xing header: libsndfile over-estimates the length; the audio still reads."""
    import warnings

    import av

    path = tmp_path / "vbr.mp3"
    with av.open(str(path), "w", options={"write_xing": "0"}) as out:
        stream = out.add_stream("libmp3lame", rate=16000, layout="mono")
        stream.codec_context.flags |= 2  # AV_CODEC_FLAG_QSCALE: variable bit rate
        stream.codec_context.global_quality = 4 * 118
        frame = av.AudioFrame.from_ndarray((voice[None] * 32767).astype(np.int16), format="s16", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        wav = read_audio(path)
    assert abs(wav.size - voice.size) <= 2048 and corr(wav, voice) > 0.9


# ---- long files: the declared length, streamed decoding, a cap ------------------------------------------------
@pytest.mark.parametrize("ext, subtype", [("wav", "PCM_16"), ("flac", "PCM_16"), ("ogg", "VORBIS"),
                                          ("mp3", "MPEG_LAYER_III"), ("m4a", None)])
def test_stream_audio_yields_read_audios_samples_in_bounded_blocks(tmp_path, voice, ext, subtype):
    import warnings

    path = tmp_path / f"voice.{ext}"
    stereo_44k = resample_audio(voice, PcmFormat(16000), out_rate=44100)
    if subtype is None:
        write_m4a(path, stereo_44k, 44100)  # through PyAV
    else:
        sf.write(str(path), np.stack([stereo_44k, stereo_44k], axis=1), 44100, subtype=subtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an MP3's header length is an estimate
        whole = read_audio(path, sample_rate=48000)
        blocks = list(stream_audio(path, sample_rate=48000, block_s=0.25))
    if ext == "mp3":  # streamed by FFmpeg (libsndfile's block reads of MP3 glitch), read whole by libsndfile
        np.testing.assert_allclose(np.concatenate(blocks), whole, atol=1e-3)  # two decoders, one signal
    else:
        np.testing.assert_array_equal(np.concatenate(blocks), whole)
    assert len(blocks) >= 6 and max(b.size for b in blocks) <= 0.25 * 48000 + 4096  # one block (+ codec frame)


def test_stream_audio_stops_once_past_the_cap(tmp_path, voice):
    path = tmp_path / "six.wav"
    sf.write(str(path), np.tile(voice, 3), 16000)  # 6 s
    got = 0
    with pytest.raises(AudioReadError, match="longer than the 1.5 s allowed"):
        for block in stream_audio(path, block_s=0.5, max_duration_s=1.5):
            got += block.size
    assert got <= 1.5 * 16000  # stopped at the block that passed the cap, not at the end
    assert sum(b.size for b in stream_audio(path, max_duration_s=6.0)) == 6 * 16000  # exactly at the cap: fine


def test_audio_duration_reads_the_header_only(tmp_path, voice):
    wav, m4a = tmp_path / "v.wav", tmp_path / "v.m4a"
    sf.write(str(wav), voice, 16000)
    write_m4a(m4a, voice, 16000)
    assert audio_duration(wav) == pytest.approx(2.0)
    assert audio_duration(m4a) == pytest.approx(2.0, abs=0.1)
    long = tmp_path / "long.flac"  # 2 h of silence in 180 kB: its length is known without decoding it
    with sf.SoundFile(long, "w", samplerate=8000, channels=1, subtype="PCM_16", format="FLAC") as f:
        for _ in range(12):
            f.write(np.zeros(8000 * 600, np.int16))
    assert audio_duration(long) == 7200.0
    with pytest.raises(AudioReadError, match="not a recognised audio file"):
        (tmp_path / "junk.wav").write_bytes(b"junk" * 100)
        audio_duration(tmp_path / "junk.wav")


def test_fifos_and_devices_are_refused_without_opening_them(tmp_path):
    import os
    import time

    os.mkfifo(tmp_path / "pipe.wav")  # opening it for reading would wait for a writer forever
    t0 = time.monotonic()
    for path in (tmp_path / "pipe.wav", Path("/dev/zero")):
        for read in (read_audio, audio_duration, lambda p: next(stream_audio(p))):
            with pytest.raises(AudioReadError, match="not a regular file"):
                read(path)
    assert time.monotonic() - t0 < 5
