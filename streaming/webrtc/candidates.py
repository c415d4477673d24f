"""Extra ICE host candidates, for the addresses aioice never offers itself.

aioice gathers one host candidate per interface address but leaves out 127.0.0.1 and ::1, so on a host
whose only interface is `lo` (a container, a loopback-only network namespace, a laptop offline) a peer
connection gathers nothing, and aiortc then never even starts ICE. `add_host_candidates(pc, hosts)`
binds a UDP socket on each given address through the connection's own aioice `Connection`
(`get_component_candidates`, the call its gathering makes per address) and registers the candidates
on that connection, so they are paired, checked, answered, listed in the SDP and closed with it like
gathered ones. Nothing global is changed: only this peer connection offers them.

Call it after the ICE transports exist (an answerer: after setRemoteDescription; an offerer: after
addTransceiver) and before setLocalDescription, which gathers and starts ICE.
"""

from __future__ import annotations

import logging
from typing import Iterable

import aioice.ice
from aiortc import RTCPeerConnection
from aiortc.rtcicetransport import RTCIceGatherer

log = logging.getLogger(__name__)


def _gatherers(pc: RTCPeerConnection) -> list[RTCIceGatherer]:
    """Each ICE gatherer of `pc` once (a bundled call shares one across its transceivers)."""
    seen: dict[int, RTCIceGatherer] = {}
    for transceiver in pc.getTransceivers():
        dtls = transceiver.receiver.transport
        if dtls is not None:
            seen.setdefault(id(dtls.transport.iceGatherer), dtls.transport.iceGatherer)
    if pc.sctp is not None:
        gatherer = pc.sctp.transport.transport.iceGatherer
        seen.setdefault(id(gatherer), gatherer)
    return list(seen.values())


async def add_host_candidates(pc: RTCPeerConnection, hosts: Iterable[str]) -> list[str]:
    """Offer `hosts` (IP addresses) as host candidates of every ICE transport of `pc`, except those aioice
    gathers itself; returns the addresses added. An address that cannot be bound is skipped (logged)."""
    own = set(aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True))
    wanted = [h for h in dict.fromkeys(hosts) if h not in own]
    added: list[str] = []
    for gatherer in _gatherers(pc):
        if gatherer.state != "new":
            raise RuntimeError("host candidates must be added before the connection gathers (setLocalDescription)")
        connection = gatherer._connection  # the aioice Connection behind this gatherer
        # component 1 only: aiortc multiplexes RTP and RTCP (rtcp-mux), so it gathers no other component
        candidates = await connection.get_component_candidates(component=1, addresses=wanted)
        # gather_candidates() extends this list with what it finds, keeping these first
        connection._local_candidates.extend(candidates)
        added = [c.host for c in candidates]
    if len(added) < len(wanted):
        log.warning("could not offer ICE host candidates on %s", sorted(set(wanted) - set(added)))
    return added
