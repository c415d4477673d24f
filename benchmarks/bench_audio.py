"""Audio front-end benchmark: milliseconds of compute per second of audio, offline vs streaming.

    .venv/bin/python -m benchmarks.bench_audio [--seconds 10] [--wav2vec2-dir DIR] [--whisper-dir DIR]

Front ends: the built-in log-mel, and Wav2Vec2 / Whisper at tiny random configs (always) and with
real weights when a local directory is given (flags, ``AVATARCAST_WAV2VEC2_DIR`` /
``AVATARCAST_WHISPER_DIR``) or already in the Hugging Face cache (``facebook/wav2vec2-base-960h``,
``openai/whisper-tiny``; looked up with ``local_files_only``, never downloaded). Streaming is fed
20 ms pushes, as a WebRTC microphone delivers them. Also timed: the 48 kHz stereo -> 16 kHz resampler
and the VAD. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from audio.pcm import MODEL_SAMPLE_RATE
from audio.resample import PcmFormat, StreamResampler, resample_audio
from audio.vad import detect_speech

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "audio"
PUSH_SAMPLES = MODEL_SAMPLE_RATE // 50  # 20 ms
HUB_IDS = {"wav2vec2": "facebook/wav2vec2-base-960h", "whisper": "openai/whisper-tiny"}


def speech(seconds: float) -> np.ndarray:
    """The espeak fixtures, repeated to ``seconds`` of 16 kHz audio."""
    import soundfile as sf

    clips = [sf.read(str(p), dtype="float32")[0] for p in sorted(FIXTURES.glob("*.wav"))]
    one = np.concatenate(clips)
    n = int(seconds * MODEL_SAMPLE_RATE)
    return np.resize(one, n).astype(np.float32)


def best_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Best wall time of ``repeats`` runs, in ms (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * min(times)


def bench_front_end(fe: Any, wav: np.ndarray, repeats: int) -> dict[str, Any]:
    seconds = wav.size / MODEL_SAMPLE_RATE

    def streaming() -> None:
        stream = fe.stream()
        for i in range(0, wav.size, PUSH_SAMPLES):
            stream.push(wav[i:i + PUSH_SAMPLES])
        stream.flush()

    result: dict[str, Any] = {
        "feature_dim": fe.feature_dim,
        "lookahead_ms": fe.timing.lookahead_ms,
        "left_context_ms": fe.timing.left_context_ms,
        "chunk_frames": fe.timing.chunk_frames,
        "max_wait_ms": fe.timing.max_wait_ms,
    }
    if hasattr(fe, "clip_features"):
        result["offline_clip_ms_per_s"] = best_ms(lambda: fe.clip_features(wav), repeats) / seconds
    result["offline_window_ms_per_s"] = best_ms(lambda: fe.window_features(wav), repeats) / seconds
    result["streaming_ms_per_s"] = best_ms(streaming, repeats) / seconds
    return result


def local_model_dir(kind: str, given: str | None) -> Path | None:
    """A real checkpoint directory if one is available on this machine, else None."""
    path = given or os.environ.get(f"AVATARCAST_{kind.upper()}_DIR")
    if path:
        return Path(path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(HUB_IDS[kind], local_files_only=True))
    except Exception:  # not in the cache (or no hub client): skip the real model
        return None


def save_full_size_random(tmp: Path) -> tuple[Path, Path]:
    """wav2vec2-base and whisper-tiny architectures with random weights: the real compute cost."""
    import torch
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    torch.manual_seed(0)
    w2v, whisper = tmp / "wav2vec2_base_random", tmp / "whisper_tiny_random"
    Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=32)).save_pretrained(w2v)  # defaults = base: 768 x 12
    Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=False).save_pretrained(w2v)
    WhisperForConditionalGeneration(WhisperConfig()).save_pretrained(whisper)  # defaults = tiny: 384 x 4
    WhisperFeatureExtractor().save_pretrained(whisper)
    return w2v, whisper


def run(seconds: float = 10.0, repeats: int = 3, wav2vec2_dir: str | None = None,
        whisper_dir: str | None = None, torch_threads: int | None = 1,
        full_size_random: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Time every front end on ``seconds`` of speech; returns a JSON-ready dict.

    ``torch_threads`` (default 1): tiny models are dominated by thread hand-off on a small shared CPU;
    None keeps torch's default. ``full_size_random`` also times the real architectures with random
    weights (same compute as the real models; writes ~0.5 GB to a temporary directory). ``device``
    is where the learned encoders run ("cuda" on a GPU machine).
    """
    import torch

    if torch_threads:
        torch.set_num_threads(torch_threads)

    from audio.features import MelFeatures, Wav2Vec2Features, WhisperFeatures
    from audio.features.tiny import save_tiny_wav2vec2, save_tiny_whisper

    wav = speech(seconds)
    out: dict[str, Any] = {
        "audio_seconds": seconds,
        "push_ms": 1000 * PUSH_SAMPLES / MODEL_SAMPLE_RATE,
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                    "device": device},
        "front_ends": {},
    }
    fronts = out["front_ends"]
    fronts["mel"] = bench_front_end(MelFeatures(), wav, repeats)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        w2v = Wav2Vec2Features.from_pretrained(save_tiny_wav2vec2(tmp / "w2v"), device=device)
        fronts["wav2vec2_tiny"] = bench_front_end(w2v, wav, repeats)
        whisper = WhisperFeatures.from_pretrained(save_tiny_whisper(tmp / "whisper"), device=device)
        fronts["whisper_tiny"] = bench_front_end(whisper, wav, repeats)
        if full_size_random:
            w2v_dir, whisper_dir_random = save_full_size_random(tmp)
            w2v = Wav2Vec2Features.from_pretrained(w2v_dir, device=device)
            fronts["wav2vec2_base_random"] = bench_front_end(w2v, wav, 1)
            whisper = WhisperFeatures.from_pretrained(whisper_dir_random, device=device)
            fronts["whisper_tiny_random"] = bench_front_end(whisper, wav, 1)
    for kind, cls, given in (("wav2vec2", Wav2Vec2Features, wav2vec2_dir), ("whisper", WhisperFeatures, whisper_dir)):
        path = local_model_dir(kind, given)
        if path is None:
            fronts[f"{kind}_real"] = {"skipped": f"no local {HUB_IDS[kind]} weights"}
        else:
            fe = cls.from_pretrained(path, device=device)
            fronts[f"{kind}_real"] = {"model_dir": str(path), **bench_front_end(fe, wav, 1)}

    # the live input path: aiortc's 48 kHz stereo s16, 20 ms frames -> 16 kHz mono
    at_48k = resample_audio(wav, PcmFormat(MODEL_SAMPLE_RATE), out_rate=48000)
    big = np.round(np.repeat(at_48k[:, None], 2, axis=1) * 30000).astype(np.int16)  # (N, 2) s16
    worst = [0.0]

    def resample() -> None:
        r = StreamResampler(PcmFormat(48000, 2))
        for i in range(0, big.shape[0], 960):
            r.process(big[i:i + 960])
            worst[0] = max(worst[0], r.pending_output_samples)
        r.flush()

    out["resampler_48k_stereo_ms_per_s"] = best_ms(resample, repeats) / seconds
    out["resampler_max_latency_ms"] = 1000 * worst[0] / MODEL_SAMPLE_RATE
    out["vad_ms_per_s"] = best_ms(lambda: detect_speech(wav), repeats) / seconds
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wav2vec2-dir")
    parser.add_argument("--whisper-dir")
    parser.add_argument("--torch-threads", type=int, default=1, help="0 keeps torch's default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full-size-random", action="store_true",
                        help="also time wav2vec2-base / whisper-tiny architectures with random weights")
    args = parser.parse_args()
    result = run(args.seconds, args.repeats, args.wav2vec2_dir, args.whisper_dir, args.torch_threads or None,
                 args.full_size_random, args.device)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
