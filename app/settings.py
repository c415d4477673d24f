"""Settings of the live service: one frozen dataclass, read from the environment and overridden by the CLI.

| field | env | default |
|---|---|---|
| host | AVATARCAST_HOST | 127.0.0.1 (this machine only; use 0.0.0.0 to serve the LAN) |
| port | AVATARCAST_PORT | 8080 |
| max_sessions | AVATARCAST_MAX_SESSIONS | 4 |
| ice_servers | AVATARCAST_ICE_SERVERS | none: host candidates only (loopback / LAN) |
| admin_token | AVATARCAST_ADMIN_TOKEN | generated at start and printed |
| upload_limit_bytes | AVATARCAST_UPLOAD_LIMIT_BYTES | 20 MiB (audio files the page plays as the mic) |
| max_body_bytes | AVATARCAST_MAX_BODY_BYTES | 256 KiB (any request body, e.g. an SDP offer) |
| idle_timeout_s | AVATARCAST_IDLE_TIMEOUT_S | 30 (no mic packet for this long ends a call) |
| connect_timeout_s | AVATARCAST_CONNECT_TIMEOUT_S | 20 (ICE + DTLS must connect within this) |
| avatar | AVATARCAST_AVATAR | none: the built-in drawn avatar |
| video_codec | AVATARCAST_VIDEO_CODEC | vp8 (or h264; the page can choose per call) |
| hls_dir | AVATARCAST_HLS_DIR | broadcasts (relative to the working directory): admin HLS outputs go only here |
| media_dir | AVATARCAST_MEDIA_DIR | none: the admin API broadcasts audio files only from this folder |
| audio_urls | AVATARCAST_AUDIO_URLS | off: audio URLs the admin API may broadcast (off, public, or all: private addresses too) |

ICE servers: behind NAT (cloud VMs, phones on mobile data) the server needs a STUN server for its public
address, and clients that block UDP need TURN. Give a JSON list in the RTCIceServer shape,
`[{"urls": "stun:stun.example.org:3478"}, {"urls": "turn:turn.example.org:3478?transport=udp",
"username": "u", "credential": "p"}]`, or a comma-separated list of stun: URLs. aiortc uses one STUN and
one TURN server; the page receives the same list for its own peer connection.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

ENV_PREFIX = "AVATARCAST_"
VIDEO_CODECS = ("vp8", "h264")
AUDIO_URL_POLICIES = ("off", "public", "all")


@dataclass(frozen=True)
class IceServer:
    urls: str
    username: str | None = None
    credential: str | None = None

    def __post_init__(self) -> None:
        if not self.urls.startswith(("stun:", "turn:", "turns:")):
            raise ValueError(f"ICE server URL must start with stun:, turn: or turns:, not {self.urls!r}")
        if self.urls.startswith("turn") and (self.username is None or self.credential is None):
            raise ValueError(f"TURN server {self.urls} needs a username and a credential")

    def as_dict(self) -> dict[str, str]:
        d = {"urls": self.urls}
        if self.username is not None:
            d["username"] = self.username
        if self.credential is not None:
            d["credential"] = self.credential
        return d


def parse_ice_servers(text: str) -> tuple[IceServer, ...]:
    text = text.strip()
    if not text:
        return ()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"ICE servers: invalid JSON ({exc})") from None
        if not isinstance(items, list) or not all(isinstance(i, dict) and "urls" in i for i in items):
            raise ValueError('ICE servers: expected a JSON list of {"urls": ..., "username"?, "credential"?}')
        return tuple(IceServer(str(i["urls"]), i.get("username"), i.get("credential")) for i in items)
    return tuple(IceServer(u.strip()) for u in text.split(",") if u.strip())


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    max_sessions: int = 4
    ice_servers: tuple[IceServer, ...] = ()
    admin_token: str = field(default="", repr=False)
    admin_token_generated: bool = False  # True: nobody set one, so it must be printed at start
    upload_limit_bytes: int = 20 * 1024 * 1024
    max_body_bytes: int = 256 * 1024
    idle_timeout_s: float = 30.0
    connect_timeout_s: float = 20.0
    avatar: str | None = None
    video_codec: str = "vp8"
    hls_dir: str = "broadcasts"
    media_dir: str | None = None
    audio_urls: str = "off"  # off | public (no loopback, link-local or private address) | all
    engine_threads: int = 0  # compute threads of the engine; 0: half the cores (the rest encode, decode
    # and move packets for the calls)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0-65535, not {self.port}")
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, not {self.max_sessions}")
        if self.upload_limit_bytes < 1 or self.max_body_bytes < 1024:
            raise ValueError("upload_limit_bytes must be positive and max_body_bytes at least 1024")
        if self.idle_timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("idle_timeout_s and connect_timeout_s must be positive")
        if self.engine_threads < 0:
            raise ValueError(f"engine_threads must be 0 (half the cores) or positive, not {self.engine_threads}")
        if self.audio_urls not in AUDIO_URL_POLICIES:
            raise ValueError(f"audio_urls must be one of {AUDIO_URL_POLICIES}, not {self.audio_urls!r}")
        if self.video_codec not in VIDEO_CODECS:
            raise ValueError(f"video_codec must be one of {VIDEO_CODECS}, not {self.video_codec!r}")
        if not self.admin_token:
            object.__setattr__(self, "admin_token", secrets.token_urlsafe(24))
            object.__setattr__(self, "admin_token_generated", True)
        elif len(self.admin_token) < 16:
            raise ValueError("the admin token must be at least 16 characters")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Environment first, then the non-None `overrides` (the CLI's options)."""
        env = os.environ if env is None else env
        conv: dict[str, Any] = {"port": int, "max_sessions": int, "upload_limit_bytes": int, "max_body_bytes": int,
                                "idle_timeout_s": float, "connect_timeout_s": float, "engine_threads": int,
                                "ice_servers": parse_ice_servers}
        values: dict[str, Any] = {}
        for name in ("host", "port", "max_sessions", "ice_servers", "admin_token", "upload_limit_bytes",
                     "max_body_bytes", "idle_timeout_s", "connect_timeout_s", "avatar", "video_codec", "hls_dir",
                     "media_dir", "audio_urls", "engine_threads"):
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is None or raw == "":
                continue
            try:
                values[name] = conv.get(name, str)(raw)
            except ValueError as exc:
                raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def compute_threads(self) -> int:
        return self.engine_threads or max(1, (os.cpu_count() or 2) // 2)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)
