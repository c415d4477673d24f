"""Two-person calls: the caller is speaker 1 and a second voice is speaker 2, each driving one face of a
two-face avatar (faces are ordered left to right, so speaker 1 is the left face).

The second voice is either an audio file from the server's media folder (`SecondVoice`: the file plays
at the wall-clock pace once the call connects, then silence) or the caller's own right channel
(`stereo_split`: a stereo microphone, left = speaker 1, right = speaker 2). The checks here answer
before any engine or network work: too few faces, a mono offer asked to split, a file the media policy
refuses (without saying whether it exists).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from streaming.broadcast_sources import AudioDriver, AudioSourceError, SourcePolicy, probe_audio, split_channels
from streaming.webrtc.errors import LiveError

__all__ = ["CALL_SPEAKERS", "SecondVoice", "check_second_voice", "check_speakers", "list_media", "offers_stereo",
           "split_channels"]

log = logging.getLogger(__name__)

CALL_SPEAKERS = 2  # a call has one caller and at most one second voice
MEDIA_SUFFIXES = (".wav", ".mp3", ".ogg", ".opus", ".flac", ".m4a", ".aac", ".webm")
MAX_MEDIA_LISTED = 500
_WORDS = {2: "two", 3: "three", 4: "four"}


def _count(n: int) -> str:
    return _WORDS.get(n, str(n))


def check_speakers(avatar: str, speakers: int, faces: Mapping[str, int]) -> None:
    """LiveError 400 unless `avatar` has a face for each of `speakers` voices (one voice fits any avatar:
    it drives the leftmost face)."""
    if isinstance(speakers, bool) or not isinstance(speakers, int) or speakers < 1:
        raise LiveError(400, "bad_speakers", f"'speakers' must be a positive integer, not {speakers!r}")
    have = faces.get(avatar, 1)
    if speakers <= have:
        return
    fit = sorted(name for name, n in faces.items() if n >= speakers)
    where = (f"such as {fit[0]!r}" if fit else
             f"and this server has none (draw one with `avatarcast avatar new --faces {speakers}`)")
    raise LiveError(400, "too_few_faces", f"avatar {avatar!r} has {have} face{'s' if have != 1 else ''}; a "
                                          f"{_count(speakers)}-person call needs a {_count(speakers)}-face avatar "
                                          f"{where}")


def offers_stereo(sdp: str) -> bool:
    """True when the offer's Opus says it sends stereo (`sprop-stereo=1`, what a browser sets when its
    microphone track has two channels and the page asks for it)."""
    opus = {ln.split(":", 1)[1].split()[0] for ln in sdp.splitlines()
            if ln.startswith("a=rtpmap:") and " opus/" in ln.lower()}
    for ln in sdp.splitlines():
        if ln.startswith("a=fmtp:") and ln[7:].split(" ", 1)[0] in opus:
            params = {p.strip().lower() for p in ln.split(" ", 1)[-1].split(";")}
            if "sprop-stereo=1" in params:
                return True
    return False


def files_only(policy: SourcePolicy) -> SourcePolicy:
    """The policy a call's second voice is read under: the media folder's files, never a URL (a caller
    must not make the server fetch from the network for them)."""
    return replace(policy, urls="off", trusted=False)


def check_second_voice(source: Any, policy: SourcePolicy) -> str:
    """The media file a caller asked for as the second voice, if the policy allows it and it decodes
    (blocking: run it off the event loop). LiveError 400 otherwise, with the policy's message, which
    never says whether a refused path exists."""
    if not isinstance(source, str) or not source.strip():
        raise LiveError(400, "bad_second_voice", "'second_voice' must name an audio file of the server's "
                                                 "media folder (GET /media lists them)")
    try:
        probe_audio(source, files_only(policy))
    except AudioSourceError as exc:
        raise LiveError(400, "bad_second_voice", str(exc)) from None
    return source


def list_media(policy: SourcePolicy, limit: int = MAX_MEDIA_LISTED) -> list[str]:
    """Audio files under the policy's media folder (paths relative to it, sorted, at most `limit`):
    what the page offers as a second voice. Blocking (a directory walk): run it off the event loop."""
    root = policy.media_dir
    if root is None or not Path(root).is_dir():
        return []
    root = Path(root).resolve()
    found = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in MEDIA_SUFFIXES and path.is_file() and not path.is_symlink():
            rel = path.relative_to(root)
            if not any(part.startswith(".") for part in rel.parts):
                found.append(rel.as_posix())
                if len(found) >= limit:
                    break
    return found


class _CurrentSession:
    """Speaker `speaker` of whatever session the call holds now (a condition change or a restart
    replaces it; the voice goes on into the new one)."""

    def __init__(self, session: Callable[[], Any], speaker: int) -> None:
        self._session, self.speaker = session, speaker

    def push_audio(self, pcm: np.ndarray, sample_rate: int, speaker: int = 0, channels: int = 1,
                   layout: str = "interleaved") -> None:
        session = self._session()
        if session is None:
            raise RuntimeError("the call has no session")
        session.push_audio(pcm, sample_rate, speaker=self.speaker, channels=channels, layout=layout)

    def end_segment(self) -> None:
        pass  # the caller's turns mark segments; a file's end is not one of them


class SecondVoice:
    """Plays a media file into speaker 2 of a call, at the wall-clock pace, once; then silence."""

    def __init__(self, source: str, policy: SourcePolicy, session: Callable[[], Any], speaker: int = 1) -> None:
        self.source = source
        self.error: str | None = None
        self.driver = AudioDriver(_CurrentSession(session, speaker), source, policy=files_only(policy))

    async def run(self) -> None:
        try:
            await self.driver.run()
        except asyncio.CancelledError:
            raise
        except AudioSourceError as exc:  # it went away or broke mid-call: the caller talks on alone
            self.error = str(exc)
            log.warning("second voice stopped: %s", exc)

    def snapshot(self) -> dict[str, Any]:
        d = self.driver
        return {"source": self.source, "pushed_s": round(d.pushed_s, 2), "silence_s": round(d.silence_s, 2),
                "error": self.error}
