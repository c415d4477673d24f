"""Fuzzing of what reads untrusted bytes: audio files into every decoder entry point (audio/io.py, the
render input path, the broadcast source decoder) and image bytes into avatar loading (decode, the
portrait prepare path, `avatar new` folders). Each target must give a result or a clear error of the
ValueError family (AudioReadError, AudioSourceError, AvatarError, ...); any other exception is a
finding, and so is a hang (tests run each example under a deadline, this script under a wall clock).

    python -m benchmarks.fuzz --seconds 300            # every target in turn until the time is up
    python -m benchmarks.fuzz --examples 2000 --target read_audio

Prints JSON: per target the examples run, the rounds, and each distinct failure (exception type and
message, how many rounds hit it, and hypothesis's falsifying example, shrunk and cut to 300 characters). The inputs are mutations of small valid seeds (bit flips,
cuts, splices, header integers set to edge values) and random bytes behind a format's magic number.
The test suite runs the same properties with a few dozen examples each (tests/fuzz/).
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

EDGE_INTS = (0, 1, 2, 0x7F, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
MAGICS = (b"RIFF\x24\x00\x00\x00WAVEfmt ", b"fLaC", b"OggS\x00\x02", b"ID3\x03\x00", b"\xff\xfb\x90\x00",
          b"\x00\x00\x00\x20ftypM4A ", b"FORM\x00\x00\x00\x00AIFF", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0",
          b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"GIF89a", b"BM", b"II*\x00")


# ---- seeds: small valid files --------------------------------------------------------------------------------
def _tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)
    return np.repeat(x[:, None], channels, axis=1)


@cache
def audio_seeds() -> dict[str, bytes]:
    """A few tenths of a second in each container and codec the readers meet."""
    import av
    import soundfile as sf

    seeds: dict[str, bytes] = {}
    for name, rate, channels, fmt, subtype in [
        ("wav_pcm16", 8000, 1, "WAV", "PCM_16"), ("wav_float_stereo", 44100, 2, "WAV", "FLOAT"),
        ("wav_u8", 11025, 1, "WAV", "PCM_U8"), ("flac", 16000, 1, "FLAC", "PCM_16"),
        ("ogg_vorbis", 22050, 2, "OGG", "VORBIS"), ("mp3", 16000, 1, "MP3", "MPEG_LAYER_III"),
        ("aiff", 16000, 1, "AIFF", "PCM_16"),
    ]:
        buf = io.BytesIO()
        sf.write(buf, _tone(0.25, rate, channels), rate, format=fmt, subtype=subtype)
        seeds[name] = buf.getvalue()
    for name, container, codec, rate in [("m4a_aac", "mp4", "aac", 24000), ("adts_aac", "adts", "aac", 16000),
                                         ("ogg_opus", "ogg", "libopus", 48000)]:
        buf = io.BytesIO()
        with av.open(buf, "w", format=container) as out:
            stream = out.add_stream(codec, rate=rate, layout="mono")
            pcm = (_tone(0.25, rate)[:, 0][None] * 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
            frame.sample_rate = rate
            for packet in [*stream.encode(frame), *stream.encode(None)]:
                out.mux(packet)
        seeds[name] = buf.getvalue()
    return seeds


@cache
def image_seeds() -> dict[str, bytes]:
    """The drawn avatar (it has a face) and small images in every format and colour mode Pillow meets."""
    from PIL import Image

    from app.avatars import stylised_avatar

    face = stylised_avatar(7, size=64).images["neutral"]
    rgb = np.asarray(Image.open(io.BytesIO(face)).convert("RGB"))
    seeds = {"png_face": face}
    img = Image.fromarray(rgb)
    for name, image, fmt, kw in [
        ("jpeg", img, "JPEG", {"quality": 80}), ("webp", img, "WEBP", {}), ("gif", img.convert("P"), "GIF", {}),
        ("bmp", img, "BMP", {}), ("tiff", img, "TIFF", {}), ("png_rgba", img.convert("RGBA"), "PNG", {}),
        ("png_l", img.convert("L"), "PNG", {}), ("png_i16", img.convert("I;16"), "PNG", {}),
    ]:
        buf = io.BytesIO()
        image.save(buf, format=fmt, **kw)
        seeds[name] = buf.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    seeds["jpeg_exif"] = buf.getvalue()
    return seeds


# ---- strategies -------------------------------------------------------------------------------------------------
def mutated(seeds: Callable[[], dict[str, bytes]]) -> st.SearchStrategy[bytes]:
    """A seed with a few bytes changed, cut short, spliced with noise or with a header integer set to an
    edge value; or noise behind a known magic number; or plain noise."""

    @st.composite
    def draw_bytes(draw) -> bytes:
        pool = seeds()
        kind = draw(st.sampled_from(["flip", "cut", "splice", "header", "magic", "noise"]))
        if kind == "noise":
            return draw(st.binary(max_size=2048))
        if kind == "magic":
            return draw(st.sampled_from(MAGICS)) + draw(st.binary(max_size=2048))
        data = bytearray(pool[draw(st.sampled_from(sorted(pool)))])
        if kind == "flip":
            for _ in range(draw(st.integers(1, 8))):
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[draw(st.integers(0, len(data) - 1)):]
        elif kind == "splice":
            at = draw(st.integers(0, len(data)))
            data[at:at + draw(st.integers(0, 256))] = draw(st.binary(max_size=256))
        else:  # a length, rate, size or count field set to an edge value, either byte order
            at = draw(st.integers(0, min(len(data), 96) - 4))
            order = draw(st.sampled_from("<>"))
            data[at:at + 4] = struct.pack(order + "I", draw(st.sampled_from(EDGE_INTS)))
        return bytes(data)

    return draw_bytes()


audio_bytes = mutated(audio_seeds)
image_bytes = mutated(image_seeds)


# ---- targets: input -> result or a ValueError-family error -------------------------------------------------------
@dataclass
class Workdir:
    """A private folder per run: each example is written to one file there (the readers take paths)."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="avatarcast-fuzz-")))

    def file(self, data: bytes, name: str = "input.bin") -> Path:
        path = self.root / name
        path.write_bytes(data)
        return path


def _check_pcm(pcm: np.ndarray) -> None:
    assert isinstance(pcm, np.ndarray) and pcm.dtype == np.float32 and pcm.ndim == 1, (type(pcm), pcm.dtype)
    assert np.isfinite(pcm).all(), "non-finite samples came out"


def audio_targets(work: Workdir) -> dict[str, Callable[[bytes], object]]:
    from app.render_worker import RenderSettings, open_input_audio
    from audio.io import audio_duration, read_audio, stream_audio
    from streaming.broadcast_sources import TRUSTED, check_audio_source, decode_audio

    def read(data: bytes):
        _check_pcm(read_audio(work.file(data)))

    def read_truncated_48k(data: bytes):
        _check_pcm(read_audio(work.file(data), sample_rate=48000, allow_truncated=True))

    def stream(data: bytes):
        for block in stream_audio(work.file(data), sample_rate=48000, block_s=0.1, max_duration_s=60):
            _check_pcm(block)

    def duration(data: bytes):
        d = audio_duration(work.file(data))
        assert d is None or (isinstance(d, float) and d >= 0), d

    def render_input(data: bytes):
        feed, _ = open_input_audio(str(work.file(data)), RenderSettings(max_duration_s=60))
        feed.pull_until(None)
        assert feed.decoded == feed.taken + sum(b.size for b in feed.pending)

    def broadcast_source(data: bytes):
        source = check_audio_source(str(work.file(data)), TRUSTED)
        for chunks, (pcm, fmt, samples) in enumerate(decode_audio(source, TRUSTED)):
            assert isinstance(pcm, np.ndarray) and samples >= 0 and fmt.sample_rate > 0
            if chunks > 2000:  # a few seconds at most in a seed-sized file: stop, it has been read
                break

    return {"read_audio": read, "read_audio_truncated_48k": read_truncated_48k, "stream_audio": stream,
            "audio_duration": duration, "render_input": render_input, "broadcast_source": broadcast_source}


def image_targets(work: Workdir, engine=None) -> dict[str, Callable[[bytes], object]]:
    """Image targets; `engine` (an AvatarEngine) adds the `avatar new` folder path, which encodes latents."""
    from avatar.faces import FixedBoxes
    from avatar.reference import decode_image, prepare_avatar

    def decode(data: bytes):
        image = decode_image(data)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3

    def prepare(data: bytes):
        prepared = prepare_avatar(data, (64, 64), FixedBoxes([(8, 8, 56, 56)]))
        assert prepared.size_hw == (64, 64)

    targets = {"decode_image": decode, "prepare_avatar": prepare}
    if engine is not None:
        from app.avatars import AVATAR_SPEC, prepare_avatar_dir

        def folder(data: bytes):
            d = work.root / "avatar"
            d.mkdir(exist_ok=True)
            (d / "neutral.png").write_bytes(data)
            (d / "happy.png").write_bytes(data[::-1] if len(data) % 3 == 0 else data)
            (d / AVATAR_SPEC).write_text(json.dumps({"portrait": "neutral.png", "face_box": [8, 8, 56, 56],
                                                     "emotions": {"happy": "happy.png"}}))
            prepare_avatar_dir(engine, d)

        targets["avatar_folder"] = folder
    return targets


def spec_targets(work: Workdir, engine) -> dict[str, Callable[[object], object]]:
    """An `avatar new` folder's avatar.json, fuzzed as JSON values (the images stay valid)."""
    from app.avatars import AVATAR_SPEC, prepare_avatar_dir

    def spec(value: object):
        d = work.root / "spec"
        d.mkdir(exist_ok=True)
        (d / "neutral.png").write_bytes(image_seeds()["png_face"])
        (d / AVATAR_SPEC).write_text(json.dumps(value))
        prepare_avatar_dir(engine, d)

    return {"avatar_spec": spec}


def _json_number():
    return st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=False, allow_infinity=False),
                     st.sampled_from([0, 8, 56, 63, 64, 1e308, -1]))


@st.composite
def avatar_specs(draw) -> object:
    """avatar.json values: mostly the right shape with odd values, sometimes anything JSON."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.recursive(st.none() | st.booleans() | _json_number() | st.text(max_size=8),
                                 lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                    max_size=4), max_leaves=8))
    box = draw(st.one_of(st.lists(_json_number(), min_size=0, max_size=6), st.text(max_size=6), st.none()))
    names = st.sampled_from(["neutral.png", "missing.png", "", ".", "..", "/etc/passwd", "../neutral.png", "spec"])
    return {"portrait": draw(st.one_of(names, _json_number(), st.none())), "face_box": box,
            "emotions": draw(st.one_of(st.dictionaries(st.text(max_size=6), names, max_size=3), st.lists(names),
                                       st.none()))}


# ---- running: the property and the long fuzz ------------------------------------------------------------------
def expect_clear(fn: Callable, value) -> None:
    """The property every target must hold: a result, or a ValueError-family error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RuntimeWarning (an MP3's estimated length) and library chatter
        try:
            fn(value)
        except ValueError:
            pass


def run_target(name: str, fn: Callable, strategy, examples: int, seconds: float, seed: int = 0) -> dict:
    """Rounds of `examples` hypothesis examples (fresh seeds each round) until `seconds` have passed;
    each round's failure (shrunk) is recorded, then the next round starts."""
    count, rounds, failures = 0, 0, {}
    t0 = time.monotonic()
    while rounds == 0 or time.monotonic() - t0 < seconds:
        rounds += 1

        @hypothesis_seed(seed + rounds)  # a new seed per round, reproducible
        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                  print_blob=False)
        @given(strategy)
        def prop(value):
            nonlocal count
            count += 1
            expect_clear(fn, value)

        try:
            prop()
        except Exception as exc:  # noqa: BLE001 - a finding: recorded, the fuzz goes on
            key = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            found = failures.setdefault(key, {"rounds": 0, "round_seed": seed + rounds,
                                              "example": " ".join(getattr(exc, "__notes__", []))[:300]})
            found["rounds"] += 1
        if seconds <= 0:
            break
    return {"examples": count, "rounds": rounds, "wall_s": round(time.monotonic() - t0, 1),
            "failures": [{"error": k, **v} for k, v in failures.items()]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="wall time over all targets")
    parser.add_argument("--examples", type=int, default=200, help="examples per round")
    parser.add_argument("--target", action="append", help="only these targets (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from avatar.engine import AvatarEngine, EngineOptions, ModelBundle

    work = Workdir()
    engine = AvatarEngine(ModelBundle.random("tiny", "tiny"), EngineOptions(max_sessions=1, decoder="torch",
                                                                            warmup=False))
    plan: dict[str, tuple[Callable, object]] = {}
    plan.update({k: (f, audio_bytes) for k, f in audio_targets(work).items()})
    plan.update({k: (f, image_bytes) for k, f in image_targets(work, engine).items()})
    plan.update({k: (f, avatar_specs()) for k, f in spec_targets(work, engine).items()})
    chosen = args.target or list(plan)
    unknown = set(chosen) - set(plan)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; choose from {sorted(plan)}")
    per_target = args.seconds / len(chosen)
    t0 = time.monotonic()
    report = {name: run_target(name, *plan[name], examples=args.examples, seconds=per_target, seed=args.seed)
              for name in chosen}
    out = {"seconds": round(time.monotonic() - t0, 1), "examples": sum(r["examples"] for r in report.values()),
           "failures": sum(len(r["failures"]) for r in report.values()), "targets": report}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
