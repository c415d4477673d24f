"""A LiveKit voice agent with an avatarcast avatar.

    pip install 'avatarcast[livekit]'
    export LIVEKIT_URL=wss://... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=...
    python examples/livekit_agent.py dev

AVATARCAST_AVATAR chooses where the avatar runs:
  local   (default) in this agent's process, published from the agent's participant;
  worker  as its own participant: `avatarcast livekit-worker` started here for each room;
  remote  as its own participant on another machine (a GPU box) that runs
          `avatarcast livekit-worker --room ROOM --agent-identity AGENT` with the same API key and secret.
"""

from __future__ import annotations

import os

from livekit.agents import Agent, AgentServer, AgentSession, JobContext, JobProcess, cli, room_io

from app.integrations.livekit import AvatarSession, LocalAvatar
from app.integrations.source import EngineSource


def prewarm(proc: JobProcess) -> None:
    """Load the model once per job process, before a call arrives (local mode only)."""
    if os.environ.get("AVATARCAST_AVATAR", "local") == "local":
        proc.userdata["avatar"] = EngineSource.load(model=os.environ.get("AVATARCAST_MODEL", "auto"))


async def start_avatar(session: AgentSession, room, source: EngineSource | None = None, mode: str | None = None):
    """Send the agent's speech to the avatar and publish the avatar in `room`; returns it (call aclose())."""
    mode = mode or os.environ.get("AVATARCAST_AVATAR", "local")
    if mode == "local":
        avatar = LocalAvatar(source or EngineSource.load())
    elif mode in ("worker", "remote"):
        avatar = AvatarSession(launcher="process" if mode == "worker" else None)
    else:
        raise ValueError(f"AVATARCAST_AVATAR must be local, worker or remote, not {mode!r}")
    await avatar.start(session, room)
    return avatar


server = AgentServer(setup_fnc=prewarm)


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    session = AgentSession(stt="deepgram/nova-3", llm="openai/gpt-4.1-mini", tts="cartesia/sonic-2")
    avatar = await start_avatar(session, ctx.room, ctx.proc.userdata.get("avatar"))
    ctx.add_shutdown_callback(avatar.aclose)
    await session.start(agent=Agent(instructions="You are a friendly assistant. Keep answers short."),
                        room=ctx.room, room_options=room_io.RoomOptions(audio_output=False))  # the avatar speaks


if __name__ == "__main__":
    cli.run_app(server)
