"""Training the embedded demo model (DESIGN §5): teacher data, trainers, the plan, the evaluation.

animate   animate(wav16k, identity_seed, fps, motion, emotion, seed) -> [FaceState] for the drawn faces
          (avatar/drawn: the renderer and emotions, shared with the runtime's built-in avatars)
probes    mouth_opening, mouth_corner_lift, psnr: measurements shared by the tests and the eval
corpus    espeak-ng and mbrola speech: ensure_espeak, ensure_mbrola, synthesize, build_corpus (train / held-out
          by voice and sentence; each engine its own clip indices)
engines   speech from an engine never trained on (flite), for the eval's held-out engine family
augment   what users' audio adds: pitch, noise, a room, a phone line, level, music under the speech
dataset   make_clip, make_pair_clip -> Clip; ClipStore (.npz shards); build_clip_store (corpus -> clips)
train_vae / latents / train_dit / schedule   the VAE, the latent store, the DiT stages, one lr schedule
demo      the resumable plan (`avatarcast train demo`) and the model card; evaluate: `avatarcast eval demo`
cli       those two command groups, plugged into `avatarcast` as entry points (or `python -m training`)
demo/     the current run's resumable state and notes

The runtime never imports this package; modules are imported directly (no re-exports).
"""
