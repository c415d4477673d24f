"""The demo model's teacher data (avatar/drawn, training/): renderer, animation, probes, corpus split, clip storage.

Audio comes from the committed espeak-ng fixtures (tests/fixtures/audio), so only the corpus build
test needs espeak-ng itself (skipped, with the reason, when it is absent).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from audio.io import read_audio
from avatar.drawn.emotions import EMOTIONS, emotion_reference, rest_state
from avatar.drawn.face import HAIR_STYLES, NEUTRAL, STATE_FIELDS, FaceState, Identity, render, render_pair
from training import corpus
from training.animate import animate, frame_dbfs, speech_gate
from training.dataset import (HELD_OUT_IDENTITY_BASE, LISTENER_PREFIX, ClipStore, build_clip_store, make_clip,
                              make_pair_clip, plan_clips, plan_listeners)
from training.probes import mouth_corner_lift, mouth_opening, psnr

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "audio"


@pytest.fixture(scope="module")
def speech() -> tuple[np.ndarray, list[dict]]:
    """8.6 s of espeak-ng speech with pauses of known position (fixtures.json)."""
    meta = json.loads((FIXTURES / "fixtures.json").read_text())["speech_en_us_male.wav"]
    return read_audio(FIXTURES / "speech_en_us_male.wav"), meta["segments"]


def _random_state(rng: np.random.Generator, **fixed) -> FaceState:
    values = dict(mouth_open=rng.uniform(), mouth_width=rng.uniform(), smile=rng.uniform(-1, 1),
                  blink=rng.uniform() * (rng.uniform() < 0.3), brow_raise=rng.uniform(),
                  dx=rng.uniform(-0.06, 0.06), dy=rng.uniform(-0.05, 0.05), roll=rng.uniform(-8, 8),
                  scale=rng.uniform(0.9, 1.1))
    return FaceState(**{**values, **fixed})


def _inside(inner, outer) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


# ---------------------------------------------------------------------------------------------
# Renderer


def test_render_is_deterministic_and_caches_change_nothing():
    from avatar.drawn import face

    idt, st = Identity.from_seed(42), FaceState(mouth_open=0.6, smile=0.3, roll=4.0, dx=0.02)
    a, info_a = render(idt, st)
    face._geometry.cache_clear()
    face._background.cache_clear()
    b, info_b = render(Identity.from_seed(42), st)
    assert a.dtype == np.uint8 and a.shape == (128, 128, 3)
    assert np.array_equal(a, b) and info_a == info_b


def test_different_seeds_are_different_faces():
    imgs = [render(Identity.from_seed(s))[0].astype(np.int16) for s in range(12)]
    diffs = [np.abs(imgs[i] - imgs[j]).mean() for i in range(12) for j in range(i + 1, 12)]
    assert min(diffs) > 8.0, min(diffs)  # mean |difference| in grey levels, every pair
    styles = {Identity.from_seed(s).hair_style for s in range(60)}
    assert len(styles) >= len(HAIR_STYLES) - 1
    with pytest.raises(ValueError, match="non-negative integer"):
        Identity.from_seed(-1)


def test_any_size_and_state_validation():
    img, info = render(Identity.from_seed(3), NEUTRAL, size=(96, 160))
    assert img.shape == (96, 160, 3)
    assert _inside(info.mouth_box, info.face_box) and _inside(info.eyes_box, info.face_box)
    with pytest.raises(ValueError, match="mouth_open"):
        FaceState(mouth_open=1.5)
    with pytest.raises(ValueError, match="size"):
        render(Identity.from_seed(3), NEUTRAL, size=(8, 8))
    st = FaceState(mouth_open=0.25, smile=-0.5, roll=3.0)
    assert st.as_array().shape == (len(STATE_FIELDS),)
    assert np.allclose(FaceState.from_array(st.as_array()).as_array(), st.as_array())


def test_boxes_follow_the_head_pose():
    idt = Identity.from_seed(11)
    _, rest = render(idt, NEUTRAL)
    _, moved = render(idt, FaceState(dx=0.1, dy=-0.05))
    for a, b in ((rest.face_box, moved.face_box), (rest.mouth_box, moved.mouth_box)):
        assert abs((b[0] - a[0]) - 12.8) <= 1 and abs((b[2] - a[2]) - 12.8) <= 1  # 0.1 * 128 px right
        assert abs((b[1] - a[1]) + 6.4) <= 1 and abs((b[3] - a[3]) + 6.4) <= 1  # 0.05 * 128 px up
    _, big = render(idt, FaceState(scale=1.2))
    width = lambda box: box[2] - box[0]  # noqa: E731
    assert abs(width(big.face_box) / width(rest.face_box) - 1.2) < 0.05
    _, rolled = render(idt, FaceState(roll=15.0))  # clockwise about the neck: the face swings right
    centre = lambda box: (box[0] + box[2]) / 2  # noqa: E731
    assert centre(rolled.mouth_box) > centre(rest.mouth_box) + 2
    assert centre(rolled.eyes_box) - centre(rest.eyes_box) > centre(rolled.mouth_box) - centre(rest.mouth_box)


def test_mouth_box_holds_every_mouth_and_ignores_the_mouth_state():
    rng = np.random.default_rng(0)
    for seed in range(12):
        idt = Identity.from_seed(seed)
        pose = dict(dx=rng.uniform(-0.05, 0.05), roll=rng.uniform(-8, 8), scale=rng.uniform(0.9, 1.1))
        closed, info = render(idt, FaceState(**pose))
        for mouth in (dict(mouth_open=1.0, mouth_width=1.0, smile=1.0), dict(mouth_open=1.0, smile=-1.0),
                      dict(mouth_open=0.5, mouth_width=0.0)):
            img, other = render(idt, FaceState(**pose, **mouth))
            assert other.mouth_box == info.mouth_box and other.face_box == info.face_box
            diff = np.abs(img.astype(int) - closed).max(axis=2) > 8
            diff[: info.eyes_box[3]] = False  # a smile also squints the eyes and a frown lifts the brows
            changed = np.argwhere(diff)  # (row, col)
            assert changed.size, "the mouth state changed nothing"
            x0, y0, x1, y1 = info.mouth_box
            assert changed[:, 1].min() >= x0 and changed[:, 1].max() < x1
            assert changed[:, 0].min() >= y0 and changed[:, 0].max() < y1


def test_pair_scene_boxes_are_disjoint_and_halves_match_single_renders():
    a, b = Identity.from_seed(5), Identity.from_seed(6)
    sa, sb = FaceState(mouth_open=0.7, dx=0.04), FaceState(smile=0.5, dx=-0.04)
    scene, (ia, ib) = render_pair(a, sa, b, sb, size=(128, 256))
    assert scene.shape == (128, 256, 3)
    assert ia.face_box[2] <= 128 <= ib.face_box[0] and ia.mouth_box[2] <= ib.mouth_box[0]
    assert np.array_equal(scene[:, :128], render(a, sa)[0]) and np.array_equal(scene[:, 128:], render(b, sb)[0])
    with pytest.raises(ValueError, match="even width"):
        render_pair(a, sa, b, sb, size=(128, 255))


# ---------------------------------------------------------------------------------------------
# Probes


def test_mouth_opening_probe_tracks_the_true_opening():
    rng = np.random.default_rng(1)
    truth, measured = [], []
    for _ in range(150):
        idt = Identity.from_seed(int(rng.integers(10**6)))
        st = _random_state(rng)
        img, info = render(idt, st)
        truth.append(st.mouth_open)
        measured.append(mouth_opening(img, info.mouth_box))
    r = np.corrcoef(truth, measured)[0, 1]
    assert r >= 0.95, r


def test_corner_lift_orders_happy_neutral_sad():
    rng = np.random.default_rng(2)
    for i in range(30):
        idt = Identity.from_seed(int(rng.integers(10**6)))
        pose = dict(dx=rng.uniform(-0.05, 0.05), dy=rng.uniform(-0.04, 0.04), roll=rng.uniform(-8, 8),
                    scale=rng.uniform(0.9, 1.1), mouth_open=rng.uniform(0, 1) if i % 2 else 0.0)
        lifts = []
        for emotion in ("happy", "neutral", "sad"):
            e = rest_state(emotion)
            img, info = render(idt, FaceState(**pose, smile=e.smile, mouth_width=e.mouth_width))
            lifts.append(mouth_corner_lift(img, info.mouth_box))
        assert lifts[0] > lifts[1] > lifts[2], (i, lifts)
    idt = Identity.from_seed(9)  # the AEM references order the same way
    box = render(idt)[1].mouth_box
    refs = [mouth_corner_lift(emotion_reference(idt, e), box) for e in ("happy", "neutral", "sad")]
    assert refs[0] > refs[1] > refs[2]


def test_psnr():
    a = np.zeros((8, 8, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255  # mse = 255^2 / 192
    assert psnr(a, a) == float("inf")
    assert psnr(a, b) == pytest.approx(10 * np.log10(192))
    with pytest.raises(ValueError, match="same-shape"):
        psnr(a, a[:4])


# ---------------------------------------------------------------------------------------------
# Animation


def test_mouth_is_closed_in_silence_and_open_in_speech(speech):
    wav, segments = speech
    states = animate(wav, identity_seed=1, motion=0.5, seed=0)
    opening = np.array([s.mouth_open for s in states])
    assert len(states) == -(-wav.size // 640)
    gate = speech_gate(wav, len(states), 640)
    assert 0 < gate.sum() < gate.size and np.all(opening[gate == 0] == 0.0)
    for seg in segments:
        first, last = int(np.ceil(seg["start_ms"] / 40)), int(seg["end_ms"] // 40)  # frames inside
        if seg["kind"] == "pause":  # after the VAD's 200 ms hangover the mouth is shut
            assert np.all(opening[first + 6: last] == 0.0), seg
        else:
            assert opening[first:last].mean() > 0.3, seg


def test_opening_follows_the_envelope_with_zero_lag(speech):
    wav, _ = speech
    opening = np.array([s.mouth_open for s in animate(wav, identity_seed=2, seed=1)])
    level = frame_dbfs(wav, opening.size, 640)
    assert np.corrcoef(opening, level)[0, 1] > 0.8
    inner = slice(10, -10)
    xcorr = {lag: np.corrcoef(np.roll(opening, lag)[inner], level[inner])[0, 1] for lag in range(-4, 5)}
    assert max(xcorr, key=xcorr.get) == 0, xcorr


def test_opening_is_zero_phase_on_symmetric_bursts():
    """Voiced bursts with symmetric envelopes centred on frames 20, 45, 70: the opening peaks on
    those frames and is symmetric about them (a causal smoother would push its centroid later)."""
    t = np.arange(16000 * 4) / 16000
    voiced = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 20))
    centres = (20, 45, 70)
    env = sum(np.exp(-0.5 * ((t - (c + 0.5) * 0.04) / 0.08) ** 2) for c in centres)
    opening = np.array([s.mouth_open for s in animate((0.25 * env * voiced).astype(np.float32), 0)])
    for c in centres:
        window = np.arange(c - 10, c + 11)
        assert int(window[np.argmax(opening[window])]) == c
        centroid = float((opening[window] * window).sum() / opening[window].sum())
        assert abs(centroid - c) < 0.2, (c, centroid)


def test_mouth_width_is_its_own_signal(speech):
    wav, _ = speech
    states = animate(wav, identity_seed=3)
    opening = np.array([s.mouth_open for s in states])
    width = np.array([s.mouth_width for s in states])
    talking = opening > 0.2
    assert width[talking].std() > 0.08
    assert abs(np.corrcoef(width[talking], opening[talking])[0, 1]) < 0.8
    assert np.all(width[opening == 0] == pytest.approx(0.5))  # a shut mouth rests at mid width


def test_motion_zero_is_perfectly_still_and_motion_moves(speech):
    wav, _ = speech
    still = animate(wav, identity_seed=4, motion=0.0, seed=5)
    assert all(s.dx == 0 and s.dy == 0 and s.roll == 0 and s.scale == 1.0 for s in still)
    moving = animate(wav, identity_seed=4, motion=1.0, seed=5)
    assert np.std([s.roll for s in moving]) > 1.0 and np.std([s.dx for s in moving]) > 0.005
    rolls = np.array([s.roll for s in moving])
    assert np.abs(np.diff(rolls)).max() < 1.5  # smooth: < 1.5 degrees per frame
    assert [s.mouth_open for s in still] == [s.mouth_open for s in moving]  # motion never touches the mouth


def test_blinks_happen_every_two_to_six_seconds():
    silence = np.zeros(16_000 * 60, np.float32)
    blink = np.array([s.blink for s in animate(silence, identity_seed=0, seed=7)])
    assert np.all(np.array([s.mouth_open for s in animate(silence, 0, seed=7)]) == 0)
    closed = np.flatnonzero(blink == 1.0)
    assert 10 <= closed.size <= 30  # 60 s at one blink per 2-6 s
    gaps = np.diff(closed) / 25.0
    assert gaps.min() >= 2.0 - 0.04 and gaps.max() <= 6.0 + 0.04
    for f in closed:  # each blink is ~150 ms: at most 2 frames before and 3 after the closed one are partly shut
        assert np.count_nonzero(blink[max(f - 3, 0): f + 4] > 0) <= 5
    assert not any(s.blink for s in animate(silence[:16000 * 10], 0, seed=7, blinks=False))


def test_emotions_and_determinism(speech):
    wav, _ = speech
    by = {e: animate(wav[:32000], 5, emotion=e, seed=1) for e in EMOTIONS}
    assert by["happy"][0].smile > 0 > by["sad"][0].smile and by["neutral"][0].smile == 0
    assert by["surprised"][0].brow_raise > 0.5 > by["neutral"][0].brow_raise
    again = animate(wav[:32000], 5, emotion="happy", seed=1)
    assert again == by["happy"]
    silence = np.zeros(16000 * 20, np.float32)
    assert [s.blink for s in animate(silence, 5, seed=2)] != [s.blink for s in animate(silence, 5, seed=3)]
    with pytest.raises(ValueError, match="unknown emotion"):
        animate(wav, 5, emotion="angry")


# ---------------------------------------------------------------------------------------------
# Clips and storage


def test_make_clip_and_store_round_trip(speech, tmp_path):
    wav = speech[0][: 16000 * 2]
    clip = make_clip(wav, identity_seed=8, motion=0.5, emotion="happy", seed=3)
    assert clip.frames.shape == (50, 128, 128, 3) and clip.states.shape == (1, 50, len(STATE_FIELDS))
    assert np.array_equal(clip.reference, render(Identity.from_seed(8))[0])
    assert np.array_equal(clip.emotion_reference, emotion_reference(8, "happy"))
    assert np.array_equal(make_clip(wav, 8, 0.5, "happy", seed=3).frames, clip.frames)
    store = ClipStore(tmp_path / "clips")
    store.write("c1", clip)
    back = store.read("c1")
    for name in ("frames", "audio", "states", "face_boxes", "mouth_boxes", "reference", "emotion_reference"):
        assert np.array_equal(getattr(back, name), getattr(clip, name)), name
    assert (back.identity_seeds, back.emotions, back.motion, back.seed) == ((8,), ("happy",), 0.5, 3)
    assert store.keys() == ["c1"] and "c1" in store and len(store) == 1
    assert not [p for p in (tmp_path / "clips").iterdir() if p.name.startswith(".")]  # no temp files left
    with pytest.raises(KeyError):
        store.read("missing")
    with pytest.raises(ValueError, match="bad clip key"):
        store.path("../escape")


def test_pair_clip_drives_each_face_with_its_own_audio(speech, tmp_path):
    wav = speech[0][: 16000 * 3]
    clip = make_pair_clip(wav, np.zeros(8000, np.float32), seed_a=1, seed_b=2, motion=0.0)
    assert clip.frames.shape == (75, 128, 256, 3) and clip.audio.shape == (2, wav.size)
    assert np.all(clip.states[1, :, STATE_FIELDS.index("mouth_open")] == 0)
    probe = [[mouth_opening(f, box) for f, box in zip(clip.frames, clip.mouth_boxes[k], strict=True)]
             for k in range(2)]
    assert np.var(probe[1]) <= 0.1 * np.var(probe[0]) and np.var(probe[0]) > 0  # the FAA metric on the teacher
    assert np.all(clip.face_boxes[0, :, 2] <= clip.face_boxes[1, :, 0])
    ClipStore(tmp_path).write("pair", clip)
    assert ClipStore(tmp_path).read("pair").num_faces == 2


# ---------------------------------------------------------------------------------------------
# Corpus


def test_held_out_split_shares_no_voice_and_no_sentence():
    train_v, held_v = set(corpus.voices("train")), set(corpus.voices("heldout"))
    assert held_v and not train_v & held_v
    for v in train_v:  # neither the accent nor the timbre of a held-out voice is heard in training
        base, _, variant = v.partition("+")
        assert base not in corpus.HELD_OUT_BASES and "+" + variant not in corpus.HELD_OUT_VARIANTS
    train_s, held_s = corpus.sentences("train"), corpus.sentences("heldout")
    assert len(corpus.ENGLISH) >= 200 and len(set(corpus.ENGLISH)) == len(corpus.ENGLISH)
    assert len(held_s) >= 20 and not set(train_s) & set(held_s) and not set(train_s.values()) & set(held_s.values())
    plans = [corpus.plan_clip(seed=3, index=i) for i in range(400)]
    for split, voices, sents in (("train", train_v, None), ("heldout", held_v, held_s)):
        mine = [p for p in plans if p["split"] == split]
        assert mine and all(p["voice"] in voices for p in mine)
        if sents is not None:
            assert all(s in sents for p in mine for s in p["sentence_ids"])
    assert all(not set(p["sentence_ids"]) & set(held_s) for p in plans if p["split"] == "train")
    assert {p["language"] for p in plans} > {"en"}  # other languages appear in training
    assert corpus.plan_clip(3, 17) == corpus.plan_clip(3, 17)


def test_clip_plans_keep_held_out_identities_apart():
    clips = [corpus.CorpusClip(clip_id=f"clip_{i:06d}", split="heldout" if i % 4 == 0 else "train", path="",
                               voice="en-us", language="en", rate=170, pitch=50, sentence_ids=(), segments=(),
                               num_samples=0) for i in range(80)]
    split_of = {c.clip_id: c.split for c in clips}
    plans = plan_clips(clips, seed=1, pair_fraction=0.3)
    assert any(len(p.corpus_clips) == 2 for p in plans)
    for p in plans:
        held = p.split == "heldout"
        assert all((s >= HELD_OUT_IDENTITY_BASE) == held for s in p.identity_seeds)
        assert all(split_of[c] == p.split for c in p.corpus_clips)


def test_listener_scenes_have_their_own_plans_and_one_silent_face(speech, tmp_path):
    clips = [corpus.CorpusClip(clip_id=f"clip_{i:06d}", split="heldout" if i % 4 == 0 else "train",
                               path=f"wavs/clip_{i:06d}.wav", voice="en-us", language="en", rate=170, pitch=50,
                               sentence_ids=(), segments=(), num_samples=0) for i in range(40)]
    assert plan_listeners(clips, seed=1) == []  # off by default: the shipped plans are unchanged
    plans = plan_listeners(clips, seed=1, fraction=0.5)
    assert plans == plan_listeners(clips, seed=1, fraction=0.5) and 10 <= len(plans) <= 30
    assert {p.silent for p in plans} == {0, 1} and all(p.key == LISTENER_PREFIX + p.corpus_clips[0] for p in plans)
    assert all((s >= HELD_OUT_IDENTITY_BASE) == (p.split == "heldout") for p in plans for s in p.identity_seeds)
    assert all(p.silent is None for p in plan_clips(clips, seed=1, pair_fraction=0.3))

    # one corpus clip, stored: the listener scene's silent face hears nothing and never opens its mouth
    (tmp_path / "corpus" / "wavs").mkdir(parents=True)
    sf.write(tmp_path / "corpus" / "wavs" / "clip_000000.wav", speech[0][:16000 * 2], 16000)
    index = {"clips": [dataclasses.asdict(dataclasses.replace(clips[0], split="train"))]}
    (tmp_path / "corpus" / "index.json").write_text(json.dumps(index))
    store = ClipStore(tmp_path / "clips")
    plans = build_clip_store(tmp_path / "corpus", store, seed=3, size=(64, 64), listener_fraction=1.0)
    listener = next(p for p in plans if p.silent is not None)
    clip = store.read(listener.key)
    silent, speaking = listener.silent, 1 - listener.silent
    assert clip.frames.shape[1:] == (64, 128, 3) and not clip.audio[silent].any() and clip.audio[speaking].any()
    mouth = STATE_FIELDS.index("mouth_open")
    assert np.all(clip.states[silent, :, mouth] == 0) and clip.states[speaking, :, mouth].max() > 0.3
    assert json.loads((store.root / "plans.json").read_text())[-1]["silent"] == silent


def test_ensure_espeak_reports_a_missing_binary(monkeypatch):
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    with pytest.raises(corpus.EspeakUnavailable, match="apt-get install -y espeak-ng"):
        corpus.ensure_espeak(install=False)
    with pytest.raises(corpus.EspeakUnavailable, match="no apt-get"):
        corpus.ensure_espeak(install=True)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_build_corpus_with_espeak(tmp_path):
    assert not np.array_equal(corpus.synthesize("Hello there.", "en-us"), corpus.synthesize("Hello there.", "en-us+f2"))
    clips = corpus.build_corpus(tmp_path, 3, seed=4, workers=2)
    assert [c.clip_id for c in clips] == ["clip_000000", "clip_000001", "clip_000002"]
    for c in clips:
        wav = read_audio(tmp_path / c.path)
        assert wav.size == c.num_samples and len(c.segments) == len(c.sentence_ids)
        speech = np.concatenate([wav[a:b] for a, b, _ in c.segments])
        assert 10 * np.log10(np.mean(speech.astype(np.float64) ** 2)) == pytest.approx(corpus.SPEECH_DBFS, abs=1.0)
        for (_, end, _), (start, _, _) in zip(c.segments, c.segments[1:]):
            assert 0.2 * 16000 - 2 <= start - end <= 1.0 * 16000 + 2 and np.abs(wav[end:start]).max() < 1e-3
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.wav")}
    assert corpus.build_corpus(tmp_path, 3, seed=4) == clips  # resumed: nothing re-synthesised
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.wav")}
    assert [c.clip_id for c in corpus.read_index(tmp_path)] == [c.clip_id for c in clips]
    with pytest.raises(ValueError, match="was built with"):
        corpus.build_corpus(tmp_path, 3, seed=5)


def test_flite_reads_held_out_sentences_at_the_corpus_level():
    """The held-out engine family's clips: flite voices in turn, speech at SPEECH_DBFS, nothing clipped."""
    if shutil.which("flite") is None:
        pytest.skip("flite is not installed (`apt-get install -y flite`); eval demo installs it when asked")
    from training.corpus import SPEECH_DBFS
    from training.engines import flite_held_out_speech, synthesize_flite

    clips = flite_held_out_speech(2, install=False)
    assert len(clips) == 2 and all(c.dtype == np.float32 and c.size > 3 * 16_000 for c in clips)
    for c in clips:
        loud = c[np.abs(c) > 1e-3]
        assert abs(20 * np.log10(np.sqrt(np.mean(loud.astype(np.float64) ** 2))) - SPEECH_DBFS) < 3
        assert np.abs(c).max() < 0.99
    assert not np.allclose(clips[0][:16_000], clips[1][:16_000])  # another voice, other sentences
    with pytest.raises(ValueError, match="non-empty"):
        synthesize_flite("  ")
