"""Audio front ends: 16 kHz mono -> one feature vector per 25 fps video frame, offline and streaming.

``MelFeatures`` needs no weights; ``Wav2Vec2Features`` (OmniAvatar layout) and ``WhisperFeatures``
(HunyuanVideo-Avatar / Sonic layout) load a local model directory and import torch only then.
"""

from audio.features.base import AudioFeatures, FeatureStream, StreamTiming
from audio.features.mel import MelConfig, MelFeatures
from audio.features.wav2vec2 import Wav2Vec2Features, Wav2Vec2FeaturesConfig
from audio.features.whisper import WhisperFeatures, WhisperFeaturesConfig

__all__ = [
    "AudioFeatures", "FeatureStream", "MelConfig", "MelFeatures", "StreamTiming",
    "Wav2Vec2Features", "Wav2Vec2FeaturesConfig", "WhisperFeatures", "WhisperFeaturesConfig",
]
