"""`avatarcast console`: a Textual operator console, a client of the server's admin API only.

client.py   AdminClient (aiohttp, bearer token, clear errors) and FakeAdminClient (scripted snapshots)
panels.py   pure functions: snapshot data -> renderables and table cells
app.py      the Textual App: layout, key bindings, polling and event-stream workers, modals
"""
