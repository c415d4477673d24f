"""PCM conventions shared by the audio front end: the model rate, video geometry, sample conversion.

Everything after the resampler is 16 kHz mono float32 in [-1, 1] (nominally); 25 fps video means one
video frame owns 640 samples (40 ms) and one latent frame owns 4 video frames (160 ms).

The resampler is the boundary that repairs bad input (non-finite samples are replaced and counted);
code downstream of it validates and raises ``ValueError`` instead, so a bad array never reaches numpy
or torch internals.
"""

from __future__ import annotations

import numpy as np

MODEL_SAMPLE_RATE = 16_000
MEDIA_SAMPLE_RATE = 48_000  # what leaves: WebRTC's Opus, the AAC of mp4 / RTMP / HLS
VIDEO_FPS = 25
VIDEO_FRAME_MS = 1000 // VIDEO_FPS  # 40 ms
SAMPLES_PER_VIDEO_FRAME = MODEL_SAMPLE_RATE // VIDEO_FPS  # 640
VIDEO_FRAMES_PER_LATENT = 4  # Wan VAE: 4x temporal compression

MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 96_000

# Integer PCM is scaled by its full-scale value; float PCM is taken as is.
_INT_FULL_SCALE = {np.dtype(np.int16): 32768.0, np.dtype(np.int32): 2147483648.0}


def check_sample_rate(sample_rate: int) -> int:
    """Return ``sample_rate`` as an int, or raise ValueError if it is outside 8-96 kHz."""
    if isinstance(sample_rate, bool) or not float(sample_rate).is_integer():
        raise ValueError(f"sample_rate must be a whole number of Hz, got {sample_rate!r}")
    rate = int(sample_rate)
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ValueError(
            f"sample_rate {rate} Hz is outside the supported {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz range"
        )
    return rate


def to_float32(pcm: np.ndarray, *, name: str = "pcm") -> np.ndarray:
    """Convert int16 / int32 / float PCM to float32 (integers scaled to [-1, 1)); shape is kept."""
    x = np.asarray(pcm)
    if x.dtype in _INT_FULL_SCALE:
        return x.astype(np.float32) / np.float32(_INT_FULL_SCALE[x.dtype])
    if x.dtype == np.uint8:  # 8-bit WAV convention: unsigned, centred on 128
        return (x.astype(np.float32) - np.float32(128)) / np.float32(128)
    if x.dtype.kind == "f":
        return x.astype(np.float32, copy=False)
    raise ValueError(f"{name}: unsupported sample dtype {x.dtype}; expected int16, int32, uint8 or float")


def count_nonfinite(x: np.ndarray) -> int:
    """Number of NaN / +-inf samples in ``x`` (0 for integer arrays)."""
    if x.dtype.kind != "f":
        return 0
    return int(x.size - np.count_nonzero(np.isfinite(x)))


def sanitize(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Replace NaN by 0 and +-inf by +-1; return (clean array, number of samples replaced).

    Returns ``x`` itself when it is already finite.
    """
    bad = count_nonfinite(x)
    if not bad:
        return x, 0
    return np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0), bad


def as_mono_float32(samples: np.ndarray, *, name: str = "samples") -> np.ndarray:
    """Validate 16 kHz mono input for the feature front ends and VAD: 1-D, finite, float32.

    int16 is accepted and scaled; anything 2-D, non-finite or of an unknown dtype raises ValueError
    naming the problem (downmix and resample with ``audio.resample`` first).
    """
    x = np.asarray(samples)
    if x.ndim == 2 and 1 in x.shape:
        x = x.reshape(-1)
    if x.ndim != 1:
        raise ValueError(
            f"{name}: expected mono samples of shape (num_samples,), got shape {x.shape}; "
            "downmix with audio.resample.StreamResampler first"
        )
    x = to_float32(x, name=name)
    bad = count_nonfinite(x)
    if bad:
        raise ValueError(
            f"{name}: {bad} of {x.size} samples are NaN or infinite; clean them with audio.pcm.sanitize "
            "(the live resampler does this automatically)"
        )
    return x


def video_frames_for_samples(num_samples: int) -> int:
    """Video frames covering ``num_samples`` at 16 kHz: ceil(num_samples / 640), as OmniAvatar counts."""
    return -(-int(num_samples) // SAMPLES_PER_VIDEO_FRAME)


def check_num_video_frames(num_video_frames: int | None, num_samples: int) -> int:
    """Resolve and validate a requested video frame count (None -> enough to cover the audio)."""
    if num_video_frames is None:
        return video_frames_for_samples(num_samples)
    if isinstance(num_video_frames, bool) or int(num_video_frames) != num_video_frames or num_video_frames < 0:
        raise ValueError(f"num_video_frames must be a non-negative integer, got {num_video_frames!r}")
    return int(num_video_frames)
