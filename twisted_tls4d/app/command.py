"""
``tls4d app OP``: call the application server from the command line and
print the result as JSON, through `twisted_tls4d.app.blocking`.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import attrs

from twisted_tls4d.app.wire import DEFAULT_PORT, encode_payload
from twisted_tls4d.clienttls import ClientIdentity
from twisted_tls4d.errors import ConfigurationError

#: Seconds ``tls4d app`` waits for the whole exchange unless told otherwise.
_DEFAULT_TIMEOUT = 30.0

_DESCRIPTION = """\
Connect to a tls4d application server over TLS, present a client
certificate, say hello, make one call and print its result as JSON.

The client identity is a folder written by 'tls4d client NAME --out DIR'
(key.pem, cert.pem, ca.pem), given with --identity DIR, or the three files
given with --key, --cert and --ca (which also override the folder's files).
The server's certificate must be issued by a CA in the --ca file and cover
the --host name. The options may come before or after OP.
"""

_EPILOG = """\
examples:
  tls4d app ping --identity alice
  tls4d app hello --identity alice --port 19813
  tls4d app echo greeting=hello count=3 --identity alice
  tls4d app echo '{"nested": {"list": [1, 2]}}' --identity alice
  tls4d app whoami --host db.example.com --key k.pem --cert c.pem --ca ca.pem
  tls4d app sql 'SELECT * FROM t WHERE n > ?' 3 --identity alice
  tls4d app notify orders '{"id": 7}' --identity alice
  tls4d app listen orders stock --count 10 --identity alice
  tls4d app call orders.list status=open --identity alice

exit status: 0 with the result printed; 1 with one line on standard error
when the connection, the TLS handshake or the call fails (an error answer
shows its code); 2 on misuse.
"""

_ECHO_ARG_HELP = """\
the arguments sent: a JSON object, or KEY=VALUE pairs where VALUE is read
as JSON when it parses as JSON (3, true, [1,2], "3") and as a string
otherwise
"""


def tcp_port(text: str) -> int:
    """
    Read a TCP port for argparse; ``tls4d sql`` uses it too.

    Args:
        text: The option's value.

    Returns:
        The port, from 1 to 65535.

    Raises:
        argparse.ArgumentTypeError: ``text`` is not such a number.
    """
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        msg = f"{text!r} is not a TCP port; give a number from 1 to 65535"
        raise argparse.ArgumentTypeError(msg)
    return port


def positive_seconds(text: str) -> float:
    """
    Read a positive number of seconds for argparse; ``tls4d sql`` uses it too.

    Args:
        text: The option's value.

    Returns:
        The number of seconds, finite and above 0.

    Raises:
        argparse.ArgumentTypeError: ``text`` is not such a number.
    """
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        msg = f"{text!r} is not a positive number of seconds"
        raise argparse.ArgumentTypeError(msg)
    return seconds


def _json_or_string(text: str) -> Any:
    """
    Returns:
        ``text`` decoded as JSON if it is valid, finite JSON, else ``text``.
    """

    def refuse(name: str) -> Any:
        raise ValueError(name)

    try:
        value = json.loads(text, parse_constant=refuse)
    except ValueError:
        return text
    if isinstance(value, float) and not math.isfinite(value):
        return text
    return value


def parse_echo_arg(text: str) -> dict[str, Any]:
    """
    Read one argument of ``tls4d app echo``.

    Args:
        text: A JSON object, or ``KEY=VALUE``.

    Returns:
        The arguments it gives.

    Raises:
        argparse.ArgumentTypeError: It is neither, or the JSON is not an
            object.
    """
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as e:
            msg = f"{text!r} is not a valid JSON object ({e})"
            raise argparse.ArgumentTypeError(msg) from e
        if not isinstance(value, dict):
            msg = f"{text!r} is not a JSON object"
            raise argparse.ArgumentTypeError(msg)
        return value
    key, equals, raw = text.partition("=")
    if not equals or not key:
        msg = (
            f"{text!r} is neither KEY=VALUE nor a JSON object; write e.g. "
            'greeting=hello or \'{"greeting": "hello"}\''
        )
        raise argparse.ArgumentTypeError(msg)
    return {key: _json_or_string(raw)}


def _add_connection_options(
    parser: argparse.ArgumentParser, *, with_defaults: bool
) -> None:
    """
    Add the server and client-identity options to a parser.

    They go on the ``app`` parser (with their defaults) and again on each
    operation's parser without defaults, so that they may come before or
    after the operation's name without the second parse overwriting the
    first with a default.
    """

    def default(value: Any) -> Any:
        return value if with_defaults else argparse.SUPPRESS

    server = parser.add_argument_group("server")
    server.add_argument(
        "--host",
        default=default("localhost"),
        help="the server's host name or address (default: localhost)",
    )
    server.add_argument(
        "--port",
        type=tcp_port,
        default=default(DEFAULT_PORT),
        help=f"the application server's port (default: {DEFAULT_PORT})",
    )
    server.add_argument(
        "--timeout",
        type=positive_seconds,
        default=default(_DEFAULT_TIMEOUT),
        metavar="SECONDS",
        help=f"give up after this long (default: {_DEFAULT_TIMEOUT:g})",
    )
    client = parser.add_argument_group("client identity")
    client.add_argument(
        "--identity",
        type=Path,
        default=default(None),
        metavar="DIR",
        help="a folder from 'tls4d client NAME --out DIR' with key.pem, "
        "cert.pem and ca.pem",
    )
    client.add_argument(
        "--key", type=Path, default=default(None), help="the client's PEM private key"
    )
    client.add_argument(
        "--cert", type=Path, default=default(None), help="the client's PEM certificate"
    )
    client.add_argument(
        "--ca",
        type=Path,
        default=default(None),
        help="PEM certificates of the CA trusted to sign the server's certificate",
    )


def add_parser(commands: Any) -> None:
    """
    Add the ``app`` subcommand, with its operations, to the ``tls4d`` command.

    Args:
        commands: The subparsers object of the ``tls4d`` parser.
    """
    parser: argparse.ArgumentParser = commands.add_parser(
        "app",
        help="call the application server (ping, sql, notify, listen...)",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_connection_options(parser, with_defaults=True)
    operations = parser.add_subparsers(
        title="operations", metavar="OP", required=True, dest="app_op"
    )

    def operation(name: str, summary: str, description: str) -> Any:
        sub = operations.add_parser(name, help=summary, description=description)
        sub.set_defaults(run=run, app_args=[])
        return sub

    hello = operation(
        "hello",
        "show the server's name, protocol version, limits and operations",
        "Print what the server says of itself when a client says hello.",
    )
    ping = operation(
        "ping",
        'check that the server answers; prints "pong"',
        'Check that the application server answers; prints "pong".',
    )
    echo = operation(
        "echo",
        "have the server send arguments back",
        "Send arguments to the application server, which sends them back; "
        "prints them as JSON.",
    )
    echo.add_argument(
        "app_args", nargs="*", type=parse_echo_arg, metavar="ARG", help=_ECHO_ARG_HELP
    )
    whoami = operation(
        "whoami",
        "show how the server sees this client's certificate",
        "Print the subject, common name, issuer and SHA-256 fingerprint of "
        "the client certificate, as the server verified it.",
    )
    sql = operation(
        "sql",
        "run an SQL statement against the server's database",
        "Run one SQL statement against the database of the server's root "
        "(the SQL server's) and print the columns, rows and changes as JSON.",
    )
    sql.add_argument("statement", help="one SQL statement, with ? placeholders")
    sql.add_argument(
        "params",
        nargs="*",
        type=_json_or_string,
        metavar="PARAM",
        help="the value of each ?, in order: JSON when it parses as JSON, "
        "else a string",
    )
    notify = operation(
        "notify",
        "notify the clients subscribed to a topic",
        "Send a notification to the other clients subscribed to TOPIC; "
        "prints how many it reached.",
    )
    notify.add_argument("topic", help="the topic")
    notify.add_argument(
        "data",
        nargs="?",
        type=_json_or_string,
        default=None,
        help="what to send: JSON when it parses as JSON, else a string",
    )
    listen = operation(
        "listen",
        "print the notifications of topics as they come",
        "Subscribe to each TOPIC and print each notification as one line of "
        "JSON, until --count of them came or the command is interrupted. "
        "The command pings the server now and then so that it does not close "
        "the connection as idle.",
    )
    listen.add_argument("topics", nargs="+", metavar="TOPIC", help="a topic")
    listen.add_argument(
        "--count",
        type=_positive_count,
        default=None,
        metavar="N",
        help="stop after N notifications (default: never)",
    )
    call = operation(
        "call",
        "call an operation of the server's application",
        "Call an operation by name, with arguments, and print its result as "
        "JSON; for the operations an application adds to the server.",
    )
    call.add_argument("op", metavar="NAME", help="the operation's name")
    call.add_argument(
        "app_args", nargs="*", type=parse_echo_arg, metavar="ARG", help=_ECHO_ARG_HELP
    )
    for sub in (hello, ping, echo, whoami, sql, notify, listen, call):
        _add_connection_options(sub, with_defaults=False)


def _positive_count(text: str) -> int:
    """
    Read a count of 1 or more for argparse.

    Raises:
        argparse.ArgumentTypeError: ``text`` is not such a number.
    """
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        msg = f"{text!r} is not a count; give a whole number from 1"
        raise argparse.ArgumentTypeError(msg)
    return count


def identity_from_args(args: argparse.Namespace) -> ClientIdentity:
    """
    Find the client identity the options give (``identity``, ``key``,
    ``cert``, ``ca``); see `ClientIdentity.from_options`.
    """
    return ClientIdentity.from_options(args.identity, args.key, args.cert, args.ca)


def call_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """
    Merge the operation's arguments given on the command line.

    Args:
        args: The parsed options (``app_args``, a list of dicts).

    Returns:
        One arguments object.

    Raises:
        ConfigurationError: Two arguments give the same key.
    """
    merged: dict[str, Any] = {}
    for part in args.app_args:
        for key, value in part.items():
            if key in merged:
                msg = f"The argument {key!r} is given twice; give each key once."
                raise ConfigurationError(msg)
            merged[key] = value
    return merged


def _print(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def run(args: argparse.Namespace) -> int:
    """
    Make the call the options describe and print its result.

    Args:
        args: The parsed options.

    Returns:
        0; failures raise.

    Raises:
        ConfigurationError: The options are incomplete or inconsistent, or the
            arguments cannot be encoded as JSON.
        AppError: The server answered with an error.
        AppConnectionError: The connection or the TLS handshake failed, the
            server did not answer within ``--timeout``, or the command was
            interrupted.
        PEMError: An identity file is unusable.
    """
    from twisted_tls4d.app.blocking import BlockingClient
    from twisted_tls4d.app.client import AppConnectionError

    identity = identity_from_args(args)
    call_args = call_arguments(args)
    for what, value in (
        ("arguments", call_args),
        ("parameters", getattr(args, "params", [])),
        ("data", getattr(args, "data", None)),
    ):
        try:
            encode_payload({"value": value})
        except ValueError as e:
            msg = f"The {what} cannot be sent as JSON: {e}"
            raise ConfigurationError(msg) from e

    op = args.app_op
    try:
        with BlockingClient(
            args.host, args.port, identity, timeout=args.timeout, agent="tls4d app"
        ) as client:
            if op == "hello":
                _print(attrs.asdict(client.server))
            elif op == "sql":
                _print(client.sql(args.statement, *args.params))
            elif op == "notify":
                _print({"delivered": client.notify(args.topic, args.data)})
            elif op == "listen":
                _listen(client, args.topics, args.count)
            else:
                _print(client.call(args.op if op == "call" else op, **call_args))
    except KeyboardInterrupt:
        if op == "listen":
            return 0
        msg = f"The exchange with {args.host}:{args.port} was interrupted."
        raise AppConnectionError(msg) from None
    return 0


def _listen(client: Any, topics: list[str], count: int | None) -> None:
    """
    Subscribe to ``topics`` and print each notification as one JSON line,
    ``count`` of them or until interrupted.
    """
    limits = client.server.limits
    if limits is not None:
        client.keep_alive(limits.idle_timeout / 3)
    for topic in topics:
        client.subscribe(topic)
    for received, notification in enumerate(client.notifications(), 1):
        print(json.dumps(attrs.asdict(notification), ensure_ascii=False), flush=True)
        if count is not None and received >= count:
            return
