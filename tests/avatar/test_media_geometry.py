"""The media geometry has one definition per lowest layer. `audio` and `models` may not import each
other, so each names video frames per latent itself; the avatar layer, which uses both, relies on them
agreeing with each other and with the VAEs' temporal compression."""

from __future__ import annotations

from audio import pcm
from avatar.types import DEFAULT_FPS
from models import config


def test_frames_per_latent_is_the_same_number_on_both_sides():
    assert pcm.VIDEO_FRAMES_PER_LATENT == config.VIDEO_FRAMES_PER_LATENT
    for vae in config.VAE_PRESETS.values():
        assert vae.temporal_factor == config.VIDEO_FRAMES_PER_LATENT, vae.name


def test_the_engine_fps_is_the_audio_front_end_fps():
    assert DEFAULT_FPS == pcm.VIDEO_FPS
    assert pcm.SAMPLES_PER_VIDEO_FRAME * pcm.VIDEO_FPS == pcm.MODEL_SAMPLE_RATE
