"""Generation defaults per DiT preset, as `EngineOptions` fields (`avatar.engine.preset_options`)."""

from __future__ import annotations

from avatar.chunking import OverlapOptions
from avatar.decoder import Deflicker
from avatar.generator import CausalOptions, Guidance

# Generation defaults per DiT preset: what each family was trained (or distilled) to do well. Few-step causal for
# block-causal students (Self-Forcing / LiveTalk layout, our demo); OmniAvatar's bidirectional checkpoints run
# overlapping chunks with its sampler (shift 5, 13-frame overlap = 4 latents, 2-pass audio CFG 4.5), 20-50 steps.
PRESET_DEFAULTS: dict[str, dict] = {
    # tiny: its DiT calls are overhead, not arithmetic, so ready sessions share them. bench_live, 16 calls on
    # 2 cores, two runs each way: 5.0 / 1.9 fresh fps per call batched by 8, 1.1 / 0.3 one at a time (the
    # transport alone sent only 16-17 fps there); at 8 calls ~25 either way
    "tiny": dict(mode="causal", causal=CausalOptions(), max_batch=8),
    # demo: audio CFG 2 (its audio stage dropped audio 10% of the time) opens the mouth about as wide as
    # the teacher's (scale 1: half as wide on some faces; 3 overshoots); 3 steps pay for the second pass.
    # 1-latent blocks: a frame waits for at most 160 ms of audio, not 480 (eval demo: latency p50 768 ->
    # 331 ms, lip sync 0.751 -> 0.733, seams 1.28 -> 1.23, real-time factor 1.9 -> 1.4-1.8).
    # Emotion: the emotion image as the reference and emotion guidance moved the mouth-corner lift 8x and 4x
    # further (held-out faces 1000011 / 1000023: 0.35 / 1.04 of the teacher's spread, from 0.04 / 0.28).
    # One noise draw per session (noise_correlation 1): a face with nothing to say no longer re-rolls its
    # detail every latent. A silent listener's mouth region changed 0.92 grey levels a frame, now 0.27
    # (the speaker's 1.67 -> 1.40); eval demo, one run against the shipped figures: lip sync 0.733 ->
    # 0.748, flite 0.685 -> 0.699, FAA leak 0.0078 -> 0.0011, emotion effect min 0.35 -> 0.40, seams
    # 1.23 -> 1.25 (less motion inside a latent), PSNR unchanged. A silent voice's face guided at 0: a
    # listener's mouth moves 6.6 % as much as the speaker's live (was 13 %). Emotion strength 1.75 (adapted
    # decoder, eval's held-out faces): effect 0.48 / 1.22 -> 0.60 / 1.28, three others 0.59-1.31 -> 0.72-1.44
    # Deflicker (strength 0.5 below 8 grey levels) on a latent's first frame: the eval's 8 espeak + 4 flite
    # held-out clips, the same generated frames without / with it: seams 1.216 -> 1.060 / 1.211 -> 1.063,
    # lip sync 0.7873 -> 0.7872 / 0.8021 -> 0.8020 (lag 0), identity PSNR 26.429 -> 26.428 dB
    "demo": dict(mode="causal", emotion_as_reference=True, emotion_strength=1.75, deflicker=Deflicker(0.5, 8.0),
                 causal=CausalOptions(block_frames=1, window_frames=6, steps=(1000, 750, 500), noise_correlation=1.0,
                                      guidance=Guidance(audio_scale=2.0, emotion=True, quiet_audio_scale=0.0))),
    "wan2.1-t2v-1.3b": dict(mode="causal", causal=CausalOptions(block_frames=3, window_frames=12,
                                                                 steps=(1000, 750, 500, 250), shift=5.0)),
    "wan2.1-t2v-14b": dict(mode="causal", causal=CausalOptions(block_frames=3, window_frames=12,
                                                                steps=(1000, 750, 500, 250), shift=5.0)),
    "omniavatar-1.3b": dict(mode="overlap", overlap=OverlapOptions(
        chunk_frames=21, overlap_frames=4, steps=25, shift=5.0, guidance=Guidance(audio_scale=4.5))),
    "omniavatar-14b": dict(mode="overlap", overlap=OverlapOptions(
        chunk_frames=21, overlap_frames=4, steps=25, shift=5.0, guidance=Guidance(audio_scale=4.5))),
}
