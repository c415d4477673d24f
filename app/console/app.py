"""`avatarcast console`: the Textual operator console.

Two async workers talk to the server and never block the UI: `poll` fetches a snapshot (metrics, engine,
broadcast) every `poll_s` and, while the server is unreachable or refuses the token, says so in the status
line and retries every `retry_s`; `stream_events` follows GET /admin/events into the log and each
session's recent events, reconnecting after the stream ends. Panels are rendered by the pure functions
in panels.py from the latest snapshot; actions run as workers too, and every server error is shown.
"""

from __future__ import annotations

import asyncio
import functools
from collections import defaultdict, deque
from datetime import tzinfo
from typing import Any, Awaitable, Callable, TypeVar

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.coordinate import Coordinate
from textual.reactive import reactive
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Footer, Header, Input, Label, OptionList, RichLog, Static
from textual.widgets.option_list import Option

from app.console.client import Admin, AdminClient, AdminError
from app.console.panels import (COLUMNS, QUIET_EVENTS, Link, active_broadcasts, broadcast_panel, detail_panel,
                                emotion_choices, engine_panel, event_line, find_session, session_rows, status_line,
                                update_history, workers_panel)

DialogResult = TypeVar("DialogResult")  # what a dialog is dismissed with
SESSION_EVENTS_KEPT = 6  # recent events shown per session in the detail pane
LOG_LINES = 1000
REFRESH_ON = frozenset({"session_opened", "session_connected", "session_closed", "conditions_changed",
                        "session_paused", "session_resumed", "session_restarted", "broadcast_started",
                        "broadcast_state", "broadcast_ended"})


class EventLog(RichLog):
    """A RichLog that keeps what it was given and re-wraps it when its width changes (a terminal resize,
    or the narrow layout taking over), instead of keeping lines wrapped for the old width."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(max_lines=LOG_LINES, wrap=True, min_width=20, markup=False, highlight=False, **kwargs)
        self.entries: deque[Text] = deque(maxlen=LOG_LINES)
        self._wrapped_at = 0

    def add(self, entry: Text) -> None:
        self.entries.append(entry)
        self.write(entry)

    def on_resize(self) -> None:
        width = self.scrollable_content_region.width
        if not self._size_known:  # RichLog itself writes what came before the first size, at that size
            return
        if width != self._wrapped_at and self.entries:
            self._wrapped_at = width
            self.clear()
            for entry in self.entries:
                self.write(entry)


class DialogScreen(ModalScreen[DialogResult]):
    """A modal: its question or title over the widgets of `body()`; Escape dismisses it with None."""

    BINDINGS = [Binding("escape", "dismiss_none", "Cancel")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.question, id="question")
            yield from self.body()

    def body(self) -> ComposeResult:
        yield from ()

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


class ConfirmScreen(DialogScreen[bool]):
    """Yes / no before anything that cannot be undone."""

    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str, yes: str = "Yes") -> None:
        super().__init__(question)
        self.yes = yes

    def body(self) -> ComposeResult:
        with Horizontal(id="buttons"):
            yield Button(f"{self.yes} (y)", variant="error", id="yes")
            yield Button("Cancel (n)", variant="primary", id="no")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class PickerScreen(DialogScreen[Any]):
    """Choose one of `choices` [(label, value)]; dismissed with the value, or None on Escape."""

    def __init__(self, title: str, choices: list[tuple[str, Any]], current: int = 0) -> None:
        super().__init__(title)
        self.choices, self.current = choices, current

    def body(self) -> ComposeResult:
        yield OptionList(*(Option(label, id=str(i)) for i, (label, _) in enumerate(self.choices)), id="choices")
        yield Label("↑/↓ choose · Enter apply · Esc cancel", classes="hint")

    def on_mount(self) -> None:
        self.query_one(OptionList).highlighted = self.current

    @on(OptionList.OptionSelected)
    def chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.choices[int(event.option.id or 0)][1])


class TargetScreen(DialogScreen[str | None]):
    """Where to livestream a session: an RTMP URL or an HLS playlist under the server's HLS directory."""

    def __init__(self, title: str, value: str = "") -> None:
        super().__init__(title)
        self.value = value

    def body(self) -> ComposeResult:
        yield Input(self.value, placeholder="rtmp://HOST/APP/STREAM_KEY  or  NAME.m3u8", id="target")
        yield Label("Enter start · Esc cancel · the server masks the stream key in everything it reports",
                    classes="hint")

    @on(Input.Submitted)
    def submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)


def selected_session_action(action: Callable[[ConsoleApp, dict[str, Any]], Awaitable[None]]):
    """A key action on the selected session, run as a worker (modals wait inside it); with no session
    selected the operator is told so and nothing is sent."""
    @functools.wraps(action)
    async def run(app: ConsoleApp) -> None:
        session = app.selected_session()
        if session is not None:
            await action(app, session)

    return work(group="actions")(run)


class ConsoleApp(App[None]):
    """Live sessions, engine health and broadcasts of one avatarcast server, over its admin API."""

    CSS_PATH = "console.tcss"
    TITLE = "avatarcast console"
    ENABLE_COMMAND_PALETTE = False
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (120, "-wide")]
    BINDINGS = [
        Binding("e", "end_session", "End"),
        Binding("m", "conditions", "Emotion"),
        Binding("p", "toggle_pause", "Pause"),
        Binding("b", "start_broadcast", "Broadcast"),
        Binding("B", "stop_broadcast", "Stop bcast", key_display="⇧B"),
        Binding("r", "refresh", "Refresh"),
        Binding("q", "quit", "Quit"),
    ]

    link: reactive[Link] = reactive(Link("connecting", ""), init=False)
    selected: reactive[str | None] = reactive(None, init=False)

    def __init__(self, client: Admin, *, poll_s: float = 1.0, retry_s: float = 2.0, tz: tzinfo | None = None,
                 follow_events: bool = True) -> None:
        super().__init__()
        self.client, self.poll_s, self.retry_s, self.tz = client, poll_s, retry_s, tz
        self.follow_events = follow_events
        self.snap: dict[str, Any] = {}
        self.history: dict[str, dict[str, list[float]]] = {}
        self.session_events: dict[str, deque[dict[str, Any]]] = defaultdict(lambda: deque(maxlen=SESSION_EVENTS_KEPT))
        self.polls_applied = 0
        self.last_target = ""  # the broadcast target typed last (offered again; never displayed elsewhere)
        self.sub_title = client.url
        self.set_reactive(ConsoleApp.link, Link("connecting", client.url, retry_s=retry_s))

    # ---- layout ------------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(status_line(self.link), id="status")
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield DataTable(id="sessions", cursor_type="row", zebra_stripes=True)
                with VerticalScroll(id="detail-box"):
                    yield Static(detail_panel(None, {}), id="detail")
            with Vertical(id="right"):
                yield Static(engine_panel(None), id="engine")
                yield Static(workers_panel(None), id="workers")
                yield Static(broadcast_panel(None), id="broadcast")
                yield EventLog(id="log")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#sessions", DataTable)
        for key, header in COLUMNS:
            table.add_column(header, key=key)
        titles = {"#sessions": "sessions", "#detail-box": "selected session", "#engine": "engine",
                  "#workers": "workers", "#broadcast": "broadcast", "#log": "events"}
        for selector, title in titles.items():
            self.query_one(selector).border_title = title
        self.poll()
        if self.follow_events:
            self.stream_events()

    async def on_unmount(self) -> None:
        await self.client.close()

    # ---- workers -----------------------------------------------------------------------------------------
    @work(exclusive=True, group="poll")
    async def poll(self) -> None:
        """Refresh from the server forever; on failure say why and retry (a restart of this worker = now)."""
        while True:
            try:
                snap = await self.client.snapshot()
            except AdminError as exc:
                self.link = self._failed_link(exc)
                await asyncio.sleep(self.retry_s)
                continue
            self.link = Link("connected", self.client.url, retry_s=self.retry_s, events=self.link.events)
            self.apply(snap)
            await asyncio.sleep(self.poll_s)

    @work(exclusive=True, group="events")
    async def stream_events(self) -> None:
        """Follow the server's event stream; reopen it whenever it ends or cannot be opened."""
        while True:
            try:
                async for event in self.client.events():
                    self._set_events("live")
                    try:
                        self.on_server_event(event)
                    except Exception as exc:  # an event this console cannot show: say so, keep following
                        self.note(f"cannot show event {event.get('type')!r}: {type(exc).__name__}: {exc}", "error")
            except AdminError:
                pass  # the poll worker reports the reason in the status line
            self._set_events("retrying")
            await asyncio.sleep(self.retry_s)

    def _failed_link(self, exc: AdminError) -> Link:
        state = {"connection": "disconnected", "auth": "auth", "forbidden": "auth"}.get(exc.kind, "error")
        return Link(state, self.client.url, str(exc), self.retry_s, events=self.link.events)

    def _set_events(self, state: str) -> None:
        if self.link.events != state:
            self.link = Link(self.link.state, self.link.url, self.link.message, self.link.retry_s, events=state)

    # ---- state -> widgets --------------------------------------------------------------------------------
    def watch_link(self, old: Link, new: Link) -> None:
        self.query_one("#status", Static).update(status_line(new, self.snap.get("metrics")))
        self.query_one("#status").set_class(new.state not in ("connected", "connecting"), "-problem")
        self.query_one("#main").set_class(new.state != "connected" and bool(self.snap), "-stale")
        if (old.state, old.message) == (new.state, new.message):
            return
        if new.state == "connected" and old.state != "connecting":
            self.note("reconnected to the server", "information")
        elif new.state == "auth":
            self.note(f"{new.message} — the console keeps retrying; restart it with the right --token", "error")
        elif new.state == "disconnected" and old.state != "disconnected":
            self.note(f"disconnected — retrying: {new.message}", "warning")
        elif new.state == "error":
            self.note(new.message, "error")

    def watch_selected(self) -> None:
        self.render_detail()

    def apply(self, snap: dict[str, Any]) -> None:
        """Show one snapshot. Data the panels cannot show is reported, never fatal."""
        self.snap = snap
        metrics = snap.get("metrics") or {}
        try:
            self.history = update_history(self.history, metrics)
            self._update_table(session_rows(metrics))
            self.query_one("#engine", Static).update(engine_panel(snap.get("engine")))
            self.query_one("#workers", Static).update(workers_panel(snap.get("workers"), metrics.get("engine")))
            self.query_one("#broadcast", Static).update(broadcast_panel(snap.get("broadcast")))
            self.query_one("#status", Static).update(status_line(self.link, metrics))
            self.render_detail()
        except Exception as exc:  # a server newer than this console: say so and keep going
            self.note(f"cannot show the server's data: {type(exc).__name__}: {exc}", "error")
        self.polls_applied += 1

    def _update_table(self, rows: list[tuple[str, dict[str, Text]]]) -> None:
        table = self.query_one("#sessions", DataTable)
        keys = {sid for sid, _ in rows}
        for row_key in [k for k in table.rows if k.value not in keys]:
            table.remove_row(row_key)
        for sid, cells in rows:
            if sid in table.rows:
                for column, value in cells.items():
                    table.update_cell(sid, column, value, update_width=True)
            else:
                table.add_row(*(cells[key] for key, _ in COLUMNS), key=sid)
        self.selected = (table.coordinate_to_cell_key(Coordinate(table.cursor_row, 0)).row_key.value
                         if table.row_count else None)

    @on(DataTable.RowHighlighted, "#sessions")
    def highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.selected = event.row_key.value

    def render_detail(self) -> None:
        session = find_session(self.snap.get("metrics"), self.selected)
        events = self.session_events.get(self.selected or "", ())
        self.query_one("#detail", Static).update(
            detail_panel(session, self.history.get(self.selected or "", {}), events, self.tz))

    def on_server_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind in QUIET_EVENTS:
            return
        self.query_one("#log", EventLog).add(event_line(event, self.tz))
        if event.get("session"):
            self.session_events[event["session"]].append(event)
            if event["session"] == self.selected:
                self.render_detail()
        if kind in REFRESH_ON:
            self.poll()  # show the change now rather than at the next tick

    def note(self, message: str, severity: str = "information") -> None:
        """A notification and a log line: nothing the operator should know is only transient."""
        self.notify(message, severity=severity, timeout=6 if severity == "information" else 10)  # type: ignore[arg-type]
        style = {"error": "bold red", "warning": "yellow"}.get(severity, "green")
        self.query_one("#log", EventLog).add(Text.assemble(("console ", "dim"), (message, style)))

    # ---- actions -----------------------------------------------------------------------------------------
    def selected_session(self) -> dict[str, Any] | None:
        session = find_session(self.snap.get("metrics"), self.selected)
        if session is None:
            self.notify("no session selected", severity="warning")
        return session

    async def _call(self, what: str, request: Awaitable[dict[str, Any]]) -> dict[str, Any] | None:
        try:
            result = await request
        except AdminError as exc:
            if exc.kind == "not_available":
                self.note(f"{what}: broadcast not available — {exc.message}", "warning")
            else:
                self.note(f"{what} failed: {exc}", "error")
            return None
        self.poll()
        return result

    def action_refresh(self) -> None:
        self.poll()
        if self.follow_events and self.link.events != "live":
            self.stream_events()

    @selected_session_action
    async def action_end_session(self, session: dict[str, Any]) -> None:
        sid = session["id"]
        if not await self.push_screen_wait(ConfirmScreen(
                f"End session {sid} ({session.get('avatar')}, {session.get('state')})?\n"
                "The caller is disconnected.", yes="End")):
            return
        result = await self._call(f"end session {sid}", self.client.end_session(sid))
        if result is not None:
            self.note(f"ended session {sid} ({result.get('frames_sent', '?')} frames sent)")

    @selected_session_action
    async def action_conditions(self, session: dict[str, Any]) -> None:
        catalog = await self._call("list avatars", self.client.avatars())
        if catalog is None:
            return
        choices = emotion_choices(catalog.get("avatars") or {}, session.get("avatar"), session.get("emotion"))
        if not choices:
            self.note("the server lists no avatars", "warning")
            return
        now = (session.get("avatar"), session.get("emotion"))
        current = next((i for i, (_, *value) in enumerate(choices) if tuple(value) == now), 0)
        choice = await self.push_screen_wait(PickerScreen(f"Avatar and emotion for {session['id']}",
                                                          [(label, (a, e)) for label, a, e in choices], current))
        if choice is None:
            return
        avatar, emotion = choice
        result = await self._call(f"set {avatar}/{emotion} on {session['id']}",
                                  self.client.set_conditions(session["id"], avatar, emotion))
        if result is not None:
            when = "applied" if result.get("status") == "applied" else f"pending: applies {result.get('applies')}"
            self.note(f"{session['id']}: {avatar}/{emotion or '(no emotion)'} {when}")

    @selected_session_action
    async def action_toggle_pause(self, session: dict[str, Any]) -> None:
        sid, paused = session["id"], bool(session.get("paused"))
        request = self.client.resume(sid) if paused else self.client.pause(sid)
        if await self._call(f"{'resume' if paused else 'pause'} {sid}", request) is not None:
            self.note(f"{sid} {'resumed' if paused else 'paused: not listening'}")

    @selected_session_action
    async def action_start_broadcast(self, session: dict[str, Any]) -> None:
        sid = session["id"]
        to = await self.push_screen_wait(TargetScreen(f"Livestream session {sid} to:", self.last_target))
        if to is None:
            return
        self.last_target = to
        result = await self._call(f"broadcast {sid}", self.client.start_broadcast(to, sid))
        if result is not None:
            self.note(f"broadcast {result.get('id', '?')} of {sid}: {result.get('state', 'starting')} → "
                      f"{result.get('target', '?')}")

    @work(group="actions")
    async def action_stop_broadcast(self) -> None:
        broadcast = self.snap.get("broadcast") or {}
        if broadcast.get("available") is False:
            self.note(f"stop broadcast: broadcast not available — {broadcast.get('message', '')}", "warning")
            return
        running = active_broadcasts(broadcast)
        mine = [b for b in running if (b.get("source") or {}).get("session_id") == self.selected]
        if not running:
            self.notify("no broadcast is running", severity="warning")
            return
        if len(mine) == 1 or len(running) == 1:
            chosen = (mine or running)[0]
        else:
            chosen = await self.push_screen_wait(PickerScreen(
                "Stop which broadcast?", [(f"{b.get('id')} {b.get('state')} → {b.get('target')}", b) for b in running]))
            if chosen is None:
                return
        bid = str(chosen.get("id"))
        if not await self.push_screen_wait(ConfirmScreen(
                f"Stop broadcast {bid} → {chosen.get('target')}?\nViewers lose the stream.", yes="Stop broadcast")):
            return
        result = await self._call(f"stop broadcast {bid}", self.client.stop_broadcast(bid))
        if result is not None:
            self.note(f"broadcast {bid}: {result.get('state', 'stopped')}")


def run_console(url: str, token: str, poll_s: float = 1.0) -> None:
    """`avatarcast console`: run the console against the server at `url` until the operator quits."""
    ConsoleApp(AdminClient(url, token), poll_s=poll_s).run()
