"""
The application server: a length-prefixed JSON protocol over mutual TLS.

`protocol` holds the server, `ops` its operations, `wire` the frame format
and error codes shared with `client`, and `command` the ``tls4d app``
command. docs/app-protocol.md describes the protocol for other clients.
"""

from twisted_tls4d.app.client import AppClient, AppConnectionError, connect
from twisted_tls4d.app.protocol import AppServerFactory, AppServerProtocol
from twisted_tls4d.app.wire import AppError

__all__ = [
    "AppClient",
    "AppConnectionError",
    "AppError",
    "AppServerFactory",
    "AppServerProtocol",
    "connect",
]
