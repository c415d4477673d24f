"""More varied speech for the demo model: mbrola voices in the corpus, music under the speech."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from training import corpus
from training.dataset import plan_clips

RATE = 16_000


def _speech(seconds: float = 2.0, pause: tuple[float, float] | None = (0.8, 1.2)) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    x = (0.1 * np.sin(2 * np.pi * 170 * t) * (np.sin(2 * np.pi * 3 * t) > 0)).astype(np.float32)
    if pause:
        x[int(pause[0] * RATE): int(pause[1] * RATE)] = 0.0
    return x


# ---------------------------------------------------------------------------------------------
# mbrola in the corpus


def test_mbrola_clips_have_their_own_indices_so_the_espeak_plans_never_change():
    assert corpus.engine_of(0) == corpus.engine_of(99_999) == "espeak-ng"
    assert corpus.engine_of(corpus.ENGINE_FIRST_INDEX["mbrola"]) == "mbrola"
    espeak = [corpus.plan_clip(3, i) for i in range(200)]
    assert {p["engine"] for p in espeak} == {"espeak-ng"} and not any(p["voice"].startswith("mb-") for p in espeak)
    first = corpus.ENGINE_FIRST_INDEX["mbrola"]
    mbrola = [corpus.plan_clip(3, first + i) for i in range(300)]
    assert {p["engine"] for p in mbrola} == {"mbrola"}
    assert all(p["voice"] in corpus.MBROLA_VOICES for p in mbrola)
    assert mbrola[0]["clip_id"] == f"clip_{first:06d}"
    # the held-out mbrola voice reads held-out sentences only, and no train clip uses it
    held = [p for p in mbrola if p["split"] == "heldout"]
    assert held and {p["voice"] for p in held} <= set(corpus.MBROLA_HELD_OUT)
    assert all(s in corpus.sentences("heldout") for p in held for s in p["sentence_ids"])
    train = [p for p in mbrola if p["split"] == "train"]
    assert not {p["voice"] for p in train} & set(corpus.MBROLA_HELD_OUT)
    assert not {s for p in train for s in p["sentence_ids"]} & set(corpus.sentences("heldout"))
    # each voice reads text in its own language (native voices) or English (the -en voices)
    for p in mbrola:
        assert p["language"] == corpus.MBROLA_VOICES[p["voice"]]
        assert all(s.startswith(p["language"] + "-") for s in p["sentence_ids"])
    assert {p["language"] for p in train} > {"en"}
    assert corpus.mbrola_database("mb-de1-en") == "de1" and corpus.mbrola_database("mb-us3") == "us3"
    with pytest.raises(ValueError, match="unknown mbrola voice"):
        corpus.mbrola_database("mb-xx9")
    with pytest.raises(ValueError, match="unknown engine"):
        corpus.voices("train", "festival")


def test_pairs_take_face_b_from_the_same_engine_and_adding_an_engine_keeps_the_old_plans():
    def clip(i: int, engine: str) -> corpus.CorpusClip:
        return corpus.CorpusClip(clip_id=f"clip_{i:06d}", split="heldout" if i % 5 == 0 else "train", path="",
                                 voice="en-us", language="en", rate=170, pitch=50, sentence_ids=(), segments=(),
                                 num_samples=0, engine=engine)

    espeak = [clip(i, "espeak-ng") for i in range(60)]
    mbrola = [clip(100_000 + i, "mbrola") for i in range(40)]
    before = plan_clips(espeak, seed=2, pair_fraction=0.4)
    after = plan_clips(espeak + mbrola, seed=2, pair_fraction=0.4)
    assert after[:len(before)] == before
    engine = {c.clip_id: c.engine for c in espeak + mbrola}
    pairs = [p for p in after if len(p.corpus_clips) == 2]
    assert any(engine[p.corpus_clips[0]] == "mbrola" for p in pairs)
    assert all(engine[a] == engine[b] for a, b in (p.corpus_clips for p in pairs))


def test_the_shipped_models_corpus_plans_never_change():
    """The demo model trained on these 400 espeak-ng and 120 mbrola plans: a new family must not move them."""
    import hashlib
    import json

    plans = [corpus.plan_clip(0, i) for i in range(400)] + [corpus.plan_clip(0, 100_000 + i) for i in range(120)]
    digest = hashlib.sha256(json.dumps(plans).encode()).hexdigest()
    assert digest == "c573e41f3cfdf1a2ffa605179790892540df9522085b3abe46b4157fd8c1b08c"


def test_every_espeak_voice_and_variant_is_a_family_of_its_own():
    from training.espeak_voices import ESPEAK_LANGUAGES, ESPEAK_VARIANTS

    first = corpus.ENGINE_FIRST_INDEX["espeak-ng-all"]
    assert corpus.engine_of(first - 1) == "mbrola" and corpus.engine_of(first) == "espeak-ng-all"
    pool = set(corpus.voices("train", "espeak-ng-all"))
    assert pool == {b + v for b in ESPEAK_LANGUAGES if b not in corpus.HELD_OUT_BASES
                    for v in ("", *ESPEAK_VARIANTS) if v not in corpus.HELD_OUT_VARIANTS}
    assert len(ESPEAK_LANGUAGES) == 130 and len(ESPEAK_VARIANTS) == 101 and set(corpus.ENGLISH_BASES) <= set(
        ESPEAK_LANGUAGES)
    assert corpus.voices("heldout", "espeak-ng-all") == corpus.voices("heldout")  # the same unheard voices
    plans = [corpus.plan_clip(0, first + i) for i in range(400)]
    train = [p for p in plans if p["split"] == "train"]
    assert {p["engine"] for p in plans} == {"espeak-ng-all"}
    bases = [p["voice"].split("+")[0] for p in train]
    assert len(set(bases)) > 80 and len({p["voice"].partition("+")[2] for p in train}) > 80
    english = sum(b in corpus.ENGLISH_BASES for b in bases) / len(bases)
    assert 0.4 < english < 0.7  # half the draws are English voices, the rest any language (English among them)
    for p in train:  # a language the corpus has text in reads it; every other one reads the English sentences
        base = p["voice"].split("+")[0]
        assert p["language"] == (base if base in corpus.OTHER_LANGUAGES else "en")
        assert all(s.startswith(p["language"] + "-") for s in p["sentence_ids"])
        assert not set(p["sentence_ids"]) & set(corpus.sentences("heldout"))
    held = [p for p in plans if p["split"] == "heldout"]
    assert held and {p["voice"] for p in held} <= set(corpus.voices("heldout"))


@pytest.mark.skipif(not corpus.shutil.which("espeak-ng"), reason="espeak-ng not installed")
def test_every_listed_voice_and_variant_is_one_espeak_ng_has_and_a_variant_changes_the_voice():
    import subprocess

    from training.espeak_voices import ESPEAK_LANGUAGES, ESPEAK_VARIANTS

    listed = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True, check=True).stdout
    if "1.51" in subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout:
        assert [f"+{line.split()[4].removeprefix('!v/')}" for line in listed.splitlines()[1:]] == list(ESPEAK_VARIANTS)
    plans = [corpus.plan_clip(0, corpus.ENGINE_FIRST_INDEX["espeak-ng-all"] + i) for i in range(6)]
    for voice in ("fr+f2", "chr+klatt", *(p["voice"] for p in plans)):
        base, _, variant = voice.partition("+")
        assert base in ESPEAK_LANGUAGES and "+" + variant in ESPEAK_VARIANTS
        plain, varied = (corpus.synthesize("The quick brown fox.", v) for v in (base, voice))
        assert np.sqrt(np.mean(varied ** 2)) > 1e-3, voice
        n = min(plain.size, varied.size)
        assert plain.size != varied.size or not np.allclose(plain[:n], varied[:n]), f"{voice}: variant ignored"


def test_missing_mbrola_voices_are_named_with_their_debian_packages(monkeypatch, tmp_path):
    monkeypatch.setattr(corpus.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(corpus, "MBROLA_DIR", tmp_path)  # no databases installed
    (tmp_path / "us1").mkdir()
    corpus.ensure_mbrola(("mb-us1",), install=False)  # installed: nothing to do
    with pytest.raises(corpus.ToolUnavailable, match=r"install -y mbrola-de1 mbrola-us3`.*contrib"):
        corpus.ensure_mbrola(("mb-us1", "mb-us3", "mb-de1-en"), install=False)
    monkeypatch.setattr(corpus.shutil, "which", lambda name: None if name == "mbrola" else f"/usr/bin/{name}")
    with pytest.raises(corpus.ToolUnavailable, match=r"install -y mbrola mbrola-us3`"):  # the program too
        corpus.ensure_mbrola(("mb-us1", "mb-us3"), install=False)


def _mbrola_ready() -> bool:
    try:
        corpus.ensure_mbrola(install=False)
    except corpus.ToolUnavailable:
        return False
    return True


@pytest.mark.skipif(not _mbrola_ready(), reason="mbrola and its voices are not installed "
                    "(apt-get install mbrola mbrola-us1 ..., Debian contrib: training.corpus.ensure_mbrola)")
def test_mbrola_voices_speak_through_espeak_and_build_their_share_of_the_corpus(tmp_path):
    a = corpus.synthesize("Hello there, how are you?", "mb-us1")
    b = corpus.synthesize("Hello there, how are you?", "en-us")
    assert a.dtype == np.float32 and a.size > 0.8 * RATE and np.abs(a).max() > 0.05
    assert a.size != b.size or not np.allclose(a, b, atol=1e-2)  # another engine's waveform
    clips = corpus.build_corpus(tmp_path, 4, seed=4, engine="mbrola")
    assert [c.clip_id for c in clips] == [f"clip_{100_000 + i:06d}" for i in range(4)]
    for c in clips:
        assert c.engine == "mbrola" and c.voice in corpus.MBROLA_VOICES
        wav = corpus.read_audio(tmp_path / c.path)
        speech = np.concatenate([wav[a:b] for a, b, _ in c.segments])
        assert 10 * np.log10(np.mean(speech.astype(np.float64) ** 2)) == pytest.approx(corpus.SPEECH_DBFS, abs=1.0)
    assert corpus.build_corpus(tmp_path, 2, seed=4) != clips  # espeak-ng's clips join the same index
    assert {c.engine for c in corpus.read_index(tmp_path)} == {"espeak-ng", "mbrola"}


# ---------------------------------------------------------------------------------------------
# music under speech


def test_music_plays_under_the_speech_and_through_its_pauses_at_the_set_level():
    from training.augment import MUSIC_SNR_DB, music

    x = _speech(4.0)
    y = music(x, np.random.default_rng(3))
    assert y.shape == x.shape and y.dtype == np.float32 and np.isfinite(y).all()
    np.testing.assert_array_equal(y, music(x, np.random.default_rng(3)))
    m = (y - x).astype(np.float64)
    pause = slice(int(0.85 * RATE), int(1.15 * RATE))
    assert np.sqrt(np.mean(m[pause] ** 2)) > 1e-4  # the pause is no longer silent
    loud = np.abs(x) > 1e-3
    snr = 20 * np.log10(np.sqrt(np.mean(x[loud].astype(np.float64) ** 2)) / np.sqrt(np.mean(m ** 2)))
    assert MUSIC_SNR_DB[0] - 0.5 <= snr <= MUSIC_SNR_DB[1] + 0.5
    # it is pitched: most of its energy sits in a few spectral peaks, unlike noise
    spectrum = np.abs(np.fft.rfft(m[: 2 * RATE] * np.hanning(2 * RATE))) ** 2
    top = np.sort(spectrum)[::-1]
    assert top[: spectrum.size // 100].sum() > 0.5 * spectrum.sum()
    assert not np.allclose(m, music(x, np.random.default_rng(4)) - x)  # another piece
    silent = music(np.zeros(RATE, np.float32), np.random.default_rng(0))  # silence: music at a typical level
    assert 1e-3 < np.sqrt(np.mean(silent.astype(np.float64) ** 2)) < 0.1


def test_variants_from_the_music_one_on_add_music_and_a_store_is_completed_in_place(tmp_path):
    from audio.features.mel import MelConfig, MelFeatures
    from training.augment import (AUGMENTATIONS, MUSIC_FROM_VARIANT, AugmentedFeatures, augmented_features,
                                  build_augmented, clip_seed, variant_names)
    from training.latents import LatentClip, LatentStore

    for v in range(6):
        names = variant_names(11, v)
        assert (names[0] == "music") == (v >= MUSIC_FROM_VARIANT) and set(names[-2:]) <= set(AUGMENTATIONS)
    assert variant_names(11, 0) == variant_names(11, 0)
    assert clip_seed(0, "clip_000001") == clip_seed(0, "clip_000001") != clip_seed(0, "clip_000002")

    feats = MelFeatures(MelConfig(n_mels=32))
    speech = np.stack([_speech(2.0), _speech(2.0, pause=None)])
    all5 = augmented_features(feats, speech, 51, variants=5, seed=7)
    tail = augmented_features(feats, speech, 51, variants=5, seed=7, first=3)
    assert all5.shape == (5, 2, 51, 32) and np.array_equal(all5[3:], tail)
    np.testing.assert_array_equal(all5[:3], augmented_features(feats, speech, 51, variants=3, seed=7))
    # the music variants hear something in face 0's pause, where the plain variants' features stay near silence
    pause = slice(22, 28)
    plain = [v for v in range(3) if "noise" not in variant_names(7, v)]  # seed 7: variants 0 and 1
    assert plain and all5[3:, 0, pause].mean() > max(all5[v, 0, pause].mean() for v in plain)

    # a store of 3-variant files gets variants 3-4 appended, 0-2 kept as they were
    class Clips:  # what build_augmented reads of a clip store: each clip's per-face audio
        def read(self, key):
            return SimpleNamespace(audio=speech[:1])

    latents, out = LatentStore(tmp_path / "lat"), AugmentedFeatures(tmp_path / "aug")
    rng = np.random.default_rng(0)
    for key, split in (("clip_000001", "train"), ("clip_000002", "heldout")):
        latents.write(key, LatentClip(latents=rng.standard_normal((4, 14, 2, 2)).astype(np.float16),
                                      emotion=rng.standard_normal((4, 1, 2, 2)).astype(np.float16),
                                      features=np.zeros((1, 51, 32), np.float32), masks=np.ones((1, 2, 2), np.float32),
                                      motion=0.0, emotions=("neutral",), split=split))
    assert build_augmented(Clips(), latents, feats, out, variants=3, seed=0) == 1  # held-out clips get none
    three = out.read("clip_000001")
    assert "clip_000002" not in out and three.shape == (3, 1, 51, 32)
    np.testing.assert_array_equal(three, augmented_features(feats, speech[:1], 51, 3, clip_seed(0, "clip_000001")))
    assert build_augmented(Clips(), latents, feats, out, variants=5, seed=0) == 1
    five = out.read("clip_000001")
    assert five.shape[0] == 5 and np.array_equal(five[:3], three)
    assert build_augmented(Clips(), latents, feats, out, variants=5, seed=0) == 0  # complete: nothing to do


@pytest.mark.skipif(corpus.shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_the_plan_builds_without_mbrola_unless_the_voices_round_needs_it(tmp_path, monkeypatch, caplog):
    """Stages 1-2 for real (espeak-ng clips, teacher video); mbrola as on a machine without Debian contrib."""
    import torch

    from training.demo import DemoPlan, run

    def unavailable(*_, **__):
        raise corpus.ToolUnavailable("mbrola is not installed (test)")

    monkeypatch.setattr(corpus, "ensure_mbrola", unavailable)
    threads = torch.get_num_threads()  # the plan sets torch's threads: keep the test process's
    plan = DemoPlan(out=tmp_path, clips=2, mbrola_clips=2, all_voices_clips=2, voices_steps=0, threads=threads)
    done = run(plan, budget_s=0.0)  # stops before the VAE
    assert done == {"corpus": {"espeak-ng": 2, "espeak-ng-all": 2}, "clips": 4, "stopped_in": "vae"}
    assert "no mbrola clips" in caplog.text
    with pytest.raises(corpus.ToolUnavailable, match="mbrola is not installed.*--voices-steps 0"):
        run(DemoPlan(out=tmp_path, clips=2, mbrola_clips=2, all_voices_clips=2, threads=threads), budget_s=0.0)
