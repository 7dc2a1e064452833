"""
The guard in front of every listener: it bounds the connections open at
once, in total and per peer address, cuts off a peer whose unsent answers
pile up because it does not read them, and gives a TLS client a deadline
for its handshake.

The guard wraps the listener's outermost factory (for a TLS listener, the
`TLSMemoryBIOFactory`), so a connection over a limit is closed as soon as
it is accepted, before any TLS work. Refusals are logged once per peer and
minute with a count, not once per connection, so a flood cannot flood the
log too.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import attrs
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocolFactory,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import implementer

_log = Logger()

#: The most connections a listener holds open at once.
DEFAULT_MAX_CONNECTIONS = 100

#: The most connections a listener holds open at once from one peer address.
DEFAULT_MAX_CONNECTIONS_PER_PEER = 32

#: The most bytes queued for a peer that does not read, past the transport's
#: own buffer, before the connection is cut.
DEFAULT_MAX_UNSENT = 4 * 1024 * 1024

#: Seconds between two log lines about the refusals of one peer.
REFUSAL_LOG_INTERVAL = 60.0

#: Seconds a connection being closed has to send what is queued for it
#: before it is cut.
CLOSE_GRACE = 30.0

#: The most peers whose refusals are logged one by one in a minute; the
#: refusals of further peers are counted together.
MAX_PEERS_LOGGED = 1000

#: The key under which refusals past `MAX_PEERS_LOGGED` peers are counted.
_OTHER_PEERS = "other peers"


@attrs.frozen
class GuardLimits:
    """
    What a guarded listener allows.

    Attributes:
        max_connections: The most connections open at once.
        max_connections_per_peer: The most connections open at once from one
            peer address.
        max_unsent: The most bytes queued for a peer past the transport's own
            buffer (which holds about 64 KiB beside the kernel's), while it
            does not read; past it the connection is cut.
        handshake_timeout: Seconds a TLS client has to complete its
            handshake, or None for no deadline (a plain listener, or one
            whose protocol keeps its own).
    """

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_peer: int = DEFAULT_MAX_CONNECTIONS_PER_PEER
    max_unsent: int = DEFAULT_MAX_UNSENT
    handshake_timeout: float | None = None


def limits_from(settings: Any, *, tls_handshake: bool = False) -> GuardLimits:
    """
    Args:
        settings: The server's `Settings`.
        tls_handshake: Whether the guard times the TLS handshake (with
            ``handshake_timeout``).

    Returns:
        The guard's part of the settings.
    """
    return GuardLimits(
        max_connections=settings.max_connections,
        max_connections_per_peer=settings.max_connections_per_peer,
        max_unsent=settings.max_unsent,
        handshake_timeout=settings.handshake_timeout if tls_handshake else None,
    )


#: Files the process needs beside its connections: listeners, the database
#: and its journal, logs, the thread pools' pipes.
_OTHER_FILES = 64


def warn_if_few_files(listeners: int, limits: GuardLimits) -> None:
    """
    Log a warning if the process may open fewer files than ``listeners``
    listeners of ``limits.max_connections`` connections need: past its
    limit, the system refuses new connections before the guard sees them.

    Args:
        listeners: How many listeners the process runs.
        limits: Their limits.
    """
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = listeners * limits.max_connections + _OTHER_FILES
    if soft != resource.RLIM_INFINITY and soft < needed:
        _log.warn(
            "This process may open {soft} files, but its {listeners} listeners "
            "may hold {connections} connections at once (--max-connections) "
            "beside about {other} other files; raise the limit (ulimit -n "
            "{needed}, or LimitNOFILE= under systemd) or lower --max-connections",
            soft=soft,
            listeners=listeners,
            connections=listeners * limits.max_connections,
            other=_OTHER_FILES,
            needed=needed,
        )


def peer_address(address: IAddress | None) -> str:
    """
    Returns:
        The host of a connection's peer, an IPv4 address seen through an
        IPv6 socket written as IPv4; the address in words if it has no host.
    """
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return str(address)
    try:
        parsed = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(parsed)


def _peer_label(address: IAddress) -> str:
    host = peer_address(address)
    port = getattr(address, "port", None)
    if port is None:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _handshake_done(tls_protocol: Any) -> bool:
    """
    Returns:
        Whether the TLS connection under ``tls_protocol`` (a
        `TLSMemoryBIOProtocol`) has received its peer's Finished message,
        which ends a handshake.
    """
    handle = tls_protocol.getHandle()
    return handle is not None and handle.get_peer_finished() is not None


@attrs.define
class _RefusalWindow:
    """
    The refusals of one peer since its last log line.
    """

    why: str
    count: int = 0
    call: IDelayedCall | None = None


@implementer(IPushProducer)
class _SendBuffer:
    """
    The guard's producer on the real transport: the transport pauses it when
    its buffer (and the kernel's below) is full, and resumes it once all of
    it is sent.
    """

    def __init__(self, connection: GuardedConnection) -> None:
        self.connection = connection

    def pauseProducing(self) -> None:  # noqa: N802 (Twisted's name)
        """
        The peer is not taking what is sent: start counting.
        """
        self.connection.send_buffer_full()

    def resumeProducing(self) -> None:  # noqa: N802 (Twisted's name)
        """
        Everything queued was sent.
        """
        self.connection.send_buffer_drained()

    def stopProducing(self) -> None:  # noqa: N802 (Twisted's name)
        """
        The connection is gone.
        """
        self.connection.send_stopped()


class GuardedConnection(ProtocolWrapper):
    """
    One accepted connection of a `ConnectionGuard`: the transport of the
    listener's protocol (for TLS, of the TLS layer).

    It registers itself, through a `_SendBuffer`, as the streaming producer
    of the real transport, so it learns when the peer stops taking data;
    the producer the protocol above registers is paused and resumed in turn.
    While the transport is full, every byte written is counted, and past
    ``max_unsent`` the connection is cut. A connection that was asked to
    close and still cannot send what is queued after `CLOSE_GRACE` seconds
    is cut too.

    Attributes:
        peer: The peer's address, as the limits count it.
    """

    factory: ConnectionGuard

    def __init__(
        self, factory: ConnectionGuard, wrapped: Any, peer: str, address: IAddress
    ) -> None:
        super().__init__(factory, wrapped)
        self.peer = peer
        self._address = address
        self._host: IAddress | None = None
        self._producer: Any = None
        self._streaming = True
        self._full = False
        self._queued = 0
        self._closing = False
        self._cut = False
        self._buffer = _SendBuffer(self)
        self._buffer_registered = False
        self._deadlines: list[IDelayedCall] = []

    def makeConnection(self, transport: Any) -> None:  # noqa: N802 (Twisted's name)
        """
        Watch the real transport's buffer, start the handshake deadline, and
        connect the protocol above.
        """
        transport.registerProducer(self._buffer, True)
        self._buffer_registered = True
        limits = self.factory.limits
        if limits.handshake_timeout is not None:
            self._deadlines.append(
                self.factory.clock.callLater(
                    limits.handshake_timeout, self._check_handshake
                )
            )
        super().makeConnection(transport)

    # The transport of the protocol above

    def getPeer(self) -> IAddress:  # noqa: N802 (Twisted's name)
        """
        Returns:
            The peer's address, as accepted (asked for on every request by
            HTTP, so not asked of the socket each time).
        """
        return self._address

    def getHost(self) -> IAddress:  # noqa: N802 (Twisted's name)
        """
        Returns:
            The listening side's address, asked of the socket once.
        """
        if self._host is None:
            self._host = self.transport.getHost()
        return self._host

    def write(self, data: bytes) -> None:
        """
        Send ``data``; count it if the transport is full, and cut the
        connection once the count passes ``max_unsent``.
        """
        if self._cut:
            return
        if self._full:
            self._queued += len(data)
            if self._queued > self.factory.limits.max_unsent:
                self._cut_off()
                return
        self.transport.write(data)

    def writeSequence(self, data: Any) -> None:  # noqa: N802 (Twisted's name)
        """
        Send the bytes of ``data`` as one write.
        """
        self.write(b"".join(data))

    def registerProducer(self, producer: Any, streaming: bool) -> None:  # noqa: N802
        """
        Take the producer of the protocol above: a streaming one is paused
        and resumed with the real transport's buffer; a pulling one (which
        writes only when asked, so piles nothing up) is handed to the real
        transport.

        Raises:
            RuntimeError: A producer is registered already.
        """
        if self._producer is not None:
            msg = f"Cannot register {producer!r}: {self._producer!r} is registered."
            raise RuntimeError(msg)
        if not streaming:
            self._release_buffer()
            self.transport.registerProducer(producer, False)
            self._producer = producer
            self._streaming = False
            return
        self._producer = producer
        self._streaming = True
        if self._full:
            producer.pauseProducing()

    def unregisterProducer(self) -> None:  # noqa: N802 (Twisted's name)
        """
        Forget the producer of the protocol above.
        """
        producer, self._producer = self._producer, None
        if producer is not None and not self._streaming:
            self.transport.unregisterProducer()
            if not self._closing and self.connected:
                self.transport.registerProducer(self._buffer, True)
                self._buffer_registered = True

    def loseConnection(self) -> None:  # noqa: N802 (Twisted's name)
        """
        Close once what is queued is sent; cut the connection if that takes
        more than `CLOSE_GRACE` seconds.
        """
        if self._closing:
            return
        self._closing = True
        self.disconnecting = True
        self._release_buffer()
        self._deadlines.append(
            self.factory.clock.callLater(CLOSE_GRACE, self._close_overdue)
        )
        self.transport.loseConnection()

    def stopConsuming(self) -> None:  # noqa: N802 (Twisted's name)
        """
        Forget the producer above and close, as a transport does.
        """
        self.unregisterProducer()
        self.loseConnection()

    def abortConnection(self) -> None:  # noqa: N802 (Twisted's name)
        """
        Close at once, dropping what is queued.
        """
        self._closing = True
        self.disconnecting = True
        self.transport.abortConnection()

    # What the real transport's buffer says

    def send_buffer_full(self) -> None:
        """
        The real transport's buffer is full: pause the protocol above and
        count what it still writes.
        """
        if self._full:
            return
        self._full = True
        self._queued = 0
        if self._producer is not None:
            self._producer.pauseProducing()

    def send_buffer_drained(self) -> None:
        """
        Everything queued was sent: resume the protocol above.
        """
        self._full = False
        self._queued = 0
        if self._producer is not None:
            self._producer.resumeProducing()

    def send_stopped(self) -> None:
        """
        The connection is gone: stop the protocol above.
        """
        if self._producer is not None:
            self._producer.stopProducing()

    def _release_buffer(self) -> None:
        """
        Stop watching the real transport's buffer, so that it can close.
        """
        if self._buffer_registered:
            self._buffer_registered = False
            self._full = False
            self.transport.unregisterProducer()

    # Deadlines

    def _cut_off(self) -> None:
        self._cut = True
        _log.warn(
            "{label}: cut off {peer}: more than {limit} bytes waited unread for "
            "it (--max-unsent sets the limit)",
            label=self.factory.label,
            peer=_peer_label(self._address),
            limit=self.factory.limits.max_unsent,
        )
        self.abortConnection()

    def _check_handshake(self) -> None:
        if self._closing or _handshake_done(self.wrappedProtocol):
            return
        _log.info(
            "{label}: closing {peer}: no TLS handshake within {timeout:g} s "
            "(--handshake-timeout)",
            label=self.factory.label,
            peer=_peer_label(self._address),
            timeout=self.factory.limits.handshake_timeout,
        )
        self.wrappedProtocol.abortConnection()

    def _close_overdue(self) -> None:
        if self._cut:
            return
        _log.info(
            "{label}: cut off {peer}: it did not take the last {grace:g} s of "
            "data sent before the close",
            label=self.factory.label,
            peer=_peer_label(self._address),
            grace=CLOSE_GRACE,
        )
        self._cut = True
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802
        """
        Stop the deadlines, count the connection out, and tell the protocol
        above.
        """
        self._closing = True
        self._producer = None
        # The protocols above may still ask to close while they learn of it.
        super().connectionLost(reason)
        for call in self._deadlines:
            if call.active():
                call.cancel()
        self._deadlines.clear()


class ConnectionGuard(WrappingFactory):
    """
    Wraps a listener's factory: refuses connections over its limits at
    once, and makes each accepted one a `GuardedConnection`.

    Attributes:
        label: The listener, for the log (``"HTTPS web server"``).
        limits: What it allows.
        clock: The reactor's clock, for deadlines and the refusal log.
        open_connections: How many connections are open.
        open_by_peer: How many connections each peer address has open.
    """

    def __init__(
        self,
        wrapped: IProtocolFactory,
        label: str,
        limits: GuardLimits,
        clock: IReactorTime,
    ) -> None:
        super().__init__(wrapped)
        self.label = label
        self.limits = limits
        self.clock = clock
        self.open_connections = 0
        self.open_by_peer: dict[str, int] = {}
        self._refusals: dict[tuple[str, str], _RefusalWindow] = {}

    def buildProtocol(self, addr: IAddress) -> Protocol | None:  # noqa: N802
        """
        Returns:
            The guarded protocol of a new connection, or None to close it at
            once: the listener or the peer holds as many connections as it
            may, or the wrapped factory refused it.
        """
        peer = peer_address(addr)
        limits = self.limits
        if self.open_connections >= limits.max_connections:
            self._refused(
                peer,
                "full",
                f"the listener holds {limits.max_connections} connections, the "
                "most --max-connections allows",
            )
            return None
        if self.open_by_peer.get(peer, 0) >= limits.max_connections_per_peer:
            self._refused(
                peer,
                "peer",
                f"it holds {limits.max_connections_per_peer} connections, the "
                "most --max-connections-per-peer allows",
            )
            return None
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:
            return None
        self.open_connections += 1
        self.open_by_peer[peer] = self.open_by_peer.get(peer, 0) + 1
        return GuardedConnection(self, wrapped, peer, addr)

    def unregisterProtocol(self, p: Any) -> None:  # noqa: N802 (Twisted's name)
        """
        Count a closed connection out.
        """
        self.protocols.pop(p, None)
        self.open_connections -= 1
        left = self.open_by_peer[p.peer] - 1
        if left:
            self.open_by_peer[p.peer] = left
        else:
            del self.open_by_peer[p.peer]

    def doStop(self) -> None:  # noqa: N802 (Twisted's name)
        """
        Log the refusals counted since the last line, and stop.
        """
        for key in list(self._refusals):
            window = self._refusals.pop(key)
            if window.call is not None and window.call.active():
                window.call.cancel()
            self._log_count(key[1], window)
        super().doStop()

    # The refusal log

    def _refused(self, peer: str, kind: str, why: str) -> None:
        """
        Log a refusal if it is the peer's first for a minute; else count it.
        """
        key = (kind, peer)
        window = self._refusals.get(key)
        if window is None and len(self._refusals) >= MAX_PEERS_LOGGED:
            key = (kind, _OTHER_PEERS)
            window = self._refusals.get(key)
        if window is not None:
            window.count += 1
            return
        _log.warn(
            "{label}: refused a connection from {peer}: {why}; further refusals "
            "are counted and logged once a minute",
            label=self.label,
            peer=key[1],
            why=why,
        )
        self._open_window(key, _RefusalWindow(why))

    def _open_window(self, key: tuple[str, str], window: _RefusalWindow) -> None:
        self._refusals[key] = window
        window.call = self.clock.callLater(
            REFUSAL_LOG_INTERVAL, self._close_window, key
        )

    def _close_window(self, key: tuple[str, str]) -> None:
        """
        Log the count of a minute's refusals of a peer, and count on for
        another minute; forget the peer after a minute without any.
        """
        window = self._refusals.pop(key)
        if window.count:
            self._log_count(key[1], window)
            self._open_window(key, _RefusalWindow(window.why))

    def _log_count(self, peer: str, window: _RefusalWindow) -> None:
        if not window.count:
            return
        _log.warn(
            "{label}: refused {count} more connection(s) from {peer} in the "
            "last minute: {why}",
            label=self.label,
            count=window.count,
            peer=peer,
            why=window.why,
        )
