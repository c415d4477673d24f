"""Face-aware audio guidance: with several speakers, a silent voice's face is guided at the quiet scale.

1. The scale map: `audio_scale` outside the faces and on a speaking face, `quiet_audio_scale` on a silent
   one, in between for partial activity, the more active face's where masks overlap; one number when
   nothing asks for a map.
2. The guided velocity is exactly uncond + map * (cond - uncond), per latent frame, and batched sessions
   with different activities equal each session alone.
3. The activity itself: each speaker track's voice activity detector, per latent, in step with the
   features (after a barge-in too), and a two-speaker session hands it to the generator.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
import torch

from audio.features.mel import MelFeatures
from audio.resample import PcmFormat, resample_audio
from audio.vad import detect_speech
from avatar.generator import CausalGenerator, CausalOptions, Conditions, Guidance, GuidedModel
from avatar.timeline import SpeakerTrack, latent_voice_activity, voiced_frames
from models.config import TINY
from models.dit import WanDiT

from helpers import FIXTURES

H, W = 4, 8  # latents -> a 2 x 4 token grid: face 0 on the left two columns, face 1 on the right two
QUIET = Guidance(audio_scale=2.0, quiet_audio_scale=0.5)


@pytest.fixture(scope="module")
def dit(randomize):
    torch.manual_seed(0)
    return randomize(WanDiT(TINY).eval())


def _pair(seed: int = 0, overlap: bool = False) -> Conditions:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 2, H // 2, W // 2)
    mask[0, 0, :, :2] = 1
    mask[0, 1, :, 2:] = 1
    if overlap:
        mask[0, 0, :, 2] = 1  # token column 2 belongs to both faces
    return Conditions(reference=torch.randn(1, 16, 1, H, W, generator=g), face_mask=mask)


# ---- 1. the scale map ----------------------------------------------------------------------------------
def test_a_silent_voice_face_gets_the_quiet_scale_and_the_rest_the_audio_scale(dit):
    model = GuidedModel(dit, QUIET)
    activity = torch.tensor([[[1.0, 0.0, 0.5], [0.0, 0.0, 1.0]]])  # (1, speakers, F): per latent
    scale = model.audio_scales([_pair()], [activity], (3, H, W))
    assert scale.shape == (1, 1, 3, H, W)
    left, right = scale[0, 0, :, :, :4], scale[0, 0, :, :, 4:]  # token columns 0-1 / 2-3 = latent columns 0-3 / 4-7
    assert left[0].eq(2.0).all() and right[0].eq(0.5).all()  # face 0 speaks, face 1 is silent
    assert left[1].eq(0.5).all() and right[1].eq(0.5).all()  # both silent
    assert left[2].eq(1.25).all() and right[2].eq(2.0).all()  # half a latent of speech: half way
    # overlapping masks: the more active face's scale; no activity, or no quiet scale: one number
    over = model.audio_scales([_pair(overlap=True)], [activity], (3, H, W))[0, 0]
    assert over[0, :, 4:6].eq(2.0).all() and over[0, :, 6:].eq(0.5).all() and over[2, :, 4:6].eq(2.0).all()
    assert model.audio_scales([_pair()], [None], (3, H, W)) == 2.0
    assert GuidedModel(dit, Guidance(audio_scale=2.0)).audio_scales([_pair()], [activity], (3, H, W)) == 2.0


def test_a_face_without_a_voice_is_silent_and_a_mask_free_session_keeps_the_audio_scale(dit):
    model = GuidedModel(dit, QUIET)
    one_voice = model.audio_scales([_pair(), replace(_pair(1), face_mask=None)],
                                   [torch.ones(1, 1, 2), torch.ones(1, 2, 2)], (2, H, W))
    assert one_voice.shape == (2, 1, 2, H, W)
    assert one_voice[0, 0, :, :, :4].eq(2.0).all() and one_voice[0, 0, :, :, 4:].eq(0.5).all()
    assert one_voice[1].eq(2.0).all()


# ---- 2. the guided velocity ------------------------------------------------------------------------------
@torch.no_grad()
def test_the_guided_velocity_is_the_branches_combined_with_the_map(dit):
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(1, 16, 2, H, W, generator=g), torch.tensor([700.0])
    audio = torch.randn(1, 2, 4, TINY.audio_dim, generator=g)
    face_audio = torch.randn(1, 2, 2, 4, TINY.audio_dim, generator=g)
    activity = torch.tensor([[[1.0, 0.25], [0.0, 1.0]]])
    cond = _pair(4)
    guided = GuidedModel(dit, QUIET)(x, t, cond, audio, face_audio=face_audio, face_activity=activity)
    single = GuidedModel(dit, Guidance())  # one pass: the conditional branch, or with zero audio the other
    c = single(x, t, cond, audio, face_audio=face_audio)
    u = single(x, t, cond, torch.zeros_like(audio), face_audio=torch.zeros_like(face_audio))
    scale = torch.full((1, 1, 2, H, W), 2.0)
    scale[..., 0, :, 4:] = 0.5  # latent 0: face 1 silent
    scale[..., 1, :, :4] = 0.5 + 1.5 * 0.25  # latent 1: face 0 a quarter active
    assert (guided - (u + scale * (c - u))).abs().max() <= 1e-5
    plain = GuidedModel(dit, Guidance(audio_scale=2.0))(x, t, cond, audio, face_audio=face_audio)
    assert (guided - plain).abs().max() > 1e-3  # the map really changed something


@torch.no_grad()
def test_batched_sessions_with_different_activities_equal_each_alone(dit):
    gen = CausalGenerator(dit, CausalOptions(block_frames=2, window_frames=4, steps=(1000, 500), guidance=QUIET))
    g = torch.Generator().manual_seed(5)
    conds = [_pair(10), _pair(11)]
    audio = [torch.randn(1, 2, 4, TINY.audio_dim, generator=g) for _ in conds]
    face = [torch.randn(1, 2, 2, 4, TINY.audio_dim, generator=g) for _ in conds]
    acts = [torch.tensor([[[1.0, 1.0], [0.0, 0.0]]]), torch.tensor([[[0.0, 0.5], [1.0, 0.0]]])]

    def fresh(i):
        st = gen.init_state(conds[i], seed=i)
        gen.prefill_reference(st, audio[i][:, :1], face[i][:, :, :1])
        return st

    batched = gen.generate_blocks([fresh(0), fresh(1)], audio, face, acts)
    for i in range(2):
        alone = gen.generate_block(fresh(i), audio[i], face[i], acts[i])
        assert (batched[i] - alone).abs().max() <= 1e-5
        other = gen.generate_block(fresh(i), audio[i], face[i], acts[1 - i])
        assert (batched[i] - other).abs().max() > 1e-3  # each session's own activity was used


# ---- 3. the activity ----------------------------------------------------------------------------------------
def _speech(seconds: float, rate: int) -> np.ndarray:
    x, r = sf.read(FIXTURES / "audio" / "speech_en_gb_female.wav", dtype="float32")
    return resample_audio(x, PcmFormat(r), out_rate=rate)[: int(seconds * rate)]


def test_a_track_s_voice_activity_follows_its_speech_per_latent():
    rate = 48_000
    track = SpeakerTrack(MelFeatures(), rate, 25, max_seconds=30, detect_voice=True)
    track.pad(rate)  # 1 s of silence (video frames 0-24), then 2 s of speech (25-74), then 1 s silence
    track.push(_speech(2.0, rate), PcmFormat(rate))
    track.pad(rate)
    act = track.voice_activity(0, 25)  # latents 0-24: frames 0 .. 96
    assert act.shape == (25,)
    assert act[:6].max() == 0.0  # latents 0-5: frames 0-20, all silence
    assert act[8:18].mean() > 0.8  # latents 8-17: frames 29-68, inside the speech
    assert act[-4:].max() == 0.0  # latents 21-24: frames 81-96, after the speech and the hangover
    # the same decisions as the offline detector on the same 16 kHz audio
    whole = np.concatenate([np.zeros(rate, np.float32), _speech(2.0, rate), np.zeros(rate, np.float32)])
    wav16k = resample_audio(whole, PcmFormat(rate), out_rate=16_000)
    offline = latent_voice_activity(voiced_frames(detect_speech(wav16k)), 0, 25)
    assert np.abs(offline - act).max() <= 0.25  # one frame of a latent, at most (resampler edges)
    # frames consumed are gone; a barge-in restarts the detector where the stream restarts
    track.consumed(40)
    assert np.array_equal(track.voice_activity(11, 5), act[11:16])
    track.truncate_at(50)
    assert track.voice_activity(13, 2).max() == 0.0  # frames 49-56: cut and not heard again yet
    with pytest.raises(RuntimeError, match="without voice detection"):  # a one-voice session's tracks skip it
        SpeakerTrack(MelFeatures(), rate, 25, max_seconds=30).voice_activity(0, 1)



async def test_a_two_speaker_session_guides_with_each_voice_s_activity():
    """Speech on speaker 0, silence on speaker 1, through an engine: every unit the generator gets carries
    both voices' activity per latent, and only speaker 0 is ever active."""
    from avatar.engine import AvatarEngine, EngineOptions, ModelBundle
    from avatar.session import SessionOptions
    from avatar.types import AvatarFrame, SegmentEnd

    opts = EngineOptions(causal=CausalOptions(block_frames=2, window_frames=4, steps=(1000, 500), guidance=QUIET),
                         decoder="torch")
    seen: list[torch.Tensor] = []
    with AvatarEngine(ModelBundle.random("tiny", "tiny", seed=0), opts) as eng:
        gen = eng.generator
        unit, blocks = gen.generate_unit, gen.generate_blocks

        def spy_unit(state, audio, face_audio=None, face_activity=None):
            if state.next_frame:
                seen.append(face_activity)
            return unit(state, audio, face_audio, face_activity)

        def spy_blocks(states, audios, face_audios=None, face_activities=None):
            seen.extend(face_activities)
            return blocks(states, audios, face_audios, face_activities)

        gen.generate_unit, gen.generate_blocks = spy_unit, spy_blocks
        mask = torch.zeros(1, 2, 2, 2)
        mask[0, 0, :, 0], mask[0, 1, :, 1] = 1, 1
        cond = Conditions(reference=torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(1)),
                          face_mask=mask)
        session = eng.open_session(cond, SessionOptions(realtime=False, speakers=2))
        talk = _speech(1.5, 16_000)
        session.push_audio(np.concatenate([np.zeros(8000, np.float32), talk]), 16_000, speaker=0)
        session.push_audio(np.zeros(8000 + talk.size, np.float32), 16_000, speaker=1)
        session.end_segment()
        frames = 0
        async for item in session:
            frames += isinstance(item, AvatarFrame)
            if isinstance(item, SegmentEnd):
                break
        session.close()
    assert frames == 50 and len(seen) >= 12  # 2 s at 25 fps; 2-latent blocks after the first
    assert all(a is not None and a.shape[:2] == (1, 2) for a in seen)
    act = torch.cat(seen, dim=2)[0]  # (2, latents 1 ..)
    assert act[1].eq(0).all()  # the silent voice is never active
    assert act[0, :2].eq(0).all() and act[0].max() == 1.0  # speaker 0: silent for 0.5 s, then speaking
    assert act[0].gt(0.5).sum() >= 6
