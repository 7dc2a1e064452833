"""
The SQL server: a line protocol over mutual TLS in front of SQLite, its
client and the ``tls4d sql`` command. ``docs/sql-protocol.md`` describes the
line format.
"""

from twisted_tls4d.sql.client import (
    Result,
    SQLClient,
    SQLConnectionError,
    SQLError,
    connect,
    format_table,
)
from twisted_tls4d.sql.protocol import SQLServerFactory, SQLServerProtocol

__all__ = [
    "Result",
    "SQLClient",
    "SQLConnectionError",
    "SQLError",
    "SQLServerFactory",
    "SQLServerProtocol",
    "connect",
    "format_table",
]
