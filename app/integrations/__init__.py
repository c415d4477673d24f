"""Voice-agent adapters: avatarcast as a LiveKit Agents avatar and as a Pipecat video service.

Both are thin drivers of the one session contract (avatar/session.py) over a `SessionSource`
(source.py): an in-process engine today, a serve worker the same way later. The frameworks are optional
extras (`pip install 'avatarcast[livekit]'`, `'avatarcast[pipecat]'`); nothing here imports them until
their adapter module is imported.
"""
