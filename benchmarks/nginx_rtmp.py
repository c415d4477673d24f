"""A local RTMP server for tests and benchmarks: Debian's nginx with libnginx-mod-rtmp, on 127.0.0.1 only,
recording every published stream (one FLV per publish), in a directory of its own.

    server = NginxRtmp(find_nginx())    # RtmpUnavailable says what is missing and how to install it
    server.start()
    url = server.url("key")             # rtmp://127.0.0.1:PORT/live/key
    server.recorded("key")              # [records/key-<time>.flv, ...]
    server.stop()
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

NGINX_MODULE = Path("/usr/lib/nginx/modules/ngx_rtmp_module.so")
INSTALL_HINT = "Debian: apt-get install -y nginx libnginx-mod-rtmp"


class RtmpUnavailable(RuntimeError):
    """nginx or its RTMP module is not installed."""


def find_nginx() -> str:
    """The nginx binary, when nginx and its RTMP module are installed; RtmpUnavailable otherwise."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        raise RtmpUnavailable(f"nginx is not installed ({INSTALL_HINT})")
    if not NGINX_MODULE.exists():
        raise RtmpUnavailable(f"the nginx RTMP module {NGINX_MODULE} is missing ({INSTALL_HINT})")
    return nginx


class NginxRtmp:
    """nginx in the foreground with its own prefix and config: RTMP on 127.0.0.1:port, application
    `live`, every published stream recorded to records/<key>-<time>.flv (one file per publish)."""

    def __init__(self, nginx: str) -> None:
        self.nginx = nginx
        # not under 0700 temporary dirs: nginx workers started by root run as `nobody` and must write
        self.dir = Path(tempfile.mkdtemp(prefix="avatarcast-rtmp-"))
        self.dir.chmod(0o755)
        self.records = self.dir / "records"
        self.records.mkdir(mode=0o777)
        self.records.chmod(0o777)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        (self.dir / "nginx.conf").write_text(
            f"load_module {NGINX_MODULE};\ndaemon off;\nworker_processes 1;\npid {self.dir}/nginx.pid;\n"
            f"error_log {self.dir}/error.log info;\nevents {{ worker_connections 64; }}\n"
            f"rtmp {{ server {{ listen 127.0.0.1:{self.port}; application live {{ live on; record all; "
            f"record_path {self.records}; record_unique on; }} }} }}\n")
        self.proc: subprocess.Popen | None = None

    def url(self, key: str) -> str:
        return f"rtmp://127.0.0.1:{self.port}/live/{key}"

    def start(self) -> None:
        self.proc = subprocess.Popen([self.nginx, "-c", str(self.dir / "nginx.conf"), "-p", str(self.dir),
                                      "-e", str(self.dir / "error.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited ({self.proc.returncode}): {self.proc.stderr.read().decode()} "
                                   f"{(self.dir / 'error.log').read_text() if (self.dir / 'error.log').exists() else ''}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"nginx did not listen on 127.0.0.1:{self.port} within 10 s")

    def stop(self) -> None:
        """Fast shutdown (SIGTERM): open connections are cut, as when a server goes away."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def recorded(self, key: str) -> list[Path]:
        return sorted(self.records.glob(f"{key}-*.flv"), key=lambda p: p.stat().st_mtime)
