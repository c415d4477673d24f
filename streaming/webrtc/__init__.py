"""WebRTC calls with the avatar: aiortc tracks on one media clock, peers, and the service that holds them.

torch-free: the engine is reached through `peer.SessionBackend`, which the app layer implements.
"""

from streaming.webrtc.peer import CapacityError, LiveError, LivePeer, Offer, PeerOptions, SessionBackend
from streaming.webrtc.service import LiveService, ServiceOptions
from streaming.webrtc.tracks import AvatarAudioTrack, AvatarVideoTrack, MicReader

__all__ = ["AvatarAudioTrack", "AvatarVideoTrack", "CapacityError", "LiveError", "LivePeer", "LiveService",
           "MicReader", "Offer", "PeerOptions", "ServiceOptions", "SessionBackend"]
