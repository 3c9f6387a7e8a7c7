"""Build a py-libp2p host with kowalski's security settings instead of the library defaults.

What we override and why (measured with py-libp2p 0.8.1, see docs/transport.md):
- security: noise only. The default list also offers /plaintext/2.0.0 (and TLS,
  secio), so a default host accepts an unauthenticated, unencrypted dialer;
- pnet: our spec-compliant XSalsa20 protector (`pnet.PnetTCPTransport`) instead
  of `psk=`, whose Salsa20/8-byte-nonce variant no other libp2p speaks;
- `max_connections_per_peer=1`: removes the swarm's 250 ms happy-eyeballs wait,
  so a connect takes ~10 ms instead of ~260 ms;
- no dial retries and short upgrade timeouts: a peer with another key is refused
  in seconds, not after 10-20 s of retries;
- an optional allow-list, enforced right after the noise handshake (when the
  remote peer ID is authenticated), before any stream can open.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from libp2p import new_swarm
from libp2p.abc import IRawConnection, ISecureConn
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.basic_host import BasicHost
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.peer.id import ID
from libp2p.security.exceptions import HandshakeFailure
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

from kowalski_node.adapters.libp2p.pnet import PnetTCPTransport
from kowalski_node.identity import ClusterKey, NodeIdentity

logger = logging.getLogger(__name__)

PeerFilter = Callable[[str], bool]


class PeerNotAllowed(HandshakeFailure):
    """The authenticated remote peer ID is not on the allow-list."""


class AllowListNoise(NoiseTransport):
    """Noise XX, plus a peer-ID check as soon as the handshake has authenticated the remote."""

    def __init__(self, identity: NodeIdentity, peer_filter: PeerFilter | None) -> None:
        super().__init__(
            identity.to_libp2p_keypair(), noise_privkey=create_new_x25519_key_pair().private_key
        )
        self._peer_filter = peer_filter
        self.rejected_peers = 0

    async def _check(self, secure: ISecureConn, direction: str) -> ISecureConn:
        if self._peer_filter is None:
            return secure
        remote = secure.get_remote_peer().to_base58()
        if self._peer_filter(remote):
            return secure
        self.rejected_peers += 1
        logger.warning("refused %s connection with %s: not on the allow-list", direction, remote)
        try:
            await secure.close()
        finally:
            raise PeerNotAllowed(f"peer {remote} is not on the allow-list")

    async def secure_inbound(self, conn: IRawConnection) -> ISecureConn:
        return await self._check(await super().secure_inbound(conn), "inbound")

    async def secure_outbound(self, conn: IRawConnection, peer_id: ID) -> ISecureConn:
        return await self._check(await super().secure_outbound(conn, peer_id), "outbound")


@dataclass(frozen=True)
class HostTimeouts:
    """Library timeouts we lower; a dial also gets an overall deadline in `Transport.connect`."""

    upgrade_s: float = 3.0
    stream_negotiation_s: int = 3  # BasicHost casts negotiation timeouts to int


@dataclass
class BuiltHost:
    host: BasicHost
    pnet: PnetTCPTransport
    noise: AllowListNoise


def build_host(
    identity: NodeIdentity,
    cluster_key: ClusterKey,
    *,
    peer_filter: PeerFilter | None = None,
    timeouts: HostTimeouts | None = None,
    verify_pnet_header: bool = True,
) -> BuiltHost:
    """A BasicHost with noise-only security, yamux, our pnet protector and low timeouts."""
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
    from libp2p.stream_muxer.yamux.yamux import Yamux

    t = timeouts or HostTimeouts()
    keypair = identity.to_libp2p_keypair()
    noise = AllowListNoise(identity, peer_filter)
    pnet = PnetTCPTransport(cluster_key.key, verify_header=verify_pnet_header)
    connection_config = ConnectionConfig(
        max_connections_per_peer=1,
        dial_timeout=t.upgrade_s,
        inbound_upgrade_timeout=t.upgrade_s,
        outbound_upgrade_timeout=t.upgrade_s,
        outbound_stream_protocol_negotiation_timeout=t.stream_negotiation_s,
        inbound_stream_protocol_negotiation_timeout=t.stream_negotiation_s,
    )
    swarm = new_swarm(
        key_pair=keypair,
        sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        transports=[pnet],
        retry_config=RetryConfig(max_retries=0),
        connection_config=connection_config,
    )
    host = BasicHost(network=swarm, negotiate_timeout=t.stream_negotiation_s)
    return BuiltHost(host=host, pnet=pnet, noise=noise)
