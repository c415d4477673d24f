"""Teacher data for the embedded demo model (issue 6, DESIGN §5): stylised faces driven by speech.

face      Identity.from_seed, FaceState, render / render_pair -> (RGB uint8, RenderInfo boxes)
animate   animate(wav16k, identity_seed, fps, motion, emotion, seed) -> [FaceState]; emotion_reference
probes    mouth_opening, mouth_corner_lift, psnr: measurements shared by the tests and the eval
corpus    espeak-ng speech: ensure_espeak, synthesize, build_corpus (train / held-out by voice and sentence)
dataset   make_clip, make_pair_clip -> Clip; ClipStore (.npz shards); build_clip_store (corpus -> clips)

Nothing here is imported by the serving path; modules are imported directly (no re-exports).
"""
