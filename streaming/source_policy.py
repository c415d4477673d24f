"""Which audio files and URLs a broadcast may read, and opening them under that rule.

    policy = SourcePolicy(media_dir=Path("media"), urls="public")   # the server's admin API
    source = policy.check("talk.mp3")                   # AudioSource, or AudioSourceError (nothing opened)
    with policy.open(source) as media:                  # what PyAV opens: a path, a URL or a file object
        av.open(media.target, options=media.options)

`TRUSTED` (the command line: the user's own files and URLs) reads anything FFmpeg can. A restricted
policy reads local files only inside `media_dir` (symbolic links resolved first) and URLs only when
`urls` allows them: "public" refuses every name that resolves to a loopback, link-local, private or
otherwise non-global address, "all" allows those too. A restricted URL is fetched here, not by FFmpeg:
the name is resolved once, checked, and that address is the one connected to (a name that resolves
elsewhere the second time changes nothing), and each redirect is checked the same way before it is
followed. Errors never tell what exists: a file outside the folder and a missing one get the same
message, and neither FFmpeg's nor the network's error text reaches the caller (it is logged).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urljoin, urlsplit

import urllib3

log = logging.getLogger(__name__)

AUDIO_URL_SCHEMES = ("http", "https")
URL_POLICIES = ("off", "public", "all")
URL_TIMEOUT_S = 10.0  # a stalled audio URL fails after 10 s instead of hanging
MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)

NO_FILE = "no such audio file in the media folder"  # missing, outside, not a regular file, unreadable: one answer
NO_MEDIA_DIR = "this server reads audio files only from its media folder, and none is configured"
URLS_OFF = "this server does not read audio from URLs"
HOST_REFUSED = "its host is unknown or not allowed"
FETCH_FAILED = "it cannot be fetched"
NOT_AUDIO = "it is not readable audio"

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
FETCH_ERRORS = (urllib3.exceptions.HTTPError,)  # a fetched URL that stalls or breaks while PyAV reads it


class AudioSourceError(ValueError):
    """An audio file or URL that cannot be opened or decoded, or that the policy refuses."""

    def __init__(self, source: str, reason: str) -> None:
        self.source, self.reason = source, reason
        super().__init__(f"cannot read audio from {source!r}: {reason}")


def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (an address literal resolves to itself)."""
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


def is_public_address(ip: IpAddress) -> bool:
    """A globally routable unicast address: not loopback, link-local, private, shared, reserved, multicast."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return ip.is_global and not ip.is_multicast


@dataclass(frozen=True)
class AudioSource:
    """A source the policy accepted: a local file (`location` is its resolved path) or an http(s) URL."""

    kind: Literal["file", "url"]
    location: str
    given: str  # as the caller wrote it (what error messages name)


@dataclass(frozen=True)
class OpenedMedia:
    """What to hand to `av.open`: a path or URL with FFmpeg options, or a file object read from here."""

    target: Any
    options: dict[str, str] | None = None


@dataclass(frozen=True)
class SourcePolicy:
    media_dir: Path | None = None  # local files only under this folder (None: none)
    urls: str = "off"  # off | public | all
    trusted: bool = False  # True: anything FFmpeg reads (the command line: the user's own files)
    resolve: Callable[[str, int], list[str]] = field(default=resolve_host, repr=False)  # tests pass a stub
    is_public: Callable[[IpAddress], bool] = field(default=is_public_address, repr=False)
    timeout_s: float = URL_TIMEOUT_S  # connecting, and each read of a URL

    def __post_init__(self) -> None:
        if self.urls not in URL_POLICIES:
            raise ValueError(f"audio URLs: expected one of {', '.join(URL_POLICIES)}, not {self.urls!r}")

    # ---- 1. checks that open nothing --------------------------------------------------------------------
    def check(self, source: str) -> AudioSource:
        """The source if this policy may read it (a cheap check: no connection, no name lookup)."""
        given = source if isinstance(source, str) else ""
        source = given.strip()
        if not source or any(ord(c) < 32 or c == "\x7f" for c in source):
            raise AudioSourceError(given, "give a file path or an http(s) URL")
        if "://" in source:
            scheme = urlsplit(source).scheme.lower()
            if scheme not in AUDIO_URL_SCHEMES:
                raise AudioSourceError(source, f"unsupported URL scheme {scheme!r}; use http(s):// or a local file")
            if not self.trusted and self.urls == "off":
                raise AudioSourceError(source, URLS_OFF)
            return AudioSource("url", source, source)
        if self.trusted:
            path = Path(source).expanduser()
            if not path.exists():
                raise AudioSourceError(source, "no such file")
            if not path.is_file():
                raise AudioSourceError(source, "not a regular file")
            return AudioSource("file", str(path), source)
        return AudioSource("file", self._media_path(source), source)

    def _media_path(self, source: str) -> str:
        if self.media_dir is None:
            raise AudioSourceError(source, NO_MEDIA_DIR)
        root = os.path.realpath(self.media_dir)
        path = os.path.realpath(os.path.join(root, source))  # an absolute `source` stays absolute
        try:
            inside = os.path.commonpath([root, path]) == root and path != root
            regular = inside and stat.S_ISREG(os.stat(path).st_mode)
        except (OSError, ValueError):
            regular = False
        if not regular:
            log.info("audio source %r refused: %s", source, "outside the media folder" if not inside else
                     "missing or not a regular file")
            raise AudioSourceError(source, NO_FILE)
        return path

    # ---- 2. opening ----------------------------------------------------------------------------------------
    @contextmanager
    def open(self, source: AudioSource) -> Iterator[OpenedMedia]:
        """What PyAV opens for `source`, checked again at the moment of opening, closed after use."""
        if self.trusted:
            options = {"rw_timeout": str(int(self.timeout_s * 1e6))} if source.kind == "url" else None
            yield OpenedMedia(source.location, options)
        elif source.kind == "file":
            with self._open_file(source) as f:
                yield OpenedMedia(f)
        else:
            response = self._fetch(source)
            try:
                yield OpenedMedia(response)
            finally:
                response.release_conn()
                response.close()

    def _open_file(self, source: AudioSource):
        """The file itself, opened without blocking (a FIFO swapped in since the check is refused, not
        waited on): what is decoded is what was checked."""
        path = self._media_path(source.given)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            log.info("audio source %r refused: %s", source.given, exc)
            raise AudioSourceError(source.given, NO_FILE) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise AudioSourceError(source.given, NO_FILE)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")

    def _address(self, url: str, given: str) -> tuple[str, str, int]:
        """(scheme, the checked address to connect to, port) for one URL of a redirect chain."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        try:
            host, port = parts.hostname, parts.port or (443 if scheme == "https" else 80)
        except ValueError:  # a port that is not a number or out of range
            host, port = None, 0
        if scheme not in AUDIO_URL_SCHEMES or not host:
            log.info("audio URL %r refused: %r is not an http(s) URL with a host", given, url)
            raise AudioSourceError(given, HOST_REFUSED)
        try:
            addresses = [ipaddress.ip_address(a.split("%")[0]) for a in self.resolve(host, port)]
        except (OSError, ValueError, UnicodeError) as exc:
            log.info("audio URL %r: %s does not resolve: %s", given, host, exc)
            raise AudioSourceError(given, HOST_REFUSED) from None
        if not addresses or (self.urls != "all" and not all(self.is_public(a) for a in addresses)):
            log.info("audio URL %r refused: %s resolves to %s (not all public)", given, host,
                     ", ".join(map(str, addresses)) or "nothing")
            raise AudioSourceError(given, HOST_REFUSED)
        return scheme, str(addresses[0]), port

    def _fetch(self, source: AudioSource):
        """GET the URL on the address its name was checked at; redirects are checked the same way."""
        url = source.location
        for _ in range(MAX_REDIRECTS + 1):
            scheme, address, port = self._address(url, source.given)
            parts = urlsplit(url)
            tls = {"server_hostname": parts.hostname, "assert_hostname": parts.hostname,
                   "cert_reqs": "CERT_REQUIRED"} if scheme == "https" else {}
            pool_cls = urllib3.HTTPSConnectionPool if scheme == "https" else urllib3.HTTPConnectionPool
            pool = pool_cls(address, port, timeout=urllib3.Timeout(connect=self.timeout_s, read=self.timeout_s),
                            retries=False, maxsize=1, **tls)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            host_header = parts.netloc.rpartition("@")[2]
            try:
                response = pool.urlopen("GET", target, headers={"Host": host_header, "Accept": "audio/*, */*"},
                                        redirect=False, preload_content=False, release_conn=False)
            except urllib3.exceptions.HTTPError as exc:
                log.info("audio URL %r: %s", source.given, exc)
                raise AudioSourceError(source.given, FETCH_FAILED) from None
            location = response.headers.get("Location")
            if response.status in REDIRECTS and location:
                response.close()  # its body is not read: a redirect's body can be endless
                pool.close()
                url = urljoin(url, location)
                continue
            if response.status != 200:
                log.info("audio URL %r: HTTP %s", source.given, response.status)
                response.close()
                pool.close()
                raise AudioSourceError(source.given, FETCH_FAILED)
            return response
        log.info("audio URL %r: more than %d redirects", source.given, MAX_REDIRECTS)
        raise AudioSourceError(source.given, FETCH_FAILED)

    def media_error(self, source: AudioSource, what: str, exc: BaseException) -> AudioSourceError:
        """A failure while opening or decoding (FFmpeg's, or the fetch's): its text for a trusted caller,
        logged otherwise."""
        if self.trusted:
            return AudioSourceError(source.given, f"{what}{getattr(exc, 'strerror', None) or exc}")
        log.info("audio source %r: %s%s", source.given, what, exc)
        return AudioSourceError(source.given, FETCH_FAILED if isinstance(exc, FETCH_ERRORS) else NOT_AUDIO)


TRUSTED = SourcePolicy(trusted=True)
