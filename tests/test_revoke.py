"""
Tests for revoking client certificates: the record ``tls4d client`` keeps,
``tls4d revoke`` and the revocation list it signs, and the servers refusing
a revoked certificate in memory.
"""

from __future__ import annotations

import datetime
import io
import json
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from tests import support
from twisted_tls4d import cli, clienttls, pki, revocation, root, tls
from twisted_tls4d.app import wire
from twisted_tls4d.app.protocol import AppServerFactory
from twisted_tls4d.errors import ConfigurationError, PEMError


def _certificate(identity: clienttls.ClientIdentity) -> x509.Certificate:
    return pki.load_certificates(identity.cert)[0]


def _run(*argv: str) -> tuple[int, str]:
    """Run ``tls4d revoke`` with ``argv``; return its status and output."""
    args = cli.build_parser().parse_args(["revoke", *argv])
    out = io.StringIO()
    try:
        status = revocation._run(args, out)
    except ConfigurationError as e:
        return 1, str(e)
    return status, out.getvalue()


class RecordTests(unittest.TestCase):
    """
    ``tls4d client`` keeps a copy of each certificate it issues, which
    ``tls4d revoke`` looks names and serials up in.
    """

    def setUp(self) -> None:
        self.layout = support.make_root()

    def test_issue_records(self) -> None:
        """Issuing an identity writes Resources/issued/SERIAL.pem (mode 0644)."""
        alice = support.make_client_identity(self.layout, "alice")
        certificate = _certificate(alice)
        serial = revocation.format_serial(certificate.serial_number)
        path = revocation.issued_folder(self.layout) / f"{serial}.pem"
        self.assertEqual(path.read_bytes(), alice.cert.read_bytes())
        self.assertEqual(path.stat().st_mode & 0o777, 0o644)

    def test_issued_certificates(self) -> None:
        """The record lists every certificate of the current CA, oldest first."""
        first = _certificate(support.make_client_identity(self.layout, "alice"))
        second = _certificate(support.make_client_identity(self.layout, "bob"))
        other = support.make_root("elsewhere")
        stranger = _certificate(support.make_client_identity(other, "mallory"))
        revocation.record_issued(self.layout, stranger)
        issued = revocation.issued_certificates(
            self.layout, root.load_local_ca(self.layout)
        )
        self.assertEqual(
            sorted(i.serial for i in issued),
            sorted([first.serial_number, second.serial_number]),
        )
        self.assertEqual({i.name for i in issued}, {"alice", "bob"})

    def test_format_serial(self) -> None:
        """Serials are upper-case hex with an even number of digits."""
        self.assertEqual(revocation.format_serial(0xABC), "0ABC")
        self.assertEqual(revocation.format_serial(0x1F), "1F")

    def test_parse_serial(self) -> None:
        """Hex and decimal readings of a serial are found; names have none."""
        cases = [
            ("0x1a", [0x1A]),
            ("1a:2b", [0x1A2B]),
            ("1A2B", [0x1A2B]),
            ("1234", [0x1234, 1234]),
            ("alice", []),
            ("0", []),
            ("", []),
        ]
        for text, readings in cases:
            self.assertEqual(revocation.parse_serial(text), readings, text)


class FindTargetsTests(unittest.TestCase):
    """
    ``tls4d revoke TARGET`` finds certificates by name or serial, and never
    guesses which of several certificates of one name is meant.
    """

    def setUp(self) -> None:
        self.layout = support.make_root()
        self.alice = _certificate(support.make_client_identity(self.layout, "alice"))
        self.bob = _certificate(support.make_client_identity(self.layout, "bob"))

    def test_by_name(self) -> None:
        """A name given once stands for its one certificate."""
        serials, notes = revocation.find_targets(self.layout, "bob")
        self.assertEqual(serials, [self.bob.serial_number])
        self.assertIn("'bob'", notes[0])

    def test_by_serial(self) -> None:
        """A serial in hex, with 0x, with colons or in decimal finds its certificate."""
        serial = self.alice.serial_number
        digits = revocation.format_serial(serial)
        pairs = ":".join(digits[i : i + 2] for i in range(0, len(digits), 2))
        texts = (digits, digits.lower(), f"0x{digits}", pairs.lower(), str(serial))
        for text in texts:
            self.assertEqual(
                revocation.find_targets(self.layout, text)[0], [serial], text
            )

    def test_ambiguous_name(self) -> None:
        """Two live certificates of one name are refused, listing both, unless all."""
        again = _certificate(support.make_client_identity(self.layout, "alice"))
        e = self.assertRaises(
            ConfigurationError, revocation.find_targets, self.layout, "alice"
        )
        for certificate in (self.alice, again):
            self.assertIn(revocation.format_serial(certificate.serial_number), str(e))
        self.assertIn("--all", str(e))
        serials, _ = revocation.find_targets(self.layout, "alice", revoke_all=True)
        self.assertEqual(
            sorted(serials), sorted([self.alice.serial_number, again.serial_number])
        )

    def test_name_after_reissue(self) -> None:
        """With the old certificate revoked, a name stands for the new one only."""
        revocation.revoke(self.layout, [self.alice.serial_number])
        again = _certificate(support.make_client_identity(self.layout, "alice"))
        serials, _ = revocation.find_targets(self.layout, "alice")
        self.assertEqual(serials, [again.serial_number])

    def test_unknown(self) -> None:
        """An unknown name is refused, pointing at --list."""
        e = self.assertRaises(
            ConfigurationError, revocation.find_targets, self.layout, "carol"
        )
        self.assertIn("'carol'", str(e))
        self.assertIn("--list", str(e))

    def test_unrecorded_explicit_serial(self) -> None:
        """A 0x serial that was never recorded is taken, and said to be unrecorded."""
        serials, notes = revocation.find_targets(self.layout, "0x0123")
        self.assertEqual(serials, [0x123])
        self.assertIn("not in", notes[0])


class RevokeTests(unittest.TestCase):
    """
    Revoking signs Resources/crl.pem with the local CA and keeps what it
    listed before.
    """

    def setUp(self) -> None:
        self.layout = support.make_root()
        self.alice = _certificate(support.make_client_identity(self.layout, "alice"))
        self.bob = _certificate(support.make_client_identity(self.layout, "bob"))
        self.ca = pki.load_certificates(self.layout.ca)

    def load(self) -> x509.CertificateRevocationList:
        crl = tls.load_crl(revocation.crl_path(self.layout), self.ca)
        assert crl is not None
        return crl

    def test_crl_written(self) -> None:
        """The list is signed by the local CA, names the serial, and lasts 30 days."""
        now = pki.utc_now()
        result = revocation.revoke(self.layout, [self.alice.serial_number], now)
        self.assertEqual(result.newly_revoked, (self.alice.serial_number,))
        crl = self.load()
        self.assertTrue(crl.is_signature_valid(self.ca[0].public_key()))  # type: ignore[arg-type]
        self.assertEqual(crl.issuer, self.ca[0].subject)
        self.assertIsNotNone(
            crl.get_revoked_certificate_by_serial_number(self.alice.serial_number)
        )
        self.assertIsNone(
            crl.get_revoked_certificate_by_serial_number(self.bob.serial_number)
        )
        self.assertEqual(
            crl.next_update_utc,
            (now + datetime.timedelta(days=revocation.CRL_DAYS)).replace(microsecond=0),
        )
        path = revocation.crl_path(self.layout)
        self.assertEqual(path.stat().st_mode & 0o777, 0o644)

    def test_keeps_entries(self) -> None:
        """A second revocation keeps the first with its date, and numbers the list."""
        earlier = pki.utc_now() - datetime.timedelta(days=3)
        revocation.revoke(self.layout, [self.alice.serial_number], earlier)
        first_number = self.load().extensions.get_extension_for_class(x509.CRLNumber)
        result = revocation.revoke(
            self.layout, [self.bob.serial_number, self.alice.serial_number]
        )
        self.assertEqual(result.newly_revoked, (self.bob.serial_number,))
        self.assertEqual(result.already_revoked, (self.alice.serial_number,))
        crl = self.load()
        self.assertEqual(len(crl), 2)
        entry = crl.get_revoked_certificate_by_serial_number(self.alice.serial_number)
        assert entry is not None
        self.assertEqual(entry.revocation_date_utc, earlier.replace(microsecond=0))
        number = crl.extensions.get_extension_for_class(x509.CRLNumber)
        self.assertEqual(number.value.crl_number, first_number.value.crl_number + 1)

    def test_damaged_list_kept(self) -> None:
        """A damaged crl.pem stops a revocation, naming the file, and stays as it is."""
        path = revocation.crl_path(self.layout)
        path.write_bytes(b"junk\n")
        e = self.assertRaises(
            PEMError, revocation.revoke, self.layout, [self.bob.serial_number]
        )
        self.assertIn(str(path), str(e))
        self.assertEqual(path.read_bytes(), b"junk\n")

    def test_load_crl(self) -> None:
        """load_crl gives None without a file, and refuses junk and foreign lists."""
        path = revocation.crl_path(self.layout)
        self.assertIsNone(tls.load_crl(path, self.ca))
        path.write_bytes(b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n")
        e = self.assertRaises(PEMError, tls.load_crl, path, self.ca)
        self.assertIn("malformed", str(e))
        other = root.load_local_ca(support.make_root("elsewhere"))
        foreign = revocation.build_crl(other, [], 1)
        path.write_bytes(foreign.public_bytes(serialization.Encoding.PEM))
        e = self.assertRaises(PEMError, tls.load_crl, path, self.ca)
        self.assertIn("not signed by a CA of Resources/ca.pem", str(e))
        self.assertEqual(tls.load_crl(path, [other.certificate]), foreign)


class CommandTests(unittest.TestCase):
    """
    ``tls4d revoke`` says what it revoked and refuses what it cannot decide.
    """

    def setUp(self) -> None:
        self.layout = support.make_root()
        self.alice = _certificate(support.make_client_identity(self.layout, "alice"))
        self.root = str(self.layout.path)

    def test_revoke_by_name(self) -> None:
        """Revoking alice names her certificate and the list written."""
        status, out = _run("alice", "--root", self.root)
        self.assertEqual(status, 0)
        self.assertIn(
            f"Revoked certificate {revocation.format_serial(self.alice.serial_number)}",
            out,
        )
        self.assertIn(str(revocation.crl_path(self.layout)), out)
        status, out = _run("alice", "--root", self.root)
        self.assertEqual(status, 0)
        self.assertIn("Already revoked", out)

    def test_ambiguous_exit(self) -> None:
        """An ambiguous name exits 1 and revokes nothing; --all revokes both."""
        support.make_client_identity(self.layout, "alice")
        status, message = _run("alice", "--root", self.root)
        self.assertEqual(status, 1)
        self.assertIn("--all", message)
        self.assertFalse(revocation.crl_path(self.layout).exists())
        status, out = _run("alice", "--all", "--root", self.root)
        self.assertEqual((status, out.count("Revoked certificate")), (0, 2))

    def test_list_and_refresh(self) -> None:
        """--list shows each certificate's state; --refresh signs the list again."""
        _run("alice", "--root", self.root)
        bob = _certificate(support.make_client_identity(self.layout, "bob"))
        status, out = _run("--list", "--root", self.root)
        self.assertEqual(status, 0)
        lines = {line.split()[0]: line for line in out.splitlines()}
        self.assertIn(
            "revoked", lines[revocation.format_serial(self.alice.serial_number)]
        )
        self.assertIn("valid", lines[revocation.format_serial(bob.serial_number)])
        before = revocation.crl_path(self.layout).read_bytes()
        self.assertEqual(_run("--refresh", "--root", self.root)[0], 0)
        self.assertNotEqual(revocation.crl_path(self.layout).read_bytes(), before)
        cas = pki.load_certificates(self.layout.ca)
        crl = tls.load_crl(revocation.crl_path(self.layout), cas)
        self.assertEqual(len(crl or []), 1)

    def test_misuse(self) -> None:
        """Neither a target nor --list, or both, is refused."""
        self.assertEqual(_run("--root", self.root)[0], 1)
        self.assertEqual(_run("alice", "--list", "--root", self.root)[0], 1)

    def test_through_main(self) -> None:
        """cli.main runs the command and exits 0."""
        self.assertEqual(cli.main(["revoke", "alice", "--root", self.root]), 0)


@implementer(IHandshakeListener)
class _PingClient(Int32StringReceiver):
    """Sends one ping once its handshake is done and keeps the answers."""

    def __init__(self) -> None:
        self.answers: list[Any] = []
        self.lost: Failure | None = None

    def handshakeCompleted(self) -> None:  # noqa: N802 (Twisted's name)
        self.sendString(wire.encode_payload({"id": 1, "op": "ping"}))

    def stringReceived(self, string: bytes) -> None:  # noqa: N802 (Twisted's name)
        self.answers.append(json.loads(string))

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        self.lost = reason


class RevokedClientTests(unittest.TestCase):
    """
    With the root's revocation list, the application server refuses a
    revoked client certificate, logging why, and serves the others.
    """

    def setUp(self) -> None:
        self.layout = support.make_root()
        self.alice = support.make_client_identity(self.layout, "alice")
        self.bob = support.make_client_identity(self.layout, "bob")
        revocation.revoke(self.layout, [_certificate(self.alice).serial_number])

    def creator(
        self,
        client_cas: list[x509.Certificate] | None = None,
        crl: x509.CertificateRevocationList | None = None,
    ) -> tls.ServerConnectionCreator:
        cas = client_cas or tls.load_client_cas(self.layout.ca)
        crl = crl or tls.load_crl(revocation.crl_path(self.layout), cas)
        context = tls.build_context(
            tls.TLSPolicy(dh_parameters=self.layout.dhparams),
            tls.load_identity(self.layout.app_cert, self.layout.app_key),
            cas,
            crl=crl,
        )
        return tls.ServerConnectionCreator(context)

    def ping(
        self, identity: clienttls.ClientIdentity, creator: tls.ServerConnectionCreator
    ) -> tuple[_PingClient, str]:
        """Connect ``identity`` in memory, ping, and return the client and the log."""
        clock = Clock()
        client = _PingClient()
        with capturedLogs() as events:
            _, _, pump = support.connect_in_memory(
                AppServerFactory(clock=clock),
                creator,
                client,
                support.client_options(identity),
                clock,
            )
            pump.flush()
        return client, "\n".join(formatEvent(event) for event in events)

    def test_revoked_refused(self) -> None:
        """alice's revoked certificate is refused and the log says it is revoked."""
        client, log = self.ping(self.alice, self.creator())
        self.assertEqual(client.answers, [])
        self.assertIsNotNone(client.lost)
        self.assertIn("its certificate has been revoked", log)
        self.assertIn("refused TLS handshake", log)

    def test_others_served(self) -> None:
        """bob, not revoked, is served through the same context."""
        creator = self.creator()
        self.ping(self.alice, creator)
        client, log = self.ping(self.bob, creator)
        self.assertEqual(client.answers, [{"id": 1, "result": "pong"}])
        self.assertIn("authenticated as 'bob'", log)

    def test_other_ca_unchecked(self) -> None:
        """A client of another trusted CA, which has no list, is still served."""
        other = support.make_root("elsewhere")
        carol = support.trusting(
            support.make_client_identity(other, "carol"), self.layout
        )
        cas = tls.load_client_cas(self.layout.ca) + tls.load_client_cas(other.ca)
        client, _ = self.ping(carol, self.creator(cas))
        self.assertEqual(client.answers, [{"id": 1, "result": "pong"}])

    def test_outdated_list_still_applies(self) -> None:
        """A list past its next update still refuses alice and serves bob."""
        ca = root.load_local_ca(self.layout)
        entries, number = revocation.load_revoked(self.layout, ca)
        old = revocation.build_crl(
            ca, entries, number + 1, pki.utc_now() - datetime.timedelta(days=60)
        )
        self.assertEqual(self.ping(self.alice, self.creator(crl=old))[0].answers, [])
        served = self.ping(self.bob, self.creator(crl=old))[0]
        self.assertEqual(served.answers, [{"id": 1, "result": "pong"}])

    def test_without_list(self) -> None:
        """Without the list, alice's certificate is accepted, as before revoking."""
        context = tls.build_context(
            tls.TLSPolicy(),
            tls.load_identity(self.layout.app_cert, self.layout.app_key),
            tls.load_client_cas(self.layout.ca),
        )
        client, _ = self.ping(self.alice, tls.ServerConnectionCreator(context))
        self.assertEqual(client.answers, [{"id": 1, "result": "pong"}])

    def test_list_needs_client_cas(self) -> None:
        """A list without client CAs is refused when building the context."""
        crl = tls.load_crl(
            revocation.crl_path(self.layout), tls.load_client_cas(self.layout.ca)
        )
        self.assertRaises(
            ConfigurationError,
            tls.build_context,
            tls.TLSPolicy(),
            tls.load_identity(self.layout.cert, self.layout.key),
            crl=crl,
        )
