"""What the page's routes (app/server.py) and the admin API (app/admin.py) share: JSON errors, the one
request-body reader (with the server's size limit) and the one avatar/emotion change route."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from streaming.webrtc.peer import LiveError
from streaming.webrtc.service import KEEP, Keep, LiveService


def json_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """Every error leaves as {"error": stable code, "message": words for people}."""
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)


async def read_json(request: web.Request, limit: int, *, empty_ok: bool = False) -> dict[str, Any]:
    """A JSON object body of at most `limit` bytes, or a clear 413 / 415 / 400. `empty_ok`: a request
    without a body reads as {} (routes whose fields are all optional)."""
    if empty_ok and not request.can_read_body:
        return {}
    if request.content_type != "application/json":
        raise LiveError(415, "unsupported_media_type",
                        f"send the body as application/json, not {request.content_type or 'nothing'!r}")
    if request.content_length is not None and request.content_length > limit:
        raise LiveError(413, "body_too_large", f"the body is {request.content_length} bytes; the limit is {limit}")
    try:
        raw = await request.read()  # bounded by the application's client_max_size as well
    except web.HTTPRequestEntityTooLarge:
        raise LiveError(413, "body_too_large", f"the body exceeds the {limit}-byte limit") from None
    if len(raw) > limit:  # chunked bodies carry no Content-Length
        raise LiveError(413, "body_too_large", f"the body exceeds the {limit}-byte limit")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LiveError(400, "bad_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise LiveError(400, "bad_json", "the body must be a JSON object")
    return body


def optional_str(body: dict[str, Any], key: str) -> str | None:
    """`body[key]` as a string; absent, null and "" all read as None."""
    value = body.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise LiveError(400, "bad_field", f"{key!r} must be a string or null")
    return value


async def change_conditions(request: web.Request, service: LiveService, limit: int) -> web.Response:
    """POST .../sessions/{session_id}/conditions {avatar?, emotion?}: the page's pickers and the admin
    API alike; the rule is `LiveService.set_conditions`. 200 when applied, 202 while pending."""
    body = await read_json(request, limit, empty_ok=True)  # no body: "give avatar and/or emotion"
    emotion: str | None | Keep = optional_str(body, "emotion") if "emotion" in body else KEEP
    result = service.set_conditions(request.match_info["session_id"], optional_str(body, "avatar"), emotion)
    return web.json_response(result, status=200 if result["status"] == "applied" else 202)
