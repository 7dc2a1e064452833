"""
The ``tls4d keypair``, ``tls4d request`` and ``tls4d install`` commands: 4D's
steps to a server certificate from a certification authority, one command
each. The work is done in `twisted_tls4d.lifecycle`.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import Any

from twisted_tls4d import lifecycle, pki, root
from twisted_tls4d.errors import ConfigurationError
from twisted_tls4d.settings import add_root_option

_PASSPHRASE_FILE_HELP = (
    "read the passphrase from the first line of FILE (for scripts; keep FILE mode 0600)"
)


def add_parsers(commands: Any) -> None:
    """
    Add the ``keypair``, ``request`` and ``install`` subcommands to the
    ``tls4d`` command.

    Args:
        commands: The subparsers object of the ``tls4d`` parser.
    """
    _add_keypair(commands)
    _add_request(commands)
    _add_install(commands)


def _add_keypair(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser(
        "keypair",
        help="step 1: generate a server's private key (and its public key)",
        description=(
            "Generate a private key for a server and write it as PKCS#8 PEM, "
            "readable by its owner only (mode 0600), optionally encrypted with "
            "a passphrase; and its public key as PEM with --public-out. ECDSA "
            "P-256 unless asked otherwise; RSA keys under 2048 bits are "
            "refused (they can be broken). An existing file is never "
            "overwritten. Next step: tls4d request."
        ),
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="KEY", help="the private key's file"
    )
    parser.add_argument(
        "--type",
        choices=("ec", "rsa"),
        default="ec",
        help="ec (ECDSA, fast and small) or rsa (for old clients); default: ec",
    )
    parser.add_argument(
        "--curve",
        choices=lifecycle.CURVES,
        help="ECDSA curve (default: P-256)",
    )
    parser.add_argument(
        "--bits",
        type=int,
        metavar="N",
        help="RSA key size: 2048, 3072 or 4096 (default: 2048)",
    )
    parser.add_argument(
        "--public-out",
        type=Path,
        metavar="FILE",
        help="also write the public key (SubjectPublicKeyInfo PEM) to FILE",
    )
    secret = parser.add_mutually_exclusive_group()
    secret.add_argument(
        "--passphrase-file",
        type=Path,
        metavar="FILE",
        help="encrypt the key with the passphrase on FILE's first line",
    )
    secret.add_argument(
        "--ask-passphrase",
        action="store_true",
        help=(
            "encrypt the key with a passphrase typed twice at the terminal; "
            "tls4d install stores it decrypted, since the servers start "
            "unattended"
        ),
    )
    parser.set_defaults(run=_run_keypair)


def _add_request(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser(
        "request",
        help="step 2: make a certificate request (CSR) to send to a CA",
        description=(
            "Write a PKCS#10 certificate request (PEM, signed with SHA-256) "
            "for the key, to send to a certification authority. Browsers "
            "ignore the common name, so the request always names the server "
            "as subject alternative names: those given with --san, with the "
            "common name added when it is a host name; just the common name "
            "if no --san is given. Any field may be non-ASCII (UTF-8); "
            "non-ASCII DNS names are IDNA-encoded. An encrypted key asks for "
            "its passphrase. Next step: send the file to the CA, then "
            "tls4d install."
        ),
    )
    parser.add_argument(
        "--key", type=Path, required=True, help="the private key (tls4d keypair)"
    )
    parser.add_argument(
        "--common-name",
        required=True,
        metavar="NAME",
        help="the server's main host name, e.g. www.example.com",
    )
    parser.add_argument("--country", metavar="XX", help="two-letter country code")
    parser.add_argument("--state", metavar="S", help="state or province")
    parser.add_argument("--locality", metavar="L", help="city")
    parser.add_argument("--organization", metavar="O", help="organization")
    parser.add_argument("--unit", metavar="U", help="organizational unit")
    parser.add_argument("--email", metavar="E", help="contact e-mail address")
    parser.add_argument(
        "--san",
        action="append",
        default=[],
        metavar="NAME",
        help=(
            "a name the certificate covers: DNS:host or IP:address (a bare "
            "value is guessed); repeat, or separate with commas"
        ),
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="REQUEST", help="the request's file"
    )
    parser.add_argument(
        "--passphrase-file", type=Path, metavar="FILE", help=_PASSPHRASE_FILE_HELP
    )
    parser.set_defaults(run=_run_request)


def _add_install(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser(
        "install",
        help="step 4: check and install the certificate a CA sent back",
        description=(
            "Check a certificate a CA sent back, then install it for the "
            "chosen servers, keeping the previous files as "
            "NAME.bak-YYYYmmddTHHMMSSZ. CERT may be PEM (LF, CRLF or CR-only "
            "line endings; further certificates are its chain), DER, or "
            "PKCS#12 (.pfx/.p12: key, certificate and chain). Refused, with "
            "the reason: a certificate that does not match the key, is expired "
            "or not yet valid, lacks the serverAuth purpose, comes with a "
            "chain out of order or with a gap, is signed with SHA-1 or MD5, or "
            "has an RSA key under 2048 bits. The key is stored unencrypted "
            "with mode 0600, since the servers start unattended. A running "
            "server picks the new files up on 'tls4d reload' or at restart."
        ),
    )
    parser.add_argument("cert", type=Path, metavar="CERT", help="the certificate file")
    parser.add_argument(
        "--key",
        type=Path,
        help=(
            "its private key (PEM or DER, may be encrypted); default: the key "
            "already in the root, which must match"
        ),
    )
    parser.add_argument(
        "--chain",
        type=Path,
        metavar="FILE",
        help="the CA's intermediate certificates, each followed by its issuer",
    )
    parser.add_argument(
        "--for",
        dest="target",
        required=True,
        choices=("web", "app", "sql"),
        help=(
            "the servers to install for: web and sql both mean ROOT/key.pem "
            "and ROOT/cert.pem (the web and SQL servers share one identity); "
            "app means ROOT/Resources/key.pem and ROOT/Resources/cert.pem"
        ),
    )
    add_root_option(parser)
    parser.add_argument(
        "--passphrase-file", type=Path, metavar="FILE", help=_PASSPHRASE_FILE_HELP
    )
    parser.set_defaults(run=_run_install)


def _run_keypair(args: argparse.Namespace) -> int:
    passphrase = None
    if args.passphrase_file is not None:
        passphrase = _read_passphrase_file(args.passphrase_file)
    elif args.ask_passphrase:
        passphrase = _ask_new_passphrase(args.out)
    key = lifecycle.generate_keypair(args.type, curve=args.curve, bits=args.bits)
    lifecycle.write_keypair(
        key, args.out, public_out=args.public_out, passphrase=passphrase
    )
    protection = "encrypted with your passphrase" if passphrase else "not encrypted"
    print(
        f"Wrote {args.out}: a new {lifecycle.describe_key(key)} private key "
        f"(PKCS#8 PEM, {protection}, mode 0600). Keep it secret and keep it: "
        "the certificate will work with this key only."
    )
    if args.public_out is not None:
        print(f"Wrote {args.public_out}: its public key.")
    print(f"Next: tls4d request --key {args.out} --common-name HOST --out request.pem")
    return 0


def _run_request(args: argparse.Namespace) -> int:
    key = lifecycle.load_key(args.key, _passphrase_source(args.passphrase_file))
    names = [n.strip() for value in args.san for n in value.split(",") if n.strip()]
    request = lifecycle.build_request(
        key,
        args.common_name,
        country=args.country,
        state=args.state,
        locality=args.locality,
        organization=args.organization,
        unit=args.unit,
        email=args.email,
        names=names,
    )
    lifecycle.write_request(args.out, request)
    print(
        f"Wrote {args.out}: a certificate request signed with SHA-256 by the "
        f"{lifecycle.describe_key(key)} key {args.key}."
    )
    print(f"  subject  {request.subject.rfc4514_string()}")
    print(f"  names    {', '.join(lifecycle.names_of(request))}")
    print(
        f"Next: send {args.out} to your certification authority, then install "
        f"what it sends back with 'tls4d install CERT --for web'. Keep "
        f"{args.key}: the certificate works with that key only."
    )
    return 0


def _run_install(args: argparse.Namespace) -> int:
    installable = lifecycle.load_for_install(
        args.cert,
        key=args.key,
        chain=args.chain,
        passphrase=_passphrase_source(args.passphrase_file),
    )
    layout = root.RootLayout(args.root)
    result = lifecycle.install_identity(layout, args.target, installable)
    for warning in result.warnings:
        print(f"tls4d: note: {warning}", file=sys.stderr)

    certificate = result.certificate
    chained = len(result.chain)
    contents = "the certificate"
    if chained:
        contents += f", then {chained} chain certificate{'s' if chained > 1 else ''}"
    print(
        f"Installed {args.cert} ({installable.source_format}) for the {result.servers}:"
    )
    print(f"  certificate  {result.cert} ({contents})")
    if result.key_written:
        print(
            f"  key          {result.key} (stored unencrypted, mode 0600: the "
            "servers start unattended)"
        )
    else:
        print(f"  key          {result.key} (unchanged: the certificate is for it)")
    print(f"  subject      {certificate.subject.rfc4514_string()}")
    print(f"  names        {', '.join(lifecycle.names_of(certificate)) or 'none'}")
    print(f"  issuer       {certificate.issuer.rfc4514_string()}")
    print(
        "  expires      "
        f"{certificate.not_valid_after_utc.strftime('%Y-%m-%d %H:%M UTC')}"
    )
    print(f"  SHA-256      {pki.fingerprint_sha256(certificate)}")
    for backup in result.backups:
        print(f"  kept         {backup} (the previous file)")
    print(
        "A running server picks the new certificate up on "
        f"'tls4d reload --root {args.root}', or when restarted."
    )
    return 0


def _read_passphrase_file(path: Path) -> bytes:
    """
    Returns:
        The first line of ``path``, without its line ending (as openssl's
        ``-passin file:`` reads it).

    Raises:
        ConfigurationError: The file cannot be read or its first line is
            empty.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        msg = f"Cannot read the passphrase file {path}: {e.strerror}."
        raise ConfigurationError(msg) from e
    line = data.splitlines()[0] if data else b""
    if not line:
        msg = (
            f"The passphrase file {path} starts with an empty line; put the "
            "passphrase on its first line."
        )
        raise ConfigurationError(msg)
    return line


def _interactive() -> bool:
    return sys.stdin.isatty()


def _passphrase_source(passphrase_file: Path | None) -> lifecycle.PassphraseSource:
    """
    Returns:
        A source that reads ``passphrase_file`` if given, else asks at the
        terminal, else fails with a line saying to use ``--passphrase-file``.
    """

    def ask(what: str) -> bytes:
        if passphrase_file is not None:
            return _read_passphrase_file(passphrase_file)
        if not _interactive():
            msg = (
                f"{what} is protected by a passphrase and there is no terminal "
                "to ask it on; give it with --passphrase-file FILE."
            )
            raise ConfigurationError(msg)
        return getpass.getpass(f"Passphrase for {what}: ").encode("utf-8")

    return ask


def _ask_new_passphrase(out: Path) -> bytes:
    if not _interactive():
        msg = (
            "--ask-passphrase needs a terminal to ask on; give the passphrase "
            "with --passphrase-file FILE instead."
        )
        raise ConfigurationError(msg)
    first = getpass.getpass(f"New passphrase for {out}: ")
    if not first:
        msg = f"An empty passphrase protects nothing; {out} was not written."
        raise ConfigurationError(msg)
    if getpass.getpass("The same passphrase again: ") != first:
        msg = f"The two passphrases differ; {out} was not written. Try again."
        raise ConfigurationError(msg)
    return first.encode("utf-8")
