"""What the pretrained-encoder front ends (Wav2Vec2, Whisper) share: a local model folder, a streaming
window given in milliseconds on the video-frame grid, the offline choice between the whole clip at once
(upstream) and the streaming windows, and where the encoder runs. torch is imported only when a model loads.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from audio.features.base import AudioFeatures, StreamTiming
from audio.pcm import MODEL_SAMPLE_RATE, VIDEO_FRAME_MS

SAMPLES_PER_MS = MODEL_SAMPLE_RATE // 1000


@dataclass(frozen=True)
class PretrainedFeaturesConfig:
    model_dir: str | Path  # a local Hugging Face style directory (config.json + weights)
    offline_context: Literal["clip", "window"] = "clip"  # what __call__ computes
    left_context_ms: int = 1000
    lookahead_ms: int = 160
    chunk_frames: int = 4  # one latent frame
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        minimums, why = self.context_minimums_ms()
        for name in ("left_context_ms", "lookahead_ms"):
            value, minimum = getattr(self, name), minimums.get(name, 0)
            if value < minimum or value % VIDEO_FRAME_MS:
                raise ValueError(f"{name}={value} must be a multiple of {VIDEO_FRAME_MS} ms and >= {minimum} ms"
                                 + (f" ({why})" if why else ""))
        if self.chunk_frames < 1:
            raise ValueError("chunk_frames must be >= 1")
        if self.offline_context not in ("clip", "window"):
            raise ValueError(f"offline_context must be 'clip' or 'window', got {self.offline_context!r}")

    def context_minimums_ms(self) -> tuple[dict[str, int], str]:
        """The least left context / lookahead the encoder's window needs, and why (none by default)."""
        return {}, ""

    def stream_timing(self) -> StreamTiming:
        return StreamTiming(self.left_context_ms * SAMPLES_PER_MS, self.lookahead_ms * SAMPLES_PER_MS,
                            self.chunk_frames)


class PretrainedFeatures(AudioFeatures):
    """A front end over a pretrained encoder loaded from `config.model_dir` (local files only)."""

    def __init__(self, config: PretrainedFeaturesConfig, kind: str) -> None:
        import torch

        self.config = config
        self.model_dir = Path(config.model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"no {kind} model in {self.model_dir} (config.json missing)")
        self._torch: Any = torch
        self._dtype = getattr(torch, config.dtype)
        self.timing = config.stream_timing()

    def __call__(self, wav16k: np.ndarray, num_video_frames: int | None = None) -> np.ndarray:
        if self.config.offline_context == "window":
            return self.window_features(wav16k, num_video_frames)
        return self.clip_features(wav16k, num_video_frames)

    @abstractmethod
    def clip_features(self, wav16k: np.ndarray, num_video_frames: int | None = None) -> np.ndarray:
        """Upstream's offline form: the whole clip through the encoder (not streamable)."""
