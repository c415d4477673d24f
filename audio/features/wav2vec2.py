"""Wav2Vec2 front end in OmniAvatar's layout (torch is imported only when one is built).

OmniAvatar (``OmniAvatar/models/wav2vec.py``, ``scripts/inference.py``):
1. normalise the clip with ``Wav2Vec2FeatureExtractor`` (zero mean, unit variance), then zero-pad it to
   ``640 * T`` samples for ``T`` video frames;
2. run the CNN feature encoder (50 Hz), then **linearly interpolate** its output to ``T`` frames
   (``F.interpolate(..., align_corners=True)``) **before** the transformer, so the transformer runs
   at 25 Hz, one position per video frame;
3. feature projection + transformer encoder;
4. features = ``last_hidden_state`` concatenated with every hidden state (embedding output + one per
   layer) -> ``(num_layers + 2) * hidden`` = 14 * 768 = 10752 for wav2vec2-base.
With exactly ``640 T`` samples the CNN gives ``2T - 1`` frames and step 2 picks every second one.

Two ways to run it:
- ``clip_features`` (``offline_context="clip"``, the default for ``__call__``): the whole clip at
  once, as upstream. The transformer attends over the whole clip and the CNN's GroupNorm and the
  input normalisation use whole-clip statistics, so no bounded-lookahead stream can reproduce it.
- ``window_features`` / ``stream()``: each chunk of ``chunk_frames`` frames is the clip pipeline run
  on its own window ``[640 f0 - left_context, 640 (f0 + chunk) + lookahead)`` (normalised over the
  real samples in it), keeping the chunk's rows. Streaming equals this offline form. A model that
  runs live should be trained on this form.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from audio.features.pretrained import PretrainedFeatures, PretrainedFeaturesConfig
from audio.pcm import MODEL_SAMPLE_RATE, SAMPLES_PER_VIDEO_FRAME, as_mono_float32, check_num_video_frames

_F = SAMPLES_PER_VIDEO_FRAME


@dataclass(frozen=True)
class Wav2Vec2FeaturesConfig(PretrainedFeaturesConfig):
    """A facebook/wav2vec2-base-960h style directory; OmniAvatar's 2 s of left context."""

    left_context_ms: int = 2000


class Wav2Vec2Features(PretrainedFeatures):
    """OmniAvatar's Wav2Vec2 audio features: ``(T_video, (layers + 2) * hidden)`` float32."""

    def __init__(self, config: Wav2Vec2FeaturesConfig):
        from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

        super().__init__(config, "Wav2Vec2")
        model_dir = self.model_dir
        self.model: Any = Wav2Vec2Model.from_pretrained(model_dir, local_files_only=True)
        self.model.eval().to(device=config.device, dtype=self._dtype)
        if (model_dir / "preprocessor_config.json").is_file():
            self.extractor = Wav2Vec2FeatureExtractor.from_pretrained(model_dir, local_files_only=True)
        else:  # OmniAvatar's settings
            self.extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=MODEL_SAMPLE_RATE,
                                                      padding_value=0.0, do_normalize=True)
        mc = self.model.config
        self.num_hidden_states = mc.num_hidden_layers + 1
        self.feature_dim = (mc.num_hidden_layers + 2) * mc.hidden_size

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **options: Any) -> Wav2Vec2Features:
        return cls(Wav2Vec2FeaturesConfig(model_dir=model_dir, **options))

    # ---- offline -----------------------------------------------------------------------------------

    def clip_features(self, wav16k: np.ndarray, num_video_frames: int | None = None) -> np.ndarray:
        """Upstream OmniAvatar: the whole clip through the encoder at once (audio beyond
        ``640 * num_video_frames`` samples is dropped, missing audio is zero padding)."""
        wav = as_mono_float32(wav16k, name="wav16k")
        t = check_num_video_frames(num_video_frames, wav.size)
        if t == 0:
            return np.zeros((0, self.feature_dim), dtype=np.float32)
        wav = wav[: t * _F]
        values = np.zeros(t * _F, dtype=np.float32)
        values[: wav.size] = self._normalise(wav)
        return self._encode(values, t)

    # ---- windowed (streaming) ----------------------------------------------------------------------

    def _encode_window(self, window: np.ndarray, first_frame: int, num_frames: int,
                       valid: tuple[int, int]) -> np.ndarray:
        values = np.zeros_like(window)
        a, b = valid
        if b > a:
            values[a:b] = self._normalise(window[a:b])
        rows = self.timing.left_context_samples // _F
        return self._encode(values, window.size // _F)[rows: rows + num_frames]

    # ---- the encoder -------------------------------------------------------------------------------

    def _normalise(self, wav: np.ndarray) -> np.ndarray:
        out = self.extractor(wav, sampling_rate=MODEL_SAMPLE_RATE, return_tensors="np").input_values
        return np.asarray(out, dtype=np.float32).reshape(-1)

    def _encode(self, input_values: np.ndarray, seq_len: int) -> np.ndarray:
        """``(num_samples,)`` normalised audio -> ``(seq_len, feature_dim)``, OmniAvatar steps 2-4."""
        torch = self._torch
        import torch.nn.functional as F

        model = self.model
        x = torch.from_numpy(input_values).to(device=self.config.device, dtype=self._dtype)[None]  # (1, N)
        with torch.inference_mode():
            # 2. CNN at 50 Hz, then linear interpolation to the video frame count
            cnn = model.feature_extractor(x)  # (1, C, T_cnn)
            cnn = F.interpolate(cnn, size=seq_len, mode="linear", align_corners=True)  # (1, C, T)
            # 3. projection + transformer, collecting the hidden states as upstream
            hidden, _ = model.feature_projection(cnn.transpose(1, 2))  # (1, T, H)
            last, states = self._transformer(hidden)
            # 4. last hidden state + all hidden states on the channel axis
            feats = torch.cat([last, *states], dim=-1)[0]  # (T, (layers + 2) * H)
        return feats.float().cpu().numpy()

    def _transformer(self, hidden: Any) -> tuple[Any, list[Any]]:
        """Wav2Vec2's encoder, returning (last_hidden_state, hidden_states) like
        ``Wav2Vec2Model(..., output_hidden_states=True)``: the input to the first layer, then each
        layer's output; the stable-layer-norm variant applies its final LayerNorm to the last only."""
        enc = self.model.encoder
        hidden = hidden + enc.pos_conv_embed(hidden)
        stable = self.model.config.do_stable_layer_norm
        if not stable:
            hidden = enc.layer_norm(hidden)
        states = [hidden]
        for layer in enc.layers:
            out = layer(hidden, attention_mask=None)
            hidden = out[0] if isinstance(out, tuple) else out
            states.append(hidden)
        last = enc.layer_norm(hidden) if stable else hidden
        return last, states
