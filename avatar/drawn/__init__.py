"""Drawn avatars: the parametric stylised face renderer behind the built-in avatars and `avatar new`.

face      Identity.from_seed, FaceState, render / render_pair -> (RGB uint8, RenderInfo boxes)
shapes    colour helpers and static polygons (hair, clothes, background) of an identity
emotions  EMOTIONS (expression offsets), rest_state(emotion), emotion_reference(identity, emotion)

The demo model's teacher (`training/`) animates these faces; this package never imports it.
"""
