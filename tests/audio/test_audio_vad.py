"""The energy VAD finds the known pauses in the espeak fixtures, clean and with background noise."""

from __future__ import annotations

import numpy as np
import pytest

from audio.vad import VadConfig, VoiceActivityDetector, detect_speech, silence_segments, speech_segments

HANGOVER_MS = VadConfig().hangover_ms


def inner_pauses(meta: dict) -> list[tuple[float, float]]:
    segs = meta["segments"]
    return [(s["start_ms"], s["end_ms"]) for s in segs[1:-1] if s["kind"] == "pause"]


def speech_spans(meta: dict) -> list[tuple[float, float]]:
    return [(s["start_ms"], s["end_ms"]) for s in meta["segments"] if s["kind"] == "speech"]


@pytest.mark.parametrize("name", ["speech_en_us_male.wav", "speech_en_gb_female.wav"])
@pytest.mark.parametrize("gain, noise_dbfs", [(1.0, None), (1.0, -50.0), (1.0, -40.0), (0.3, -50.0)])
def test_finds_the_pauses(speech, fixture_meta, name, gain, noise_dbfs):
    wav = speech[name] * gain
    if noise_dbfs is not None:
        wav = wav + np.random.default_rng(0).standard_normal(wav.size).astype(np.float32) * 10 ** (noise_dbfs / 20)
    detected = silence_segments(detect_speech(wav))
    meta = fixture_meta[name]
    # 1. every pause between phrases is found: it starts no later than the hangover (+2 frames) after
    #    the speech stops and ends within 160 ms of the speech restarting
    for start, end in inner_pauses(meta):
        hits = [(a, b) for a, b in detected if a < end and b > start]
        assert hits, f"pause {start:.0f}-{end:.0f} ms not found in {detected}"
        a, b = max(hits, key=lambda s: s[1] - s[0])
        assert start - 40 <= a <= start + HANGOVER_MS + 40, (start, end, a, b)
        assert end - 40 <= b <= end + 160, (start, end, a, b)
    # 2. no pause is reported inside a phrase
    for a, b in detected:
        inside = [(s, e) for s, e in speech_spans(meta) if a >= s + 40 and b <= e - 40]
        assert not inside, f"false pause {a}-{b} ms inside speech {inside}"


def test_leading_and_trailing_silence(speech, fixture_meta):
    name = "speech_en_us_male.wav"
    decisions = detect_speech(speech[name])
    segs = speech_segments(decisions)
    first_speech = fixture_meta[name]["segments"][1]["start_ms"]
    assert abs(segs[0][0] - first_speech) <= 40
    assert not decisions[-1]


def test_streaming_equals_offline(speech, chunker):
    wav = speech["speech_en_gb_female.wav"]
    vad = VoiceActivityDetector()
    rng = np.random.default_rng(3)
    streamed = np.concatenate([vad.push(c) for c in chunker(wav, rng)] + [vad.flush()])
    np.testing.assert_array_equal(streamed, detect_speech(wav))
    assert streamed.size == -(-wav.size // 320)


def test_digital_silence_and_bad_input():
    assert not detect_speech(np.zeros(16000, dtype=np.float32)).any()
    assert detect_speech(np.zeros(0, dtype=np.float32)).shape == (0,)
    vad = VoiceActivityDetector()
    assert vad.push(np.zeros(1, dtype=np.float32)).shape == (0,)
    with pytest.raises(ValueError, match="NaN or infinite"):
        vad.push(np.array([0.0, np.nan], dtype=np.float32))
    with pytest.raises(ValueError, match="mono"):
        vad.push(np.zeros((2, 320), dtype=np.float32))
    with pytest.raises(ValueError, match="hysteresis"):
        VadConfig(on_margin_db=5.0, off_margin_db=9.0)
    # int16 input; a tone after silence is "speech" until it has lasted a whole floor window, after
    # which a stationary sound counts as background (minimum statistics)
    tone = np.concatenate([np.zeros(8000), np.sin(np.arange(40000) / 5) * 20000]).astype(np.int16)
    d = detect_speech(tone)
    assert not d[:25].any() and d[25:25 + 70].all() and not d[-10:].any()
