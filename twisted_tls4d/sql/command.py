"""
``tls4d sql``: run statements on a tls4d SQL server, from the command line,
from standard input, or at an interactive prompt.

The command reads the terminal with ``input()`` so that readline's editing
and history work; the reactor therefore runs in a background thread, and the
main thread hands it each call with ``blockingCallFromThread``.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import os
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

from twisted.internet.threads import blockingCallFromThread

from twisted_tls4d.app.command import positive_seconds, tcp_port
from twisted_tls4d.clienttls import ClientIdentity
from twisted_tls4d.sql import users, wire
from twisted_tls4d.sql.client import (
    DEFAULT_CONNECT_TIMEOUT,
    SQLClient,
    SQLConnectionError,
    SQLError,
    connect,
    format_table,
)

#: Where the interactive prompt keeps its history.
HISTORY_FILE = Path("~/.tls4d_sql_history")

#: Lines of history kept.
HISTORY_LENGTH = 1000

#: What leaves the interactive prompt, besides end of file (Ctrl-D).
_QUIT_COMMANDS = frozenset({".quit", ".exit", "\\q"})

_DESCRIPTION = """\
Connect to a tls4d SQL server over TLS, presenting a client certificate and
verifying the server's certificate and host name against the identity's CA,
then run statements: those given with --execute, else each line of standard
input, else (on a terminal) statements typed at a prompt with history.
"""

_EPILOG = """\
examples:
  tls4d sql --identity alice --execute "SELECT name FROM sqlite_master"
  tls4d sql --identity alice -e "CREATE TABLE t (a)" -e "INSERT INTO t VALUES (1)"
  tls4d sql --identity alice < statements.sql
  tls4d sql --identity alice           (interactive prompt)

Each statement is one line; lines that are empty or start with -- are
skipped. With --execute or from standard input, the command stops at the
first statement that fails and exits 1. Each statement commits on its own
unless you BEGIN a transaction; one left open when the command ends is
rolled back by the server.

exit status: 0 when every statement succeeded; 1 with one line on standard
error when the connection, the TLS handshake or a statement fails; 2 on
misuse.
"""


def add_parser(commands: Any) -> None:
    """
    Add the ``sql`` subcommand to the ``tls4d`` command.

    Args:
        commands: The subparsers object of the ``tls4d`` parser.
    """
    parser: argparse.ArgumentParser = commands.add_parser(
        "sql",
        help="run SQL statements on a tls4d SQL server",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--host",
        default="localhost",
        help="the server's host name or address; its certificate must cover it "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--port",
        type=tcp_port,
        default=wire.DEFAULT_PORT,
        help="the SQL server's port (default: %(default)s)",
    )
    parser.add_argument(
        "--identity",
        type=Path,
        metavar="DIR",
        help="folder written by 'tls4d client NAME --out DIR', holding key.pem, "
        "cert.pem and ca.pem",
    )
    parser.add_argument(
        "--key",
        type=Path,
        metavar="FILE",
        help="the client's private key (overrides DIR)",
    )
    parser.add_argument(
        "--cert",
        type=Path,
        metavar="FILE",
        help="the client's certificate (overrides DIR)",
    )
    parser.add_argument(
        "--ca",
        type=Path,
        metavar="FILE",
        help="the CA certificates that signed the server's certificate (overrides DIR)",
    )
    parser.add_argument(
        "--user",
        metavar="NAME",
        help="log in as this SQL user; the password is read from the terminal, "
        "or from the TLS4D_SQL_PASSWORD environment variable. Without "
        "--identity, --key and --cert, no certificate is presented (give --ca)",
    )
    parser.add_argument(
        "-e",
        "--execute",
        action="append",
        dest="statements",
        metavar="STATEMENT",
        help="run STATEMENT and print its result as a table; repeat for more, "
        "run in order in one session",
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=DEFAULT_CONNECT_TIMEOUT,
        metavar="SECONDS",
        help="how long to wait for the connection and the server's greeting "
        "(default: %(default)g)",
    )
    parser.set_defaults(run=_run)
    users.add_parser(commands)


def _run_reactor(reactor: Any) -> None:
    """
    Run ``reactor`` outside the main thread, where it may not install signal
    handlers (Ctrl-C stays with the prompt).
    """
    reactor.run(installSignalHandlers=False)


class _ReactorThread:
    """
    Runs the reactor in a daemon thread for the duration of a ``with`` block,
    and makes blocking calls into it from the main thread.
    """

    def __enter__(self) -> _ReactorThread:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self._thread = threading.Thread(
            target=_run_reactor,
            args=(self.reactor,),
            name="tls4d-sql-reactor",
            daemon=True,
        )
        self._thread.start()
        return self

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """
        Returns:
            What the Deferred returned by ``function(*args)``, called in the
            reactor thread, fires with; its failure is raised here.
        """
        return blockingCallFromThread(self.reactor, function, *args)

    def __exit__(self, *exc_info: object) -> None:
        self.reactor.callFromThread(self.reactor.stop)
        self._thread.join(timeout=5)


def _run(args: argparse.Namespace) -> int:
    """
    Run ``tls4d sql``.

    Returns:
        0 when every statement succeeded (or the prompt was left), 1 when a
        statement given with --execute or on standard input failed.

    Raises:
        SQLConnectionError: The connection failed or was lost, or Ctrl-C
            interrupted the command outside the prompt.
        PEMError: The identity's files are unusable.
    """
    identity: ClientIdentity | None = None
    if args.user is None or args.identity or args.key or args.cert:
        identity = ClientIdentity.from_options(
            args.identity, args.key, args.cert, args.ca
        )
    password = None
    if args.user is not None:
        password = os.environ.get("TLS4D_SQL_PASSWORD")
        if password is None:
            password = getpass.getpass(f"Password for {args.user}: ")
    with _ReactorThread() as reactor_thread:
        try:
            client: SQLClient = reactor_thread.call(
                functools.partial(
                    connect,
                    reactor_thread.reactor,
                    args.host,
                    args.port,
                    identity,
                    args.timeout,
                    ca=args.ca,
                    user=args.user,
                    password=password,
                )
            )
        except KeyboardInterrupt:
            msg = f"Interrupted while connecting to {args.host}:{args.port}."
            raise SQLConnectionError(msg) from None
        except SQLError as e:
            msg = f"The SQL server refused the login: {e.message}"
            raise SQLConnectionError(msg) from None
        try:
            if args.statements:
                return _run_statements(
                    reactor_thread, client, args.statements, sys.stdout
                )
            if sys.stdin.isatty():
                return _interactive(reactor_thread, client, args)
            return _run_statements(reactor_thread, client, _stdin_lines(), sys.stdout)
        except KeyboardInterrupt:
            msg = (
                "Interrupted; the server finishes the statement it is running and "
                "rolls back a transaction left open."
            )
            raise SQLConnectionError(msg) from None
        finally:
            reactor_thread.call(client.close)


def _stdin_lines() -> Iterable[str]:
    """
    Yields:
        The lines of standard input, read as UTF-8 and without line ends.

    Raises:
        ValueError: A line is not valid UTF-8.
    """
    for number, raw in enumerate(sys.stdin.buffer, start=1):
        try:
            yield raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            msg = f"Line {number} of standard input is not valid UTF-8 ({e.reason})."
            raise ValueError(msg) from e


def _skipped(line: str) -> bool:
    """
    Returns:
        Whether a line holds no statement: empty, or a ``--`` comment.
    """
    text = line.strip()
    return not text or text.startswith("--")


def _describe_error(error: SQLError) -> str:
    """
    Returns:
        One line for a failed statement.
    """
    if error.code == wire.ERROR_SQL:
        return f"SQL error: {error.message}"
    return f"The server refused the statement: {error.message}"


def _run_statements(
    reactor_thread: _ReactorThread,
    client: SQLClient,
    statements: Iterable[str],
    out: TextIO,
) -> int:
    """
    Run statements in order, printing a table for each, and stop at the
    first that fails.

    Returns:
        0 if all succeeded, 1 if one failed (reported on standard error).
    """
    first = True
    try:
        for statement in statements:
            if _skipped(statement):
                continue
            try:
                result = reactor_thread.call(client.execute, statement)
            except SQLError as e:
                print(f"tls4d: {_describe_error(e)}", file=sys.stderr)
                return 1
            if not first:
                print(file=out)
            first = False
            print(format_table(result), file=out, flush=True)
    except ValueError as e:
        print(f"tls4d: {e}", file=sys.stderr)
        return 1
    return 0


def _interactive(
    reactor_thread: _ReactorThread, client: SQLClient, args: argparse.Namespace
) -> int:
    """
    Read statements at a prompt (``sql>``, ``sql*>`` inside a transaction)
    until end of file or ``.quit``, printing each result or error.

    Returns:
        0.
    """
    readline = _start_history()
    print(
        f"Connected to the SQL server at {args.host}:{args.port} as "
        f"{client.greeting.get('client')!r}. One statement a line; "
        ".quit or Ctrl-D leaves."
    )
    in_transaction = False
    try:
        while True:
            try:
                line = input("sql*> " if in_transaction else "sql> ")
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print()
                continue
            if _skipped(line):
                continue
            if line.strip() in _QUIT_COMMANDS:
                return 0
            try:
                result = reactor_thread.call(client.execute, line.strip())
            except SQLError as e:
                print(_describe_error(e))
                if e.in_transaction is not None:
                    in_transaction = e.in_transaction
                continue
            except ValueError as e:
                print(e)
                continue
            except KeyboardInterrupt:
                print("\nStopped waiting; the server finishes the statement first.")
                continue
            in_transaction = result.in_transaction
            print(format_table(result))
    finally:
        _save_history(readline)


def _start_history() -> Any:
    """
    Returns:
        The readline module with the saved history loaded, or None where
        readline is not available.
    """
    try:
        import readline
    except ImportError:
        return None
    readline.set_history_length(HISTORY_LENGTH)
    try:
        readline.read_history_file(HISTORY_FILE.expanduser())
    except OSError:
        pass
    return readline


def _save_history(readline: Any) -> None:
    """
    Save the prompt's history, readable by its owner only since statements
    can hold data, if readline is there; a history that cannot be written is
    not worth an error.
    """
    if readline is None:
        return
    path = HISTORY_FILE.expanduser()
    try:
        readline.write_history_file(path)
        path.chmod(0o600)
    except OSError:
        pass
