"""
Revoking client certificates: the record of what ``tls4d client`` issued
(``Resources/issued/``), the local CA's certificate revocation list
(``Resources/crl.pem``), and the ``tls4d revoke`` command.

The application and SQL servers load the list with `tls.load_crl` and refuse
the client certificates it names.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

import attrs
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization

from twisted_tls4d import pki, root, tls
from twisted_tls4d._peer import common_name
from twisted_tls4d.errors import ConfigurationError, PEMError
from twisted_tls4d.settings import add_root_option

#: Days from one signing of the revocation list to its announced next update.
CRL_DAYS = 30

#: Sign the list this far in the past, so that a server whose clock runs a
#: little behind does not see it as not yet valid.
_BACKDATE = datetime.timedelta(minutes=10)


def issued_folder(layout: root.RootLayout) -> Path:
    """
    Returns:
        The folder holding a copy of each client certificate the root's local
        CA issued, one ``SERIAL.pem`` each (``Resources/issued``).
    """
    return layout.resources / "issued"


def crl_path(layout: root.RootLayout) -> Path:
    """
    Returns:
        The local CA's certificate revocation list (``Resources/crl.pem``).
    """
    return layout.resources / "crl.pem"


def format_serial(serial: int) -> str:
    """
    Returns:
        A serial number as upper-case hex with an even number of digits, as
        ``openssl x509 -serial`` shows it.
    """
    digits = f"{serial:X}"
    return digits.zfill(len(digits) + len(digits) % 2)


@attrs.frozen
class IssuedCertificate:
    """
    A client certificate the root's local CA issued, as recorded.

    Attributes:
        certificate: The certificate.
        path: Its copy in ``Resources/issued``.
    """

    certificate: x509.Certificate
    path: Path

    @property
    def serial(self) -> int:
        """The certificate's serial number."""
        return self.certificate.serial_number

    @property
    def name(self) -> str:
        """The subject's common name: the NAME of ``tls4d client NAME``."""
        return common_name(self.certificate)

    def describe(self) -> str:
        """
        Returns:
            Serial, name and expiry, for the operator.
        """
        expiry = self.certificate.not_valid_after_utc.strftime("%Y-%m-%d")
        return f"{format_serial(self.serial)} ({self.name!r}, expires {expiry})"


def record_issued(layout: root.RootLayout, certificate: x509.Certificate) -> Path:
    """
    Keep a copy of a certificate the local CA issued, so that ``tls4d revoke``
    finds it by name. Each certificate has its own file, written atomically,
    so that two issuances at once cannot lose one another.

    Args:
        layout: The root whose CA issued it.
        certificate: The certificate.

    Returns:
        The copy's path, ``Resources/issued/SERIAL.pem``.
    """
    folder = issued_folder(layout)
    folder.mkdir(mode=0o755, parents=True, exist_ok=True)
    path = folder / f"{format_serial(certificate.serial_number)}.pem"
    pki.write_certificates(path, [certificate])
    return path


def _issued_by(certificate: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def issued_certificates(
    layout: root.RootLayout, ca: pki.LocalCA
) -> list[IssuedCertificate]:
    """
    The recorded client certificates that the root's current local CA issued
    (those of an earlier CA of the root are left out: nothing trusts them).

    Args:
        layout: The root.
        ca: Its local CA.

    Returns:
        The certificates, oldest first.

    Raises:
        PEMError: A file of ``Resources/issued`` cannot be read.
    """
    folder = issued_folder(layout)
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob("*.pem")):
        try:
            certificate = pki.load_certificates(path)[0]
        except PEMError as e:
            msg = (
                f"{e} It is tls4d's copy of an issued certificate: restore it, or "
                "remove it (its certificate can then be revoked by serial number "
                "only)."
            )
            raise PEMError(msg) from e
        if _issued_by(certificate, ca.certificate):
            found.append(IssuedCertificate(certificate, path))
    found.sort(
        key=lambda issued: (issued.certificate.not_valid_before_utc, issued.serial)
    )
    return found


def parse_serial(text: str) -> list[int]:
    """
    The serial numbers a piece of text may stand for.

    Args:
        text: Hex (``0x4A3F``, ``4a:3f``, ``4A3F``) or decimal digits.

    Returns:
        Every reading, hex first: both for digits only (``1234``), the hex
        one for text with ``0x``, colons or the letters a-f, none for
        anything else.
    """
    cleaned = text.strip().lower()
    readings: list[int] = []
    explicit_hex = cleaned.startswith("0x") or ":" in cleaned
    digits = cleaned.removeprefix("0x").replace(":", "")
    if digits and all(c in "0123456789abcdef" for c in digits):
        readings.append(int(digits, 16))
    if not explicit_hex and digits.isdigit() and int(digits, 10) not in readings:
        readings.append(int(digits, 10))
    return [serial for serial in readings if serial > 0]


def is_explicit_serial(text: str) -> bool:
    """
    Returns:
        Whether ``text`` can only be a serial number written in hex (``0x``
        prefix or colon-separated pairs), never a name.
    """
    cleaned = text.strip().lower()
    return bool(parse_serial(text)) and (cleaned.startswith("0x") or ":" in cleaned)


def load_revoked(
    layout: root.RootLayout, ca: pki.LocalCA
) -> tuple[list[x509.RevokedCertificate], int]:
    """
    What the root's revocation list already holds.

    Args:
        layout: The root.
        ca: Its local CA, which must have signed the list.

    Returns:
        The revoked entries and the list's number (0 when there is no list).

    Raises:
        PEMError: The list is damaged or signed by another CA (revoking on
            would drop what it holds, so the caller must stop).
    """
    crl = tls.load_crl(crl_path(layout), [ca.certificate])
    if crl is None:
        return [], 0
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = 0
    return list(crl), number


def build_crl(
    ca: pki.LocalCA,
    entries: Iterable[x509.RevokedCertificate],
    number: int,
    now: datetime.datetime | None = None,
    days: int = CRL_DAYS,
) -> x509.CertificateRevocationList:
    """
    Sign a revocation list with the local CA.

    Args:
        ca: The CA.
        entries: The revoked certificates, each with its revocation date.
        number: The list's number (RFC 5280 CRLNumber), one more than the
            list it replaces.
        now: The time of signing; the current time if None.
        days: Days until the next update it announces.

    Returns:
        The list.
    """
    now = now or pki.utc_now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(now - _BACKDATE)
        .next_update(now + datetime.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    for entry in entries:
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(ca.key, hashes.SHA256())


@attrs.frozen
class Revocation:
    """
    What `revoke` did.

    Attributes:
        newly_revoked: Serial numbers added to the list.
        already_revoked: Serial numbers the list held before.
        crl: The list written.
        path: Where it was written.
    """

    newly_revoked: tuple[int, ...]
    already_revoked: tuple[int, ...]
    crl: x509.CertificateRevocationList
    path: Path


def revoke(
    layout: root.RootLayout,
    serials: Iterable[int],
    now: datetime.datetime | None = None,
) -> Revocation:
    """
    Add serial numbers to the root's revocation list and sign it again with
    the local CA; what the list held stays. With no serials, the list is only
    signed again (a new next update).

    Args:
        layout: The root.
        serials: Serial numbers of certificates its local CA issued.
        now: The time of revocation; the current time if None.

    Returns:
        What was revoked and the list written.

    Raises:
        PEMError: The root has no usable local CA, or its list is damaged.
    """
    now = now or pki.utc_now()
    ca = root.load_local_ca(layout)
    with _locked(layout):
        return _revoke(layout, ca, serials, now)


@contextlib.contextmanager
def _locked(layout: root.RootLayout) -> Iterator[None]:
    """
    Hold the root's revocation lock, so that two revocations at once cannot
    each sign a list without the other's entry.
    """
    lock = layout.resources / ".crl.lock"
    with lock.open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _revoke(
    layout: root.RootLayout,
    ca: pki.LocalCA,
    serials: Iterable[int],
    now: datetime.datetime,
) -> Revocation:
    entries, number = load_revoked(layout, ca)
    listed = {entry.serial_number for entry in entries}
    newly, already = [], []
    for serial in dict.fromkeys(serials):
        if serial in listed:
            already.append(serial)
            continue
        newly.append(serial)
        entries.append(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(now)
            .build()
        )
    crl = build_crl(ca, entries, number + 1, now)
    path = crl_path(layout)
    pki.write_public_file(path, crl.public_bytes(serialization.Encoding.PEM))
    return Revocation(tuple(newly), tuple(already), crl, path)


def find_targets(
    layout: root.RootLayout, target: str, *, revoke_all: bool = False
) -> tuple[list[int], list[str]]:
    """
    The serial numbers ``tls4d revoke TARGET`` means.

    A target is a common name (every certificate issued under it that is not
    yet revoked; with several, ``revoke_all`` must be set) or a serial number
    in hex or decimal of a recorded certificate. A serial written as
    ``0x...`` or with colons is taken even if it was not recorded (a
    certificate issued before tls4d kept records).

    Args:
        layout: The root.
        target: The name or serial number.
        revoke_all: Whether a name may stand for several certificates.

    Returns:
        The serial numbers, and one line for the operator about each.

    Raises:
        ConfigurationError: Nothing matches, the target is both a name and a
            serial, or a name stands for several certificates without
            ``revoke_all``.
        PEMError: The CA, the record or the revocation list is unusable.
    """
    ca = root.load_local_ca(layout)
    issued = issued_certificates(layout, ca)
    listed = {entry.serial_number for entry in load_revoked(layout, ca)[0]}
    by_name = [i for i in issued if i.name == target]
    readings = parse_serial(target)
    by_serial = [i for i in issued if i.serial in readings]

    if by_name and by_serial:
        msg = (
            f"{target!r} is both the name of {len(by_name)} certificate(s) and the "
            f"serial number of {by_serial[0].describe()}; give the serial as "
            "0x... to revoke by serial."
        )
        raise ConfigurationError(msg)
    if len(by_serial) > 1:
        choices = ", ".join(f"0x{format_serial(i.serial)}" for i in by_serial)
        msg = (
            f"{target!r} reads as the serial number of several certificates "
            f"(hex and decimal); give one of {choices}."
        )
        raise ConfigurationError(msg)
    if by_serial:
        [chosen] = by_serial
        return [chosen.serial], [f"certificate {chosen.describe()}"]
    if by_name:
        live = [i for i in by_name if i.serial not in listed]
        if len(live) > 1 and not revoke_all:
            choices = ", ".join(i.describe() for i in live)
            msg = (
                f"{len(live)} certificates issued to {target!r} are not revoked: "
                f"{choices}; give one serial number, or add --all to revoke all "
                "of them."
            )
            raise ConfigurationError(msg)
        chosen_list = live or by_name
        return [i.serial for i in chosen_list], [
            f"certificate {i.describe()}" for i in chosen_list
        ]
    if is_explicit_serial(target):
        serial = readings[0]
        return [serial], [
            f"serial number {format_serial(serial)} (not in {issued_folder(layout)}: "
            "issued before tls4d kept records, or by another CA)"
        ]
    msg = (
        f"No certificate issued by the CA of {layout.path} has the name or serial "
        f"number {target!r}; see 'tls4d revoke --list --root {layout.path}', or "
        "give a serial number as 0x... if it was issued before tls4d kept records."
    )
    raise ConfigurationError(msg)


def _revocation_dates(
    crl: x509.CertificateRevocationList | None,
) -> Mapping[int, datetime.datetime]:
    if crl is None:
        return {}
    return {entry.serial_number: entry.revocation_date_utc for entry in crl}


def list_issued(layout: root.RootLayout, out: TextIO) -> None:
    """
    Print each recorded client certificate with its state.

    Args:
        layout: The root.
        out: Where to print.

    Raises:
        PEMError: The CA, the record or the revocation list is unusable.
    """
    ca = root.load_local_ca(layout)
    revoked = _revocation_dates(tls.load_crl(crl_path(layout), [ca.certificate]))
    issued = issued_certificates(layout, ca)
    if not issued:
        print(f"No client certificate recorded in {issued_folder(layout)}.", file=out)
    now = pki.utc_now()
    for item in issued:
        if item.serial in revoked:
            state = f"revoked {revoked[item.serial]:%Y-%m-%d}"
        elif item.certificate.not_valid_after_utc < now:
            state = "expired"
        else:
            state = "valid"
        expiry = item.certificate.not_valid_after_utc.strftime("%Y-%m-%d")
        print(
            f"{format_serial(item.serial)}  {item.name}  expires {expiry}  {state}",
            file=out,
        )
    recorded = {item.serial for item in issued}
    for serial, date in revoked.items():
        if serial not in recorded:
            print(
                f"{format_serial(serial)}  (not recorded)  revoked {date:%Y-%m-%d}",
                file=out,
            )


_DESCRIPTION = """\
Revoke a client certificate issued by the root's local CA ('tls4d client'):
add it to the CA's certificate revocation list Resources/crl.pem, signed again
at each change with a next update in 30 days. What the list held stays. The
application and SQL servers refuse a revoked certificate once they load the
list: at start, or on 'tls4d reload'.

TARGET is the client's NAME (its certificate's common name) or a SERIAL
number in hex (4A3F..., 0x4A3F..., 4a:3f:...) or decimal. 'tls4d client'
keeps a copy of each certificate it issues in Resources/issued/, where
names and serials are looked up. A name given to several certificates that
are not revoked is refused unless --all is given: revocation cannot be
undone, so say which one (by serial) or that all of them go.
"""

_EPILOG = """\
examples:
  tls4d revoke alice --root tls4d-root
  tls4d revoke 0x5F1C2A... --root tls4d-root
  tls4d revoke alice --all --root tls4d-root
  tls4d revoke --list --root tls4d-root

exit status: 0 when the list was written (or listed); 1 with one line on
standard error when nothing matches, the name is ambiguous, or the CA or
the list is unusable; 2 on misuse.
"""


def add_parser(commands: Any) -> None:
    """
    Add the ``revoke`` subcommand to the ``tls4d`` command.
    """
    parser: argparse.ArgumentParser = commands.add_parser(
        "revoke",
        help="revoke a client certificate issued by the root's CA (writes crl.pem)",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "target",
        metavar="NAME|SERIAL",
        nargs="?",
        help="the client's name, or the certificate's serial number",
    )
    add_root_option(parser)
    parser.add_argument(
        "--all",
        action="store_true",
        dest="revoke_all",
        help="revoke every certificate issued to NAME that is not yet revoked",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--list",
        action="store_true",
        help="list the recorded client certificates and what is revoked",
    )
    mode.add_argument(
        "--refresh",
        action="store_true",
        help="sign the list again as it is (a new next update); revoke nothing",
    )
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    layout = root.RootLayout(args.root)
    if (args.list or args.refresh) == (args.target is not None):
        msg = "Give NAME|SERIAL to revoke, or --list or --refresh (not both)."
        raise ConfigurationError(msg)
    if not layout.ca_key.exists():
        msg = (
            f"{layout.ca_key} does not exist; only the root's local CA can revoke "
            "what it issued: point --root at the root that issued the certificate."
        )
        raise ConfigurationError(msg)
    if args.list:
        list_issued(layout, out)
        return 0
    notes: list[str] = []
    serials: list[int] = []
    if args.target is not None:
        serials, notes = find_targets(layout, args.target, revoke_all=args.revoke_all)
    result = revoke(layout, serials)
    for serial, note in zip(serials, notes, strict=True):
        verb = "Revoked" if serial in result.newly_revoked else "Already revoked:"
        print(f"{verb} {note}.", file=out)
    next_update = result.crl.next_update_utc
    assert next_update is not None
    print(
        f"Wrote {result.path}: {len(result.crl)} certificate(s) revoked, next "
        f"update {next_update:%Y-%m-%d}. The application and SQL servers refuse "
        "revoked certificates once they load it: at start, or on 'tls4d reload'.",
        file=out,
    )
    return 0
