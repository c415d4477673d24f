"""Settings of the live service: one frozen dataclass, read from the environment and overridden by the CLI.

| field | env | default |
|---|---|---|
| host | AVATARCAST_HOST | 127.0.0.1 (this machine only; use 0.0.0.0 to serve the LAN) |
| port | AVATARCAST_PORT | 8080 |
| max_sessions | AVATARCAST_MAX_SESSIONS | 4 calls per engine worker |
| max_lag_s | AVATARCAST_MAX_LAG_S | 1.5: a call whose next block is due longer ago than this holds blocks (repeats its last frame, all audio kept) until it is back within it (0: never, the delay grows instead) |
| max_load | AVATARCAST_MAX_LOAD | 0.9: a worker with calls takes one more only if its measured engine load per call, times its calls plus one, stays at or under this (0: slots only) |
| workers | AVATARCAST_WORKERS | 1: engine worker processes (0: the engine in the server's own process; ray: Ray actors) |
| ray_address | AVATARCAST_RAY_ADDRESS | none: with workers=ray, a Ray cluster started here (else `ray start`'s address) |
| ray_workers | AVATARCAST_RAY_WORKERS | 0: one Ray actor per GPU of the cluster (1 on a cluster without GPUs) |
| model | AVATARCAST_MODEL | auto: the demo model when shipped, else random TINY weights (demo, tiny) |
| ice_servers | AVATARCAST_ICE_SERVERS | none: host candidates only (loopback / LAN) |
| admin_token | AVATARCAST_ADMIN_TOKEN | generated at start and printed |
| upload_limit_bytes | AVATARCAST_UPLOAD_LIMIT_BYTES | 20 MiB (audio files the page plays as the mic) |
| max_body_bytes | AVATARCAST_MAX_BODY_BYTES | 256 KiB (any request body, e.g. an SDP offer) |
| idle_timeout_s | AVATARCAST_IDLE_TIMEOUT_S | 30 (no mic packet for this long ends a call) |
| connect_timeout_s | AVATARCAST_CONNECT_TIMEOUT_S | 20 (ICE + DTLS must connect within this) |
| avatar | AVATARCAST_AVATAR | none: the built-in drawn avatar |
| video_codec | AVATARCAST_VIDEO_CODEC | vp8 (or h264; the page can choose per call) |
| hls_dir | AVATARCAST_HLS_DIR | broadcasts (relative to the working directory): admin HLS outputs go only here |
| media_dir | AVATARCAST_MEDIA_DIR | none: the folder the admin API broadcasts audio files from, and the second voices a two-person call may pick (`GET /media`) |
| audio_urls | AVATARCAST_AUDIO_URLS | off: audio URLs the admin API may broadcast (off, public, or all: private addresses too) |
| ice_hosts | AVATARCAST_ICE_HOSTS | the loopback address when host is one, else none: addresses offered as extra ICE host candidates |
| calls_per_client | AVATARCAST_CALLS_PER_CLIENT | 2 (calls one remote address may hold at once, connecting ones included) |
| offers_per_minute | AVATARCAST_OFFERS_PER_MINUTE | 12 (offers one remote address may make per minute) |
| max_call_s | AVATARCAST_MAX_CALL_S | 3600 (a call ends after this long; 0: no limit) |
| conditions_per_minute | AVATARCAST_CONDITIONS_PER_MINUTE | 20 (avatar/emotion changes one call may ask for per minute) |

ICE servers: behind NAT (cloud VMs, phones on mobile data) the server needs a STUN server for its public
address, and clients that block UDP need TURN. Give a JSON list in the RTCIceServer shape,
`[{"urls": "stun:stun.example.org:3478"}, {"urls": "turn:turn.example.org:3478?transport=udp",
"username": "u", "credential": "p"}]`, or a comma-separated list of stun: URLs. aiortc uses one STUN and
one TURN server; the page receives the same list for its own peer connection.

ICE hosts: aioice never offers a loopback address as a candidate, so on a machine (or container, or
network namespace) whose only interface is `lo` a call would get no candidate at all. A server bound to
a loopback address offers that address itself; AVATARCAST_ICE_HOSTS (comma-separated IP addresses)
names the extra addresses explicitly (an empty value: none).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

ENV_PREFIX = "AVATARCAST_"
VIDEO_CODECS = ("vp8", "h264")
AUDIO_URL_POLICIES = ("off", "public", "all")
MODELS = ("auto", "demo", "tiny")  # app/render_worker.py load_models


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


def parse_ice_hosts(text: str) -> tuple[str, ...]:
    """Comma-separated IP addresses (candidates are addresses, never names)."""
    hosts = tuple(h.strip() for h in text.split(",") if h.strip())
    for h in hosts:
        try:
            ipaddress.ip_address(h)
        except ValueError:
            raise ValueError(f"ICE hosts must be IP addresses, not {h!r}") from None
    return hosts


def loopback_address(host: str) -> str | None:
    """The loopback address a server bound to `host` can offer as an ICE candidate; None if not loopback."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return str(ip) if ip.is_loopback else None


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
    max_load: float = 0.9  # admission by measured engine load (app/workers/pool.py PoolOptions.max_load)
    max_lag_s: float = 1.5  # catch-up bound of a live call (avatar/session.py SessionOptions.max_lag_s); 0: never
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
    # and move packets for the calls), shared by the local workers
    workers: str = "1"  # engine worker processes; "0": in-process engine; "ray": Ray actors
    ray_address: str | None = None
    ray_workers: int = 0
    model: str = "auto"
    ice_hosts: tuple[str, ...] | None = None  # None: the loopback address when `host` is one
    calls_per_client: int = 2
    offers_per_minute: int = 12
    max_call_s: float = 3600.0
    conditions_per_minute: int = 20

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0-65535, not {self.port}")
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, not {self.max_sessions}")
        if self.max_lag_s < 0:
            raise ValueError(f"max_lag_s is how far behind a call may fall before it holds blocks (0: never), "
                             f"not {self.max_lag_s}")
        if not 0 <= self.max_load <= 1:
            raise ValueError(f"max_load is the engine's busy share a worker may reach (0: off; 0.9 keeps "
                             f"headroom), not {self.max_load}")
        if self.upload_limit_bytes < 1 or self.max_body_bytes < 1024:
            raise ValueError("upload_limit_bytes must be positive and max_body_bytes at least 1024")
        if self.idle_timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("idle_timeout_s and connect_timeout_s must be positive")
        if self.calls_per_client < 1 or self.offers_per_minute < 1 or self.conditions_per_minute < 1:
            raise ValueError("calls_per_client, offers_per_minute and conditions_per_minute must be at least 1")
        if self.max_call_s < 0:
            raise ValueError(f"max_call_s must be positive (0: no limit), not {self.max_call_s}")
        if self.ice_hosts is not None:
            parse_ice_hosts(",".join(self.ice_hosts))
        if self.engine_threads < 0:
            raise ValueError(f"engine_threads must be 0 (half the cores) or positive, not {self.engine_threads}")
        if self.workers != "ray" and not (self.workers.isdigit() and 0 <= int(self.workers) <= 64):
            raise ValueError(f"workers must be a number of worker processes (0-64; 0: the engine in the server's "
                             f"process) or 'ray', not {self.workers!r}")
        if self.ray_workers < 0 or (self.ray_address is not None and self.workers != "ray"):
            raise ValueError("ray_workers must be >= 0, and a Ray address needs workers=ray")
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, not {self.model!r}")
        if self.audio_urls not in AUDIO_URL_POLICIES:
            raise ValueError(f"audio_urls must be one of {AUDIO_URL_POLICIES}, not {self.audio_urls!r}")
        if self.video_codec not in VIDEO_CODECS:
            raise ValueError(f"video_codec must be one of {VIDEO_CODECS}, not {self.video_codec!r}")
        if not self.admin_token:
            object.__setattr__(self, "admin_token", secrets.token_urlsafe(24))
            object.__setattr__(self, "admin_token_generated", True)
        elif len(self.admin_token) < 16:
            raise ValueError("the admin token must be at least 16 characters")

    def session_options(self):
        """The avatar.session.SessionOptions every live session of the service is opened with (48 kHz out,
        the catch-up bound). Imported here: settings are read by commands that never load a model."""
        from app.avatars import live_session_options

        return live_session_options(self.max_lag_s)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Environment first, then the non-None `overrides` (the CLI's options)."""
        env = os.environ if env is None else env
        conv: dict[str, Any] = {"port": int, "max_sessions": int, "max_load": float, "max_lag_s": float, "upload_limit_bytes": int, "max_body_bytes": int,
                                "idle_timeout_s": float, "connect_timeout_s": float, "engine_threads": int, "ray_workers": int,
                                "ice_servers": parse_ice_servers, "ice_hosts": parse_ice_hosts,
                                "calls_per_client": int, "offers_per_minute": int, "max_call_s": float,
                                "conditions_per_minute": int}
        values: dict[str, Any] = {}
        for name in ("host", "port", "max_sessions", "max_load", "max_lag_s", "ice_servers", "admin_token", "upload_limit_bytes",
                     "max_body_bytes", "idle_timeout_s", "connect_timeout_s", "avatar", "video_codec", "hls_dir",
                     "media_dir", "audio_urls", "engine_threads", "workers", "ray_address", "ray_workers", "model", "ice_hosts",
                     "calls_per_client", "offers_per_minute", "max_call_s", "conditions_per_minute"):
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is None or (raw == "" and name != "ice_hosts"):  # ICE_HOSTS="": no extra candidate
                continue
            try:
                values[name] = conv.get(name, str)(raw)
            except ValueError as exc:
                raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def candidate_hosts(self) -> tuple[str, ...]:
        """Addresses offered as ICE host candidates besides aioice's own (which never include loopback)."""
        if self.ice_hosts is not None:
            return self.ice_hosts
        loopback = loopback_address(self.host)
        return () if loopback is None else (loopback,)

    def compute_threads(self) -> int:
        return self.engine_threads or max(1, (os.cpu_count() or 2) // 2)

    @property
    def local_workers(self) -> int:
        """Engine worker processes to start here (0: the engine runs in the server's process, or on Ray)."""
        return 0 if self.workers == "ray" else int(self.workers)

    def threads_per_worker(self) -> int:
        """Compute threads of each local worker: the engine's share of the cores, split between them."""
        return max(1, self.compute_threads() // max(1, self.local_workers))

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)
