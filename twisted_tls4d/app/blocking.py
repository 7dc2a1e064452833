"""
A blocking client of the application server, for scripts and programs that
do not use Twisted: `BlockingClient` (and `blocking_call` for one call).

It is `twisted_tls4d.app.client` underneath: the reactor runs in a
background thread of its own, started at the first connection and stopped
when the program exits, and each method waits for its Deferred with
`twisted.internet.threads.blockingCallFromThread`. A reactor runs once a
process, so a Twisted program uses `twisted_tls4d.app.client.connect`
instead.
"""

from __future__ import annotations

import atexit
import queue
import threading
from collections.abc import Iterator, Mapping
from functools import partial
from types import TracebackType
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import blockingCallFromThread

from twisted_tls4d import clienttls
from twisted_tls4d.app.client import (
    DEFAULT_CONNECT_TIMEOUT,
    AppClient,
    AppConnectionError,
    Notification,
    ServerInfo,
    connect,
)

__all__ = ["BlockingClient", "blocking_call"]

#: Seconds to wait for the reactor thread to start, and to stop at exit.
_THREAD_WAIT = 10.0

_started = threading.Lock()
_thread: threading.Thread | None = None


def _reactor() -> Any:
    """
    Returns:
        The global reactor, running in this module's thread (started now if
        it is not).

    Raises:
        RuntimeError: The reactor runs already, in another thread than this
            module's: the program uses Twisted and wants ``connect``.
    """
    global _thread
    from twisted.internet import reactor

    running_reactor: Any = reactor
    with _started:
        if _thread is not None and _thread.is_alive():
            return reactor
        if running_reactor.running:
            msg = (
                "The Twisted reactor runs already; in a Twisted program use "
                "twisted_tls4d.app.client.connect, not BlockingClient."
            )
            raise RuntimeError(msg)
        running = threading.Event()
        running_reactor.callWhenRunning(running.set)
        _thread = threading.Thread(
            target=running_reactor.run,
            kwargs={"installSignalHandlers": False},
            name="tls4d-reactor",
            daemon=True,
        )
        _thread.start()
        if not running.wait(_THREAD_WAIT):
            msg = "The Twisted reactor did not start in its thread."
            raise RuntimeError(msg)
        atexit.register(_stop_reactor)
        return reactor


def _stop_reactor() -> None:
    """
    Stop the reactor thread as the program exits, so that connections close
    cleanly.
    """
    from twisted.internet import reactor

    stopping: Any = reactor
    if _thread is not None and _thread.is_alive():
        stopping.callFromThread(stopping.stop)
        _thread.join(_THREAD_WAIT)


class BlockingClient:
    """
    A connection to the application server whose methods block until the
    answer comes. Use it as a context manager, or `close` it::

        with BlockingClient("db.example.com", 19813, identity) as client:
            print(client.call("ping"))
            client.sql("INSERT INTO t VALUES (?)", 42)

    Attributes:
        server: What the server said in its ``hello`` answer.
        timeout: Seconds each call may take.
    """

    def __init__(
        self,
        host: str,
        port: int,
        identity: clienttls.ClientIdentity,
        *,
        timeout: float = DEFAULT_CONNECT_TIMEOUT,
        **options: Any,
    ) -> None:
        """
        Connect, complete the TLS handshake and say hello.

        Args:
            host: The server's host name or address.
            port: The server's port.
            identity: The client's key, certificate and trusted CA.
            timeout: Seconds the connection may take, and then each call.
            **options: Further options of `twisted_tls4d.app.client.connect`
                (``reconnect``, ``keepalive``, ``agent``...).

        Raises:
            AppConnectionError: The connection, the handshake or the hello
                failed, or took longer than ``timeout``.
            PEMError: An identity file is unusable.
            RuntimeError: The reactor runs already in this process.
        """
        self._reactor: Any = _reactor()
        self.timeout = timeout
        self._notifications: queue.Queue[Notification] = queue.Queue()
        connecting: Any = partial(
            connect, self._reactor, host, port, identity, timeout=timeout, **options
        )
        self._client: AppClient = blockingCallFromThread(self._reactor, connecting)
        server: ServerInfo | None = self._client.server
        assert server is not None
        self.server = server

    @property
    def peer(self) -> str:
        """``host:port`` of the server."""
        return self._client.peer

    def _wait(self, what: str, make: Any) -> Any:
        """
        Run ``make()`` in the reactor thread and wait for the Deferred it
        returns, at most `timeout` seconds.
        """

        def start() -> defer.Deferred[Any]:
            def late(result: object, seconds: float) -> object:
                msg = f"No answer to {what} from {self.peer} within {seconds:g} s."
                raise AppConnectionError(msg)

            started: defer.Deferred[Any] = make()
            return started.addTimeout(self.timeout, self._reactor, onTimeoutCancel=late)

        return blockingCallFromThread(self._reactor, start)

    def call(self, op: str, /, **args: Any) -> Any:
        """
        Call an operation of the server and wait for its answer.

        Returns:
            The answer's result.

        Raises:
            AppError: The server answered with an error.
            AppConnectionError: The connection was lost, or no answer came
                within `timeout`.
            ValueError: The arguments cannot be encoded as JSON.
        """
        return self._wait(repr(op), lambda: self._client.call(op, **args))

    def sql(self, statement: str, *parameters: Any) -> dict[str, Any]:
        """
        Run one SQL statement against the server's database.

        Returns:
            ``{"columns", "rows", "changes", "in_transaction"}``.

        Raises:
            AppError: The statement failed (``sql_error``), or see `call`.
        """
        result: dict[str, Any] = self._wait(
            "sql", lambda: self._client.sql(statement, *parameters)
        )
        return result

    def notify(self, topic: str, data: Any = None) -> int:
        """
        Send a notification to the other clients subscribed to ``topic``.

        Returns:
            How many connections it reached.
        """
        delivered: int = self._wait("notify", lambda: self._client.notify(topic, data))
        return delivered

    def subscribe(self, topic: str) -> None:
        """
        Receive the notifications of ``topic``; `notifications` yields them.
        """
        self._wait(
            "subscribe",
            lambda: self._client.subscribe(topic, self._notifications.put),
        )

    def notifications(self, timeout: float | None = None) -> Iterator[Notification]:
        """
        Yield the notifications of the topics subscribed to, as they come.

        Args:
            timeout: Seconds to wait for each; None to wait for ever.

        Yields:
            Each notification.

        Raises:
            AppConnectionError: None came within ``timeout``.
        """
        while True:
            try:
                yield self._notifications.get(timeout=timeout)
            except queue.Empty:
                msg = f"No notification from {self.peer} within {timeout:g} s."
                raise AppConnectionError(msg) from None

    def keep_alive(self, interval: float) -> None:
        """
        Ping the server every ``interval`` seconds, so that it does not close
        the connection as idle while the program waits for notifications.
        """
        blockingCallFromThread(self._reactor, self._client.keep_alive, interval)

    def close(self) -> None:
        """
        Close the connection.
        """
        closing: Any = self._client.close
        blockingCallFromThread(self._reactor, closing)

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def blocking_call(
    host: str,
    port: int,
    identity: clienttls.ClientIdentity,
    op: str,
    args: Mapping[str, Any] | None = None,
    *,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> Any:
    """
    Connect, make one call, close, and return its result.

    Args:
        host: The server's host name or address.
        port: The server's port.
        identity: The client's key, certificate and trusted CA.
        op: The operation's name.
        args: Its arguments.
        timeout: Seconds the connection may take, and then the call.

    Returns:
        The answer's result.

    Raises:
        AppError: The server answered with an error.
        AppConnectionError: The connection, the handshake or the exchange
            failed, or took longer than ``timeout``.
        PEMError: An identity file is unusable.
    """
    with BlockingClient(host, port, identity, timeout=timeout) as client:
        return client.call(op, **(args or {}))
