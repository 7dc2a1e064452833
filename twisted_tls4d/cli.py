"""
The ``tls4d`` command: the tools around the servers (issuing client
identities, and the application and SQL clients). The servers themselves run
with ``twistd -n tls4d``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from twisted_tls4d.errors import Tls4dError


def build_parser() -> argparse.ArgumentParser:
    """
    Returns:
        The parser of the ``tls4d`` command and its subcommands.
    """
    from twisted_tls4d import (
        check,
        dhparams,
        identity,
        lifecycle_cli,
        reloader,
        revocation,
    )
    from twisted_tls4d.app import command as app_command
    from twisted_tls4d.sql import command as sql_command

    parser = argparse.ArgumentParser(
        prog="tls4d",
        description=(
            "Tools for a tls4d server root. Run the servers themselves with "
            "'twistd -n tls4d --web --app --sql --root ROOT'."
        ),
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    identity.add_parser(commands)
    revocation.add_parser(commands)
    check.add_parser(commands)
    dhparams.add_parser(commands)
    lifecycle_cli.add_parsers(commands)
    reloader.add_parser(commands)
    app_command.add_parser(commands)
    sql_command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the ``tls4d`` command.

    Args:
        argv: The arguments after the program name; ``sys.argv[1:]`` if None.

    Returns:
        The exit status: 0 on success, 1 on an error reported in one line,
        2 on misuse (from argparse).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.run(args)
    except Tls4dError as e:
        print(f"tls4d: {e}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
