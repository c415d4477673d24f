"""What the console shows, as pure functions of the admin API's JSON (see client.py for its shape).

Nothing here does I/O, reads a clock or touches a widget: each function takes snapshot data (plus the
history the app keeps) and returns table cells or a Rich renderable, so every panel can be tested and
snapshotted from fixed data.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.segment import Segment
from rich.style import Style
from rich.table import Table
from rich.text import Text

HISTORY_POINTS = 120  # per series: two minutes at one poll a second
SPARK_BARS = "▁▂▃▄▅▆▇█"
STAGES = ("wait", "features", "denoise", "decode", "block", "pacing")  # per-stage medians, ms (api_schema.StageMs)
COLUMNS: tuple[tuple[str, str], ...] = (  # (column key, header); what matters most first, for narrow terminals
    ("id", "session"), ("state", "state"), ("fps", "fps"), ("latency", "latency"), ("queue", "queue"),
    ("dropped", "drops"), ("uptime", "uptime"), ("avatar", "avatar"), ("emotion", "emotion"), ("peer", "peer"),
)
STATE_STYLES = {"connected": "green", "connecting": "yellow", "new": "yellow", "paused": "bold yellow",
                "closed": "red"}
EVENT_STYLES = {"session_opened": "cyan", "session_connected": "green", "session_closed": "red",
                "session_restarted": "bold red", "session_paused": "yellow", "session_resumed": "green",
                "conditions_requested": "magenta", "conditions_changed": "magenta", "server_shutdown": "bold red",
                "hello": "dim", "broadcast_started": "cyan", "broadcast_state": "blue", "broadcast_ended": "red"}
QUIET_EVENTS = frozenset({"stats"})  # the once-a-second stats tick is not logged


@dataclass(frozen=True)
class Link:
    """The console's connection to the server, as the status line shows it."""

    state: str  # "connecting" | "connected" | "disconnected" | "auth" | "error"
    url: str
    message: str = ""
    retry_s: float = 2.0
    events: str = "connecting"  # the event stream: "connecting" | "live" | "retrying"


# ---- small formatters --------------------------------------------------------------------------------------
def _num(x: Any, fmt: str = "{:.1f}", none: str = "–") -> str:
    return none if x is None else fmt.format(x)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def size(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def redact_url(url: str) -> str:
    """An RTMP/HLS target with its stream key (the last path part) and any password hidden."""
    parts = urlsplit(url)
    if not parts.scheme:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    path = parts.path.rsplit("/", 1)[0] + "/•••" if parts.path.count("/") >= 2 else parts.path
    return urlunsplit((parts.scheme, host, path, "", ""))


def event_time(t: float | None, tz: tzinfo | None = None) -> str:
    return "--:--:--" if t is None else datetime.fromtimestamp(t, tz).strftime("%H:%M:%S")


# ---- sessions table ----------------------------------------------------------------------------------------
def session_state(s: Mapping[str, Any]) -> str:
    return "paused" if s.get("paused") and s.get("state") == "connected" else str(s.get("state", "?"))


def dropped_frames(s: Mapping[str, Any]) -> int:
    pacer, engine = s.get("pacer") or {}, s.get("engine") or {}
    return sum(int(pacer.get(k) or 0) for k in ("dropped_overflow", "dropped_late", "dropped_trim")) + \
        int(engine.get("dropped_frames") or 0)


def session_cells(s: Mapping[str, Any]) -> dict[str, Text]:
    """One row of the sessions table, by column key."""
    state = session_state(s)
    pending = s.get("pending") or None
    emotion = Text(str(s.get("emotion") or "–"))
    if pending:
        emotion.append(f" → {pending.get('emotion') or '–'}", "magenta")
    latency = (s.get("latency_ms") or {}).get("p50")
    dropped = dropped_frames(s)
    peer = " ".join(str(x) for x in (s.get("codec"), s.get("mode")) if x) or "–"
    return {
        "id": Text(str(s.get("id", "?")), "bold"),
        "peer": Text(peer),
        "avatar": Text(str(s.get("avatar") or "–")),
        "emotion": emotion,
        "state": Text(state, STATE_STYLES.get(state, "")),
        "fps": Text(_num((s.get("video") or {}).get("fps")), justify="right"),
        "latency": Text(_num(latency, "{:.0f} ms"), justify="right"),
        "queue": Text(_num((s.get("pacer") or {}).get("level"), "{}"), justify="right"),
        "dropped": Text(str(dropped), "red" if dropped else "", justify="right"),
        "uptime": Text(duration(s.get("age_s")), justify="right"),
    }


def session_rows(metrics: Mapping[str, Any] | None) -> list[tuple[str, dict[str, Text]]]:
    """(session id, cells) for every live session, in the server's order."""
    return [(str(s["id"]), session_cells(s)) for s in (metrics or {}).get("sessions", []) if "id" in s]


def find_session(metrics: Mapping[str, Any] | None, session_id: str | None) -> dict[str, Any] | None:
    return next((s for s in (metrics or {}).get("sessions", []) if s.get("id") == session_id), None)


# ---- history and sparklines --------------------------------------------------------------------------------
def session_samples(s: Mapping[str, Any]) -> dict[str, float | None]:
    """The values one poll adds to a session's sparklines."""
    stage_ms = (s.get("engine") or {}).get("stage_ms") or {}
    return {"fps": (s.get("video") or {}).get("fps"), "latency": (s.get("latency_ms") or {}).get("p50"),
            **{stage: stage_ms.get(stage) for stage in STAGES}}


def update_history(history: Mapping[str, Mapping[str, Sequence[float]]], metrics: Mapping[str, Any] | None,
                   limit: int = HISTORY_POINTS) -> dict[str, dict[str, list[float]]]:
    """A new history with this poll's samples appended (None skipped); ended sessions are dropped."""
    out: dict[str, dict[str, list[float]]] = {}
    for s in (metrics or {}).get("sessions", []):
        old = history.get(s.get("id"), {})
        out[s["id"]] = {k: ([*old.get(k, []), float(v)] if v is not None else list(old.get(k, [])))[-limit:]
                        for k, v in session_samples(s).items()}
    return out


class Sparkline:
    """The newest values that fit the width, one bar each (newest on the right). The scale spans the values
    shown but at least `min_span` of the largest, so jitter of a steady 25 fps stays small while a real
    swing uses the full height."""

    def __init__(self, values: Sequence[float], style: str = "cyan", min_span: float = 0.2) -> None:
        self.values, self.style, self.min_span = list(values), style, min_span

    def bars(self, width: int) -> str:
        shown = self.values[-width:]
        if not shown:
            return ""
        hi = max(shown)
        span = max(hi - min(shown), self.min_span * abs(hi), 1e-9)
        steps = len(SPARK_BARS) - 1
        return "".join(SPARK_BARS[max(0, min(steps, round((v - hi + span) / span * steps)))] for v in shown)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = max(1, options.max_width)
        yield Segment(self.bars(width).rjust(width), Style.parse(self.style))


# ---- detail pane -------------------------------------------------------------------------------------------
def _compact(v: Any) -> str:
    if isinstance(v, Mapping):
        return ",".join(f"{k}:{_compact(x)}" for k, x in v.items() if x is not None)
    return str(v)


def event_line(event: Mapping[str, Any], tz: tzinfo | None = None, with_session: bool = True) -> Text:
    kind = str(event.get("type", "?"))
    line = Text(event_time(event.get("time"), tz) + " ", "dim")
    line.append(kind, EVENT_STYLES.get(kind, "bold"))
    if with_session and event.get("session"):
        line.append(f" {event['session']}", "bold")
    if kind == "hello":
        line.append(f" event stream open: {len((event.get('snapshot') or {}).get('sessions', []))} sessions")
        return line
    details = [f"{k}={_compact(v)}" for k, v in event.items()
               if k not in ("id", "type", "time", "session") and v is not None]
    if details:
        line.append(" " + " ".join(details))
    return line


def detail_panel(s: Mapping[str, Any] | None, history: Mapping[str, Sequence[float]],
                 events: Iterable[Mapping[str, Any]] = (), tz: tzinfo | None = None) -> RenderableType:
    """The selected session: its numbers, sparklines (fps, latency, ms per stage), recent events."""
    if s is None:
        return Text("No session selected: the sessions table is empty, or pick a row with ↑/↓.", "dim")
    pending = s.get("pending")
    head = Text.assemble((str(s.get("id")), "bold"), " · ",
                         (session_state(s), STATE_STYLES.get(session_state(s), "")), " · ",
                         f"{s.get('avatar')}/{s.get('emotion') or '–'}")
    if pending:
        head.append(f" → {pending.get('avatar')}/{pending.get('emotion') or '–'} (at the next pause)", "magenta")
    video, lat, pacer = s.get("video") or {}, s.get("latency_ms") or {}, s.get("pacer") or {}
    mic, engine = s.get("mic") or {}, s.get("engine") or {}
    facts = Text(
        f"{s.get('codec') or '–'} {s.get('mode') or ''} · sent {video.get('sent', 0)} frames · "
        f"latency p50 {_num(lat.get('p50'), '{:.0f}')} / p95 {_num(lat.get('p95'), '{:.0f}')} ms · "
        f"queue {pacer.get('level', '–')} (max {pacer.get('max_level', '–')}) · "
        f"repeated {pacer.get('repeated', 0)} · held {engine.get('held_frames', 0)} · dropped {dropped_frames(s)} · "
        f"swaps {s.get('swaps', 0)} · "
        f"restarts {s.get('restarts', 0)} · mic {_num(mic.get('seconds'), '{:.0f}')} s"
        f"{' · speaking' if s.get('speaking') else ''} · engine {engine.get('session') or '–'}", "dim")
    if s.get("error"):
        facts.append(f"\nerror: {s['error']}", "bold red")
    sparks = Table.grid(padding=(0, 1), expand=True)
    sparks.add_column(width=8, no_wrap=True)
    sparks.add_column(ratio=1, no_wrap=True)
    sparks.add_column(width=9, justify="right", no_wrap=True)
    series = [("fps", "fps", "green", "{:.1f}"), ("latency", "latency", "yellow", "{:.0f} ms")] + \
        [(stage, stage, "cyan", "{:.1f} ms") for stage in STAGES]
    for key, label, style, fmt in series:
        values = list(history.get(key, []))
        sparks.add_row(Text(label, "bold"), Sparkline(values, style), _num(values[-1] if values else None, fmt))
    recent = [event_line(e, tz, with_session=False) for e in events]
    return Group(head, facts, sparks, Text("recent events", "bold underline"),
                 *(recent or [Text("none yet", "dim")]))


# ---- engine and broadcast ----------------------------------------------------------------------------------
def _kv_table() -> Table:
    t = Table.grid(padding=(0, 1))
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow="fold")
    return t


def real_time_factor(engine: Mapping[str, Any]) -> float | None:
    """Compute per block / audio per block (below 1 keeps up); from the engine's latency budget if not given."""
    if engine.get("rtf") is not None:
        return float(engine["rtf"])
    budget = engine.get("latency_budget") or {}
    compute = sum(float(budget.get(k) or 0) for k in ("features_ms", "denoise_ms", "decode_ms"))
    return round(compute / budget["block_ms"], 3) if compute and budget.get("block_ms") else None


def engine_panel(engine: Mapping[str, Any] | None) -> RenderableType:
    if not engine:
        return Text("no engine data yet", "dim")
    t = _kv_table()
    model = str(engine.get("model") or "?")
    checkpoint = engine.get("checkpoint") or ("none (random weights)" if model.startswith("random") else "–")
    t.add_row("model", f"{model} · {engine.get('mode') or '–'}")
    t.add_row("checkpoint", str(checkpoint))
    t.add_row("device", str(engine.get("device") or "–"))
    provider = str(engine.get("decoder") or "–")
    t.add_row("decoder", provider if provider in ("torch", "–") else f"ONNX Runtime · {provider}")
    rtf = real_time_factor(engine)
    t.add_row("RTF", Text(_num(rtf, "{:.2f}"), "" if rtf is None else ("green" if rtf < 0.8 else "bold red")))
    mem = engine.get("memory") or {}
    mem_text = f"RSS {size(mem.get('rss_bytes'))}"
    if mem.get("cuda_allocated_bytes") is not None:
        mem_text += f" · CUDA {size(mem['cuda_allocated_bytes'])} (reserved {size(mem.get('cuda_reserved_bytes'))})"
    t.add_row("memory", mem_text if mem else "–")
    budget = engine.get("latency_budget") or {}
    t.add_row("latency", f"budget {_num(budget.get('total_ms'), '{:.0f} ms')} · warmup "
                         f"{_num(engine.get('warmup_ms'), '{:.0f} ms')} · failures {engine.get('failures', 0)}")
    if engine.get("note"):
        t.add_row("note", Text(str(engine["note"]), "dim"))
    return t


WORKER_STYLES = {"ready": "bold green", "starting": "yellow", "dead": "bold red"}


def workers_panel(workers: Mapping[str, Any] | None, engine: Mapping[str, Any] | None = None) -> RenderableType:
    """Each engine worker: state, process and host, sessions, restarts; its frame rate and block time where
    the engine summary (/admin/metrics) carries them (a worker pool's heartbeats)."""
    if not workers:
        return Text("no worker data yet", "dim")
    if workers.get("available") is False:
        return Group(Text("workers not reported", "bold yellow"), Text(str(workers.get("message") or ""), "dim"))
    rates = {w.get("id"): w for w in (engine or {}).get("workers") or []}
    items = list(workers.get("workers") or [])
    ready = sum(w.get("state") == "ready" for w in items)
    lines: list[RenderableType] = [Text(f"{ready} ready of {len(items)}", "bold")]
    for w in items:
        state = str(w.get("state") or "?")
        line = Text.assemble((f"{w.get('id', '?')} ", "bold"), (state, WORKER_STYLES.get(state, "")),
                             f" · {w.get('sessions', 0)} sessions")
        restarts = int(w.get("restarts") or 0)
        if restarts:
            line.append(f" · restarts {restarts}", "yellow")
        lines.append(line)
        rate = rates.get(w.get("id")) or {}
        facts = [f"pid {w.get('pid') or '–'} on {w.get('host') or '?'}", _num(rate.get("fps"), "{:.1f} fps"),
                 _num(rate.get("block_ms"), "block {:.0f} ms")]
        lines.append(Text("  " + " · ".join(f for f in facts if f != "–"), "dim"))
        if state == "dead" and rate.get("last_error"):
            lines.append(Text(f"  {rate['last_error']}", "red"))
    return Group(*lines)


BROADCAST_STYLES = {"live": "bold green", "starting": "yellow", "connecting": "yellow", "reconnecting": "bold yellow",
                    "failed": "bold red", "stopped": "dim"}
FINISHED_BROADCAST = frozenset({"stopped", "failed"})
FINISHED_SHOWN = 2


def active_broadcasts(b: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    return [x for x in (b or {}).get("broadcasts", []) if x.get("state") not in FINISHED_BROADCAST]


def broadcast_source(x: Mapping[str, Any]) -> str:
    src = x.get("source") or {}
    if src.get("type") == "session":
        return f"session {src.get('session_id')}"
    if src.get("type") == "audio":
        return f"audio {src.get('audio') or ''}".strip()
    return str(src.get("type") or "?")


def broadcast_panel(b: Mapping[str, Any] | None) -> RenderableType:
    """Each livestream: state, target (stream key masked), source, bitrate, reconnects, last error;
    says plainly when the server cannot broadcast."""
    if not b:
        return Text("no broadcast data yet", "dim")
    if b.get("available") is False:
        return Group(Text("broadcast not available", "bold yellow"), Text(str(b.get("message") or ""), "dim"))
    running = active_broadcasts(b)
    finished = [x for x in b.get("broadcasts") or [] if x not in running]
    items = running + finished[-FINISHED_SHOWN:]  # the server keeps the last few finished ones
    head = Text(f"{len(running)} running of {b.get('max_broadcasts', '?')}", "bold")
    if not items:
        return Group(head, Text("none · b streams the selected session (RTMP URL or NAME.m3u8)", "dim"))
    lines: list[RenderableType] = [head]
    for x in items:
        state = str(x.get("state") or "?")
        lines.append(Text.assemble((f"{x.get('id', '?')} ", "bold"), (state, BROADCAST_STYLES.get(state, "")),
                                   f" → {redact_url(str(x.get('target') or '?'))}"))
        facts = [broadcast_source(x), _num(x.get("bitrate_kbps"), "{:.0f} kbps"),
                 f"reconnects {x.get('reconnects', 0)}", f"{_num(x.get('seconds_sent'), '{:.0f}')} s sent"]
        lines.append(Text("  " + " · ".join(facts), "dim"))
        if x.get("last_error") and state != "live":
            lines.append(Text(f"  {x['last_error']}", "red"))
    return Group(*lines)


# ---- status line and pickers -------------------------------------------------------------------------------
def status_line(link: Link, metrics: Mapping[str, Any] | None = None) -> Text:
    retry = f"retrying every {link.retry_s:g} s"
    if link.state == "connected":
        m = metrics or {}
        text = Text.assemble(("● connected ", "bold green"), link.url,
                             f" · {len(m.get('sessions', []))}/{m.get('max_sessions', '?')} sessions"
                             f" · server up {duration(m.get('uptime_s'))} · events {link.events}")
        return text
    if link.state == "connecting":
        return Text.assemble(("… connecting ", "bold yellow"), link.url)
    if link.state == "auth":
        return Text.assemble(("✖ ", "bold red"), (link.message, "bold red"), f" — {retry}")
    if link.state == "disconnected":
        return Text.assemble(("✖ disconnected — retrying ", "bold red"), f"every {link.retry_s:g} s · {link.message}")
    return Text.assemble(("! ", "bold red"), (link.message, "red"), f" — {retry}")


def emotion_choices(catalog: Mapping[str, Sequence[str]], avatar: str | None,
                    emotion: str | None) -> list[tuple[str, str, str | None]]:
    """(label, avatar, emotion) for the picker: the session's avatar first, then the others."""
    order = sorted(catalog, key=lambda a: (a != avatar, a))
    out = []
    for a in order:
        for e in [*catalog[a], None]:
            current = " ●" if (a, e) == (avatar, emotion) else ""
            out.append((f"{a} · {e or '(no emotion)'}{current}", a, e))
    return out
