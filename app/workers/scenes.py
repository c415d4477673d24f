"""The live backend over one engine per scene width: a two-face avatar is generated at twice the model's
width, as two model-sized faces side by side (the pair scenes the demo model's face-aware audio adapter
was trained on). Squeezed into the model's own frame the faces are too small for it: their mouths do not
move at all (measured on sketch-duo at 128 x 128: zero mouth-opening variance on both faces).

`scene_backend` is what a worker process, `serve --workers 0` and `broadcast` serve: the models are
loaded once and shared (the same modules); each width has its own engine (its own generation and decode
threads, the torch decoder: the ONNX one is exported per size), started with the first avatar that
needs it.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from app.avatars import (BUILTIN_AVATAR, BUILTIN_DUO, BUILTIN_DUO_SEED, EngineBackend, prepare_avatar_dir,
                         prepare_avatars, prepare_stylised, stylised_avatar)
from avatar.engine import AvatarEngine
from avatar.reference import PreparedAvatar
from avatar.session import AvatarSession, SessionOptions
from streaming.api_schema import EngineSnapshot, WorkerStatus
from streaming.webrtc.dialogue import check_speakers

log = logging.getLogger(__name__)


class SceneBackend:
    """`ServiceBackend` over one `EngineBackend` per scene width, each avatar served by the one its faces
    need. The engine report holds every engine's sessions; the rest (latency budget, workers, checkpoint)
    is the model-sized engine's, which holds most calls."""

    def __init__(self, main: EngineBackend, wide: dict[int, EngineBackend], default_avatar: str) -> None:
        self.main, self.wide = main, wide
        self.default_avatar = default_avatar
        self._by_avatar = {name: b for b in (main, *wide.values()) for name in b.avatars}

    @property
    def engines(self) -> list[AvatarEngine]:
        return [self.main.engine, *(b.engine for b in self.wide.values())]

    @property
    def checkpoint(self) -> str | None:
        return self.main.checkpoint

    def catalog(self) -> dict[str, list[str]]:
        return {name: sorted(b.avatars[name].emotion_latents) for name, b in self._by_avatar.items()}

    def faces(self) -> dict[str, int]:
        return {name: b.avatars[name].num_characters for name, b in self._by_avatar.items()}

    def avatar_warnings(self) -> dict[str, str]:
        return {name: b.avatars[name].warning for name, b in self._by_avatar.items() if b.avatars[name].warning}

    def open(self, avatar: str, emotion: str | None, speakers: int = 1) -> AvatarSession:
        check_speakers(avatar, speakers, self.faces())
        if avatar not in self._by_avatar:
            raise KeyError(f"no avatar {avatar!r}; available: {sorted(self._by_avatar)}")
        return self._by_avatar[avatar].open(avatar, emotion, speakers)

    def snapshot(self) -> EngineSnapshot:
        """The model-sized engine's, with every engine's sessions and failures."""
        snap = self.main.snapshot()
        for b in self.wide.values():
            other = b.snapshot()  # its session ids have a prefix of their own ("2faces-s1")
            snap["sessions"] = {**snap["sessions"], **other["sessions"]}
            snap["failures"] += other["failures"]
        return snap

    def workers(self) -> list[WorkerStatus]:
        return self.main.workers()

    def stop(self) -> None:
        """Stop the wide engines (the model-sized one belongs to whoever started it)."""
        for b in self.wide.values():
            b.engine.stop()


def scene_backend(engine: AvatarEngine, portrait: Path | None = None, motion: float | None = None,
                  options: SessionOptions | None = None) -> SceneBackend:
    """The built-in avatars and the user's (`prepare_avatars`), each multi-face one prepared again on an
    engine of its scene's width (started here, no warm-up: the first dialogue pays for its first block).
    Its decoder is the engine's choice: ONNX decodes a demo two-face latent in ~100 ms where torch takes
    ~620 (one run, 2 cores), and the export for the new width (~7 s) is cached on disk. `options`: the
    sessions' options (default: live, 48 kHz)."""
    avatars, default = prepare_avatars(engine, portrait)
    multi = {name: a.num_characters for name, a in avatars.items() if a.num_characters > 1}
    engines: dict[int, AvatarEngine] = {}
    wide_avatars: dict[int, dict[str, PreparedAvatar]] = {}
    try:
        for name, faces in multi.items():
            if faces not in engines:
                h, w = engine.models.frame_hw
                models = replace(engine.models, frame_hw=(h, w * faces), decoder_backend=None)
                engines[faces] = AvatarEngine(models, replace(engine.options, warmup=False,
                                                              session_prefix=f"{faces}faces-s")).start()
            wide_avatars.setdefault(faces, {})[name] = _prepare_wide(engines[faces], name, faces, portrait)
            del avatars[name]
    except BaseException:
        for e in engines.values():
            e.stop()
        raise
    main = EngineBackend(engine, avatars, default if default in avatars else BUILTIN_AVATAR, options, motion)
    wide = {faces: EngineBackend(engines[faces], named, next(iter(named)), options, motion)
            for faces, named in wide_avatars.items()}
    if multi:
        log.info("multi-face avatars %s generate at %s", sorted(multi),
                 {f: tuple(e.models.frame_hw) for f, e in engines.items()})
    return SceneBackend(main, wide, default)


def _prepare_wide(engine: AvatarEngine, name: str, faces: int, portrait: Path | None) -> PreparedAvatar:
    """Avatar `name` prepared for an engine of its scene's width, from where `prepare_avatars` took it."""
    if name == BUILTIN_DUO:
        return prepare_stylised(engine, stylised_avatar(BUILTIN_DUO_SEED, faces=faces))
    assert portrait is not None, f"{name} is neither built in nor the user's avatar"
    if Path(portrait).is_dir():
        return prepare_avatar_dir(engine, Path(portrait))
    return engine.prepare_avatar(Path(portrait), expected_faces=faces)
