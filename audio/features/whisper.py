"""Whisper-encoder front end in HunyuanVideo-Avatar's / Sonic's layout (torch imported lazily).

Upstream (``hymm_sp/data_kits/audio_preprocessor.py``: ``get_audio_feature`` + ``encode_audio``):
1. log-mel with ``WhisperFeatureExtractor`` per 30 s segment (each padded to 3000 mel frames);
2. the whisper-tiny encoder; **all** hidden states (embedding output + one per layer; the last is
   after the final LayerNorm) stacked -> ``(T_w, layers + 1, d_model)`` at 50 Hz;
3. 4 zero frames prepended; video frame ``f`` (25 fps) takes the 10 frames ``[2f, 2f + 10)`` of that
   padded sequence, i.e. encoder frames ``2f - 4 .. 2f + 5`` (-80 ms .. +120 ms around the frame
   start) -> ``(T_video, 10, layers + 1, d_model)``, flattened here to ``(T_video, D)``
   (D = 10 * 5 * 384 = 19200 for whisper-tiny; ``feature_shape`` gives the unflattened shape).

The encoder insists on ``2 * max_source_positions`` mel frames (3000 = 30 s). ``clip_features`` runs
the pretrained 30 s encoder per 30 s segment as upstream does (upstream stops after the first segment
and 400 video frames; longer clips continue segment by segment here). The streaming form instead
builds a second encoder with ``max_source_positions`` = the window's length, the pretrained
position embeddings sliced to it, and runs it on ``[640 f0 - left_context, 640 (f0 + chunk) +
lookahead)`` only. The 10-frame window reaches 80 ms past each frame's end, so the lookahead is at
least 80 ms (the default 160 ms also gives the convolutions and attention some right context).
Encoder frames before the start of the audio are zeros, as upstream's 4 leading zero frames.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from audio.features.pretrained import SAMPLES_PER_MS, PretrainedFeatures, PretrainedFeaturesConfig
from audio.pcm import MODEL_SAMPLE_RATE, SAMPLES_PER_VIDEO_FRAME, as_mono_float32, check_num_video_frames

_F = SAMPLES_PER_VIDEO_FRAME
_ENC_HOP = 320  # samples per encoder frame: mel hop 160 x conv2 stride 2 (50 Hz)
_ENC_PER_VIDEO = _F // _ENC_HOP  # 2


@dataclass(frozen=True)
class WhisperFeaturesConfig(PretrainedFeaturesConfig):
    """An openai/whisper-tiny style directory, with upstream's per-frame window of encoder frames."""

    window_frames: int = 10  # encoder frames per video frame (upstream: 10)
    leading_zero_frames: int = 4  # upstream: 4

    def context_minimums_ms(self) -> tuple[dict[str, int], str]:
        left = self.leading_zero_frames * _ENC_HOP // SAMPLES_PER_MS
        right = (self.window_frames - self.leading_zero_frames - _ENC_PER_VIDEO) * _ENC_HOP // SAMPLES_PER_MS
        return ({"left_context_ms": left, "lookahead_ms": right},
                f"the {self.window_frames}-frame window reaches that far")


class WhisperFeatures(PretrainedFeatures):
    """HunyuanVideo-Avatar / Sonic whisper features: ``(T_video, window * (layers + 1) * d_model)``."""

    def __init__(self, config: WhisperFeaturesConfig):
        from transformers import WhisperFeatureExtractor, WhisperModel

        super().__init__(config, "Whisper")
        model_dir = self.model_dir
        full = WhisperModel.from_pretrained(model_dir, local_files_only=True)
        self.encoder: Any = full.get_encoder().eval().to(device=config.device, dtype=self._dtype)
        del full  # the decoder is not needed
        ec = self.encoder.config
        if ec.encoder_layers < 1:
            raise ValueError(f"{model_dir}: a Whisper encoder with no layers has no hidden states to stack")
        if (model_dir / "preprocessor_config.json").is_file():
            self.extractor = WhisperFeatureExtractor.from_pretrained(model_dir, local_files_only=True)
        else:
            self.extractor = WhisperFeatureExtractor(feature_size=ec.num_mel_bins, sampling_rate=MODEL_SAMPLE_RATE)
        self.feature_shape = (config.window_frames, ec.encoder_layers + 1, ec.d_model)
        self.feature_dim = int(np.prod(self.feature_shape))
        positions = (self.timing.left_context_samples + config.chunk_frames * _F
                     + self.timing.lookahead_samples) // _ENC_HOP
        if positions > ec.max_source_positions:
            raise ValueError(
                f"the streaming window needs {positions} encoder positions; the model has "
                f"{ec.max_source_positions} ({ec.max_source_positions * _ENC_HOP / MODEL_SAMPLE_RATE:.1f} s)"
            )
        self.window_encoder: Any = self._sliced_encoder(positions)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **options: Any) -> WhisperFeatures:
        return cls(WhisperFeaturesConfig(model_dir=model_dir, **options))

    def _sliced_encoder(self, positions: int) -> Any:
        """The pretrained encoder rebuilt for ``positions`` frames: same weights, position embeddings
        ``[:positions]``, and a config whose ``max_source_positions`` makes its length check pass."""
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        cfg = copy.deepcopy(self.encoder.config)
        cfg.max_source_positions = positions
        with self._torch.device("meta"):
            short = WhisperEncoder(cfg)
        state = dict(self.encoder.state_dict())
        state["embed_positions.weight"] = state["embed_positions.weight"][:positions].clone()
        short.load_state_dict(state, assign=True)  # shares the pretrained tensors, no copy
        left_on_meta = [name for name, t in [*short.named_parameters(), *short.named_buffers()] if t.is_meta]
        if left_on_meta:
            raise RuntimeError(f"sliced Whisper encoder: {left_on_meta} were not in the pretrained state")
        return short.eval()

    # ---- offline -----------------------------------------------------------------------------------

    def clip_features(self, wav16k: np.ndarray, num_video_frames: int | None = None) -> np.ndarray:
        """Upstream: 30 s segments through the pretrained encoder, then the per-frame windows."""
        wav = as_mono_float32(wav16k, name="wav16k")
        t = check_num_video_frames(num_video_frames, wav.size)
        if t == 0:
            return np.zeros((0, self.feature_dim), dtype=np.float32)
        seg = int(self.extractor.n_samples)  # 480000 = 30 s
        # encoder frames the windows reach: up to 2 (t - 1) - zeros + window
        need = _ENC_PER_VIDEO * (t - 1) - self.config.leading_zero_frames + self.config.window_frames
        audio = np.zeros(max(wav.size, need * _ENC_HOP), dtype=np.float32)
        audio[: wav.size] = wav
        states = []
        for start in range(0, audio.size, seg):
            mel = self.extractor(audio[start:start + seg], sampling_rate=MODEL_SAMPLE_RATE,
                                 return_tensors="np").input_features  # (1, n_mels, 3000)
            states.append(self._hidden_states(self.encoder, mel))
        return self._frame_windows(np.concatenate(states), first_encoder_frame=0, first_frame=0, num_frames=t)

    # ---- windowed (streaming) ----------------------------------------------------------------------

    def _encode_window(self, window: np.ndarray, first_frame: int, num_frames: int,
                       valid: tuple[int, int]) -> np.ndarray:
        mel = self.extractor(window, sampling_rate=MODEL_SAMPLE_RATE, padding="longest", truncation=False,
                             return_tensors="np").input_features  # (1, n_mels, window / 160)
        states = self._hidden_states(self.window_encoder, mel)  # (window / 320, layers + 1, d)
        first_enc = (first_frame * _F - self.timing.left_context_samples) // _ENC_HOP
        return self._frame_windows(states, first_enc, first_frame, num_frames)

    # ---- shared ------------------------------------------------------------------------------------

    def _hidden_states(self, encoder: Any, mel: np.ndarray) -> np.ndarray:
        """``(1, n_mels, 2P)`` log-mel -> ``(P, layers + 1, d_model)`` all hidden states, stacked."""
        torch = self._torch
        x = torch.from_numpy(np.ascontiguousarray(mel)).to(device=self.config.device, dtype=self._dtype)
        with torch.inference_mode():
            out = encoder(x, output_hidden_states=True)
            stacked = torch.stack(out.hidden_states, dim=2)[0]  # (P, layers + 1, d)
        return stacked.float().cpu().numpy()

    def _frame_windows(self, states: np.ndarray, first_encoder_frame: int, first_frame: int,
                       num_frames: int) -> np.ndarray:
        """Cut the ``window_frames`` encoder frames of each video frame out of ``states``, whose row 0
        is absolute encoder frame ``first_encoder_frame``; frames before the audio start are zeros."""
        c = self.config
        frames = np.arange(first_frame, first_frame + num_frames)
        absolute = (_ENC_PER_VIDEO * frames - c.leading_zero_frames)[:, None] + np.arange(c.window_frames)
        before_audio = absolute < 0
        rows = np.where(before_audio, 0, absolute - first_encoder_frame)  # (T, window)
        if rows.size and (rows.max() >= states.shape[0] or rows.min() < 0):  # an indexing bug, never input
            raise RuntimeError(f"window rows {rows.min()}..{rows.max()} outside {states.shape[0]} encoder frames")
        out = states[rows]  # (T, window, layers + 1, d)
        out[before_audio] = 0.0
        return out.reshape(num_frames, -1).astype(np.float32, copy=False)
