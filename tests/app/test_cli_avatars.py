"""`serve`, `broadcast` and `render` take the folder `avatarcast avatar new` writes, through the command
line; `render` without --avatar uses the built-in avatar `serve` uses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from app.avatars import BUILTIN_AVATAR, BUILTIN_SEED
from app.cli import app

pytestmark = pytest.mark.timeout(300)
runner = CliRunner()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AVATARCAST_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def folder(tmp_path) -> Path:
    out = tmp_path / "ada"
    res = runner.invoke(app, ["avatar", "new", "--seed", "42", "--out", str(out), "--size", "128"])
    assert res.exit_code == 0, res.output
    return out


def _clip(path: Path, seconds: float = 0.4, rate: int = 16_000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.2 * np.sin(2 * np.pi * 180 * t) * np.sin(2 * np.pi * 3 * t) ** 2).astype(np.float32), rate)
    return path


def _render(args: list[str], out: Path) -> dict:
    res = runner.invoke(app, ["render", *args, "--out", str(out), "--model", "tiny", "--decoder", "torch",
                              "--quiet"])
    assert res.exit_code == 0, (res.output, res.exception)
    return json.loads((out / "render-manifest.json").read_text())


def test_render_takes_an_avatar_folder_and_its_emotions_by_name(tmp_path, folder):
    clip = _clip(tmp_path / "hello.wav")
    manifest = _render([str(clip), "--avatar", str(folder)], tmp_path / "plain")
    r = manifest["results"][0]
    assert r["status"] == "done" and r["avatar"] == str(folder) and (tmp_path / "plain" / "hello.mp4").is_file()
    happy = _render([str(clip), "--avatar", str(folder), "--emotion", "happy"], tmp_path / "happy")
    assert happy["results"][0]["status"] == "done"
    # a rerun is skipped: the folder's files are the avatar's part of the key ...
    assert _render([str(clip), "--avatar", str(folder)], tmp_path / "plain")["results"][0]["status"] == "skipped"
    # ... and a changed portrait renders again
    (folder / "neutral.png").write_bytes((folder / "happy.png").read_bytes())
    assert _render([str(clip), "--avatar", str(folder)], tmp_path / "plain")["results"][0]["status"] == "done"
    res = runner.invoke(app, ["render", str(clip), "--out", str(tmp_path / "bad"), "--avatar", str(folder),
                              "--emotion", "furious", "--model", "tiny", "--decoder", "torch", "--quiet"])
    assert res.exit_code == 1
    error = json.loads((tmp_path / "bad" / "render-manifest.json").read_text())["results"][0]["error"]
    assert "is one of neutral, happy, sad, surprised" in error


def test_render_without_an_avatar_uses_the_built_in_one(tmp_path):
    clip = _clip(tmp_path / "hello.wav")
    manifest = _render([str(clip)], tmp_path / "out")
    r = manifest["results"][0]
    assert r["status"] == "done" and r["avatar"] == f"demo:{BUILTIN_SEED}", r


def test_serve_takes_an_avatar_folder(folder, monkeypatch):
    """The engine in the server's process (--workers 0), so the folder is prepared where this test sees it."""
    import aiohttp.web

    from app import server
    from avatar.engine import ModelBundle

    served = {}

    def run_app(web_app, **kw):  # instead of serving: what would be served
        backend = web_app[server.SERVICE].backend
        served.update(catalog=backend.catalog(), default=backend.default_avatar, port=kw["port"])

    monkeypatch.setattr(server, "load_models", lambda name=None: ModelBundle.random("tiny", "tiny"))
    monkeypatch.setattr(aiohttp.web, "run_app", run_app)
    res = runner.invoke(app, ["serve", "--avatar", str(folder), "--port", "8123", "--workers", "0"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert served["default"] == "ada" and served["port"] == 8123
    assert served["catalog"]["ada"] == ["happy", "sad", "surprised"] and BUILTIN_AVATAR in served["catalog"]
    missing = runner.invoke(app, ["serve", "--avatar", str(folder.parent / "nobody")])
    assert isinstance(missing.exception, FileNotFoundError) and "avatar folder" in str(missing.exception)


def test_broadcast_takes_an_avatar_folder(tmp_path, folder):
    clip = _clip(tmp_path / "hello.wav", 1.0)
    out = tmp_path / "hls" / "show.m3u8"
    res = runner.invoke(app, ["broadcast", "--audio", str(clip), "--to", str(out), "--avatar", str(folder),
                              "--emotion", "sad", "--duration", "1", "--model", "tiny"])
    assert res.exit_code == 0, (res.output, res.exception)
    assert "avatar 'ada'" in res.output and '"frames_sent": 25' in res.output
    assert "#EXT-X-ENDLIST" in out.read_text()
