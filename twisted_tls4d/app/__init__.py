"""
The application server: a length-prefixed JSON protocol over mutual TLS, on
which a desktop application's clients and server talk.

`protocol` holds the server, `ops` the API of an application's handlers
(`Registry`, `Request`, `Identity`) and the built-in operations, `database`
the way to the SQL server's database, `wire` the frame format and error
codes, `client` the Twisted client, `blocking` the blocking client, and
`command` the ``tls4d app`` command. docs/app-protocol.md specifies the
protocol for other clients.
"""

from twisted_tls4d.app.client import (
    AppClient,
    AppConnectionError,
    Notification,
    ServerInfo,
    connect,
)
from twisted_tls4d.app.ops import Identity, Registry, Request
from twisted_tls4d.app.protocol import AppServerFactory, AppServerProtocol
from twisted_tls4d.app.wire import AppError

__all__ = [
    "AppClient",
    "AppConnectionError",
    "AppError",
    "AppServerFactory",
    "AppServerProtocol",
    "Identity",
    "Notification",
    "Registry",
    "Request",
    "ServerInfo",
    "connect",
]
