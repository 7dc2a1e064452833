"""
Issuing a client identity: ``tls4d client NAME --root ROOT --out DIR`` writes
what a remote machine needs to use the application and SQL servers.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from twisted_tls4d import clienttls, pki, revocation, root
from twisted_tls4d.errors import ConfigurationError
from twisted_tls4d.settings import add_root_option


def issue_client_identity(
    layout: root.RootLayout,
    name: str,
    out: Path,
    days: int = pki.DEFAULT_CERTIFICATE_DAYS,
) -> clienttls.ClientIdentity:
    """
    Make a key and a client certificate for ``name``, signed by the root's
    local CA, and write them with the CA certificate into ``out``. A copy of
    the certificate goes to the root's ``Resources/issued/`` (see
    `revocation.record_issued`), where ``tls4d revoke`` finds it by name.

    Args:
        layout: The server root whose CA signs.
        name: The client's name, put in the certificate's common name.
        out: The folder to write ``key.pem`` (mode 0600), ``cert.pem`` and
            ``ca.pem`` to; created if missing.
        days: The certificate's lifespan.

    Returns:
        Where the files were written.

    Raises:
        ConfigurationError: The name is empty, or ``out`` already holds a key
            (it is never overwritten).
        PEMError: The root has no usable local CA.
    """
    if not name.strip():
        msg = "A client name cannot be empty."
        raise ConfigurationError(msg)
    written = clienttls.ClientIdentity.from_directory(out)
    if written.key.exists():
        msg = (
            f"{written.key} already exists; choose another --out folder or "
            "remove the old identity first."
        )
        raise ConfigurationError(msg)
    ca = root.load_local_ca(layout)
    key = pki.generate_private_key()
    certificate = pki.issue_certificate(
        ca, key.public_key(), name, client=True, days=days
    )
    revocation.record_issued(layout, certificate)
    pki.write_private_key(written.key, key)
    pki.write_certificates(written.cert, [certificate])
    pki.write_certificates(written.ca, pki.load_certificates(layout.ca))
    return written


def add_parser(commands: Any) -> None:
    """
    Add the ``client`` subcommand to the ``tls4d`` command.
    """
    parser: argparse.ArgumentParser = commands.add_parser(
        "client",
        help="issue a client identity (key and certificate) signed by the root's CA",
        description=(
            "Write a private key (mode 0600), a client certificate for NAME "
            "signed by the root's local CA, and the CA certificate into DIR: "
            "what a remote machine needs to use the application and SQL "
            "servers (tls4d app/sql --identity DIR)."
        ),
    )
    parser.add_argument("name", metavar="NAME", help="the client's name (common name)")
    add_root_option(parser)
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder to write key.pem, cert.pem, ca.pem into",
    )
    parser.add_argument(
        "--days",
        type=_days,
        default=pki.DEFAULT_CERTIFICATE_DAYS,
        help="lifespan of the certificate (default: %(default)s)",
    )
    parser.set_defaults(run=_run)


def _days(value: str) -> int:
    days = int(value)
    if days < 1:
        msg = f"a certificate must be valid for at least 1 day, not {days}"
        raise argparse.ArgumentTypeError(msg)
    return days


def _run(args: argparse.Namespace) -> int:
    layout = root.RootLayout(args.root)
    if not layout.ca_key.exists():
        msg = (
            f"{layout.ca_key} does not exist; start the servers once with "
            f"--root {args.root} to create the root's CA, or point --root at it."
        )
        raise ConfigurationError(msg)
    written = issue_client_identity(layout, args.name, args.out, args.days)
    print(f"Wrote {written.key} (mode 0600), {written.cert} and {written.ca}.")
    return 0
