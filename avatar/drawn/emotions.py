"""The drawn faces' emotions: per-emotion expression offsets and the rest pose that shows each one.

The built-in avatars draw one portrait per emotion with ``rest_state`` (mouth closed, eyes open, no head
motion); the demo model's teacher animation adds the same offsets to every frame of a clip, and the AEM's
emotion reference images are ``emotion_reference`` renders.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from avatar.drawn.face import NEUTRAL, FaceState, Identity, render


@dataclass(frozen=True)
class Emotion:
    """Per-clip expression: offsets applied to every frame."""

    smile: float
    brow_raise: float
    open_gain: float  # multiplies the mouth opening
    width_offset: float  # added to the mouth width


EMOTIONS: dict[str, Emotion] = {
    "neutral": Emotion(smile=0.0, brow_raise=0.0, open_gain=1.0, width_offset=0.0),
    "happy": Emotion(smile=0.75, brow_raise=0.15, open_gain=1.0, width_offset=0.1),
    "sad": Emotion(smile=-0.6, brow_raise=0.0, open_gain=0.8, width_offset=-0.05),
    "surprised": Emotion(smile=0.0, brow_raise=0.9, open_gain=1.3, width_offset=-0.15),
}


def rest_state(emotion: str = "neutral") -> FaceState:
    """The emotion's expression with the mouth closed, eyes open, no head motion."""
    if emotion not in EMOTIONS:
        raise ValueError(f"unknown emotion {emotion!r}; expected one of {sorted(EMOTIONS)}")
    e = EMOTIONS[emotion]
    return FaceState(mouth_width=float(np.clip(NEUTRAL.mouth_width + e.width_offset, 0, 1)), smile=e.smile,
                     brow_raise=e.brow_raise)


def emotion_reference(identity: Identity | int, emotion: str,
                      size: tuple[int, int] = (128, 128)) -> np.ndarray:
    """The identity showing ``emotion`` with a neutral (closed) mouth and pose: the AEM reference image."""
    idt = identity if isinstance(identity, Identity) else Identity.from_seed(identity)
    return render(idt, rest_state(emotion), size)[0]
