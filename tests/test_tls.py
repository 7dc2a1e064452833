"""
Tests for twisted_tls4d.tls: the one TLS policy, checked in memory against
pyOpenSSL clients that offer what a real client might.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from OpenSSL import SSL
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests import support
from twisted_tls4d import pki, root, tls
from twisted_tls4d.errors import ConfigurationError, PEMError

#: OpenSSL's SSL_OP_ALLOW_CLIENT_RENEGOTIATION, which pyOpenSSL does not name.
_ALLOW_CLIENT_RENEGOTIATION = 1 << 8


class _Recorder(Protocol):
    lost: Failure | None = None

    def connectionLost(self, reason: Failure | None = None) -> None:  # noqa: N802
        self.lost = reason


def _client_context(
    *,
    max_version: int | None = None,
    ciphers: str | None = None,
    groups: str | None = None,
) -> SSL.Context:
    """A pyOpenSSL client context offering exactly what it is told to."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(0)
    if max_version is not None:
        context.set_max_proto_version(max_version)
    if groups is not None:
        assert tls._set_groups(context, groups)
    context.set_cipher_list((ciphers or "DEFAULT@SECLEVEL=0").encode())
    return context


class _Handshake:
    """The outcome of one in-memory handshake."""

    def __init__(self, creator: Any, client_context: SSL.Context) -> None:
        self.client = _Recorder()
        raw = support.RawClientCreator(client_context)
        self.server, self.client_tls, self.pump = support.connect_in_memory(
            Factory.forProtocol(Protocol), creator, self.client, raw
        )
        self.connection: SSL.Connection = raw.connections[0]

    @property
    def failed(self) -> bool:
        return self.client.lost is not None

    @property
    def version(self) -> str:
        return self.connection.get_protocol_version_name()

    @property
    def cipher(self) -> str | None:
        return self.connection.get_cipher_name()


class PolicyTests(unittest.TestCase):
    """
    The default policy accepts TLS 1.2 and 1.3 with forward-secret AEAD
    suites and the three allowed groups, and nothing else.
    """

    def setUp(self) -> None:
        self.layout = support.make_root()
        self.identity = tls.load_identity(self.layout.cert, self.layout.key)

    def rsa_identity(self) -> tls.ServerIdentity:
        """An RSA-2048 identity from the root's CA, for the RSA and DHE suites."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ca = root.load_local_ca(self.layout)
        cert = pki.issue_certificate(
            ca, key.public_key(), "localhost", server_names=["localhost"]
        )
        return tls.ServerIdentity(key, [cert], self.layout.cert, self.layout.key)

    def creator(
        self, identity: tls.ServerIdentity | None = None, **policy: Any
    ) -> tls.ServerConnectionCreator:
        policy.setdefault("dh_parameters", self.layout.dhparams)
        context = tls.build_context(tls.TLSPolicy(**policy), identity or self.identity)
        return tls.ServerConnectionCreator(context)

    def permissive_creator(
        self, identity: tls.ServerIdentity | None = None
    ) -> tls.ServerConnectionCreator:
        """A server that allows anything, to show a client's offer can succeed."""
        identity = identity or self.identity
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(0)
        context.set_options(_ALLOW_CLIENT_RENEGOTIATION)
        context.set_cipher_list(b"ALL@SECLEVEL=0")
        context.use_certificate(identity.certificate)
        context.use_privatekey(identity.key)
        return tls.ServerConnectionCreator(context)

    def test_tls11_refused(self) -> None:
        """A TLS 1.1 client is refused, though a permissive server would take it."""
        offer = {"max_version": SSL.TLS1_1_VERSION}
        control = _Handshake(self.permissive_creator(), _client_context(**offer))
        if control.failed:
            raise unittest.SkipTest("this OpenSSL cannot speak TLS 1.1 at all")
        self.assertEqual(control.version, "TLSv1.1")
        result = _Handshake(self.creator(), _client_context(**offer))
        self.assertTrue(result.failed)
        self.assertIn("protocol version", str(result.client.lost))

    def test_tls12_accepted(self) -> None:
        """A TLS 1.2 client gets TLS 1.2 with an ECDHE AEAD suite."""
        result = _Handshake(
            self.creator(), _client_context(max_version=SSL.TLS1_2_VERSION)
        )
        self.assertFalse(result.failed)
        self.assertEqual(result.version, "TLSv1.2")
        self.assertIn(result.cipher, tls.DEFAULT_CIPHERS.split(":"))

    def test_tls13_accepted(self) -> None:
        """A modern client gets TLS 1.3 with X25519."""
        result = _Handshake(self.creator(), _client_context())
        self.assertFalse(result.failed)
        self.assertEqual(result.version, "TLSv1.3")
        self.assertEqual(result.connection.get_group_name(), "x25519")

    def test_min_tls13_refuses_tls12(self) -> None:
        """With a TLS 1.3 minimum, a TLS 1.2 client is refused and a 1.3 one served."""
        creator = self.creator(min_version="1.3")
        refused = _Handshake(creator, _client_context(max_version=SSL.TLS1_2_VERSION))
        self.assertTrue(refused.failed)
        served = _Handshake(creator, _client_context())
        self.assertEqual(served.version, "TLSv1.3")

    def test_non_forward_secret_never_negotiated(self) -> None:
        """
        A client offering only RSA key exchange is refused, and one preferring
        it over ECDHE gets ECDHE.
        """
        identity = self.rsa_identity()
        plain = "AES128-GCM-SHA256:AES256-GCM-SHA384:AES128-SHA"
        control = _Handshake(
            self.permissive_creator(identity),
            _client_context(max_version=SSL.TLS1_2_VERSION, ciphers=plain),
        )
        self.assertFalse(control.failed)
        self.assertEqual(control.cipher, "AES128-GCM-SHA256")
        refused = _Handshake(
            self.creator(identity),
            _client_context(max_version=SSL.TLS1_2_VERSION, ciphers=plain),
        )
        self.assertTrue(refused.failed)
        mixed = _Handshake(
            self.creator(identity),
            _client_context(
                max_version=SSL.TLS1_2_VERSION,
                ciphers=plain + ":ECDHE-RSA-AES128-GCM-SHA256",
            ),
        )
        self.assertEqual(mixed.cipher, "ECDHE-RSA-AES128-GCM-SHA256")

    def test_cbc_never_negotiated(self) -> None:
        """A client offering only ECDHE with CBC suites is refused."""
        offer = _client_context(
            max_version=SSL.TLS1_2_VERSION,
            ciphers="ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA",
        )
        self.assertTrue(_Handshake(self.creator(), offer).failed)

    def test_groups(self) -> None:
        """Clients offering only X448 or P-521 are refused; P-256 and P-384 work."""
        for group in ("X448", "P-521"):
            control = _Handshake(
                self.permissive_creator(), _client_context(groups=group)
            )
            self.assertFalse(control.failed, group)
            self.assertTrue(
                _Handshake(self.creator(), _client_context(groups=group)).failed
            )
        for group, name in (("P-256", "secp256r1"), ("P-384", "secp384r1")):
            result = _Handshake(self.creator(), _client_context(groups=group))
            self.assertEqual(result.connection.get_group_name(), name)

    def test_no_client_renegotiation(self) -> None:
        """Client renegotiation ends the connection; a permissive server allows it."""
        for creator, refused in (
            (self.permissive_creator(), False),
            (self.creator(), True),
        ):
            result = _Handshake(
                creator, _client_context(max_version=SSL.TLS1_2_VERSION)
            )
            self.assertFalse(result.failed)
            self.assertTrue(result.connection.renegotiate())
            try:
                result.connection.do_handshake()
            except SSL.WantReadError:
                pass
            result.client_tls._flushSendBIO()
            result.pump.flush()
            self.assertEqual(result.failed, refused)
            if refused:
                self.assertIn("no renegotiation", str(result.client.lost))

    def test_options(self) -> None:
        """Built contexts disable compression and renegotiation."""
        context = tls.build_context(tls.TLSPolicy(), self.identity)
        options = context.set_options(0)
        self.assertTrue(options & SSL.OP_NO_COMPRESSION)
        self.assertTrue(options & SSL.OP_NO_RENEGOTIATION)

    def test_idle_connections_release_buffers(self) -> None:
        """Built contexts let idle connections give back their TLS buffers."""
        context = tls.build_context(tls.TLSPolicy(), self.identity)
        self.assertTrue(context.set_mode(0) & SSL.MODE_RELEASE_BUFFERS)

    def test_dhe_uses_dhparams(self) -> None:
        """With an RSA key, a DHE-only client gets DHE from dhparams.pem."""
        result = _Handshake(
            self.creator(self.rsa_identity()),
            _client_context(
                max_version=SSL.TLS1_2_VERSION, ciphers="DHE-RSA-AES128-GCM-SHA256"
            ),
        )
        self.assertFalse(result.failed)
        self.assertEqual(result.cipher, "DHE-RSA-AES128-GCM-SHA256")

    def test_bad_dhparams(self) -> None:
        """A dhparams.pem holding junk stops the build, naming the file."""
        self.layout.dhparams.write_bytes(b"junk\n")
        e = self.assertRaises(
            PEMError,
            tls.build_context,
            tls.TLSPolicy(dh_parameters=self.layout.dhparams),
            self.identity,
        )
        self.assertIn(str(self.layout.dhparams), str(e))

    def test_replace(self) -> None:
        """After replace, new connections use the new context; old ones go on."""
        creator = self.creator()
        first = _Handshake(creator, _client_context())
        creator.replace(
            tls.build_context(tls.TLSPolicy(min_version="1.3"), self.identity)
        )
        self.assertTrue(
            _Handshake(creator, _client_context(max_version=SSL.TLS1_2_VERSION)).failed
        )
        self.assertFalse(first.failed)


class CipherStringTests(unittest.TestCase):
    """
    Custom cipher strings are checked for what they select.
    """

    def test_default_all_forward_secret(self) -> None:
        """The default list selects only forward-secret suites and warns of nothing."""
        with capturedLogs() as events:
            self.assertEqual(tls.check_ciphers(tls.DEFAULT_CIPHERS), [])
        self.assertEqual(events, [])
        self.assertEqual(len(tls.tls12_suites(tls.DEFAULT_CIPHERS)), 9)

    def test_selects_nothing(self) -> None:
        """A string that selects nothing is refused, naming it."""
        for string in ("NOSUCHCIPHER", "aNULL:!aNULL", "TLS_AES_128_GCM_SHA256"):
            e = self.assertRaises(ConfigurationError, tls.check_ciphers, string)
            self.assertIn(repr(string), str(e))

    def test_non_forward_secret_named(self) -> None:
        """A string allowing RSA key exchange logs a warning naming each such suite."""
        with capturedLogs() as events:
            weak = tls.check_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256:AES128-GCM-SHA256")
        self.assertEqual(weak, ["AES128-GCM-SHA256"])
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["suites"], "AES128-GCM-SHA256")

    def test_min_version(self) -> None:
        """Versions before 1.2 and unknown ones are refused with a reason."""
        self.assertEqual(tls.min_version_number("1.3"), SSL.TLS1_3_VERSION)
        self.assertIn(
            "RFC 8996",
            str(self.assertRaises(ConfigurationError, tls.min_version_number, "1.1")),
        )
        self.assertIn(
            "'2.0'",
            str(self.assertRaises(ConfigurationError, tls.min_version_number, "2.0")),
        )


class IdentityTests(unittest.TestCase):
    """
    A listener's key and certificate load whatever their line endings.
    """

    def test_cr_only_warned(self) -> None:
        """A CR-only cert.pem loads, with a warning that names the file."""
        layout = support.make_root()
        layout.cert.write_bytes(layout.cert.read_bytes().replace(b"\n", b"\r"))
        with capturedLogs() as events:
            identity = tls.load_identity(layout.cert, layout.key)
        self.assertEqual(identity.certificate, pki.load_certificates(layout.cert)[0])
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertIn(str(layout.cert), event["note"])

    def test_crlf_silent(self) -> None:
        """A CRLF key and certificate load without a warning."""
        layout = support.make_root()
        for path in (layout.cert, layout.key):
            path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
        with capturedLogs() as events:
            tls.load_identity(layout.cert, layout.key)
        self.assertEqual(events, [])


class OperatorWarningTests(unittest.TestCase):
    """
    What an operator is warned of: exposed keys, suites the key cannot use,
    and failed handshakes on a listener that logs no refusals itself.
    """

    def test_exposed_key(self) -> None:
        """A key file readable by others is named in a warning with the fix."""
        layout = support.make_root()
        with capturedLogs() as events:
            tls.load_identity(layout.cert, layout.key)
        self.assertEqual(events, [])
        layout.key.chmod(0o644)
        with capturedLogs() as events:
            tls.load_identity(layout.cert, layout.key)
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["path"], str(layout.key))
        self.assertIn(
            f"{layout.key} holds a private key and has mode 0644: every user of "
            f"this machine has access to it; run chmod 600 {layout.key}",
            formatEvent(event),
        )

    def test_group_readable_key(self) -> None:
        """A key file its group may read is named as such in the warning."""
        layout = support.make_root()
        layout.key.chmod(0o640)
        with capturedLogs() as events:
            tls.load_identity(layout.cert, layout.key)
        [event] = events
        self.assertIn("mode 0640: its group has access to it", formatEvent(event))

    def test_refuse_exposed(self) -> None:
        """
        refuse_exposed names every key file open to others, once, with its
        chmod, and passes owner-only and missing files.
        """
        layout = support.make_root()
        layout.ca_key.unlink()
        tls.refuse_exposed([layout.key, layout.app_key, layout.ca_key])
        layout.key.chmod(0o640)
        layout.app_key.chmod(0o604)
        e = self.assertRaises(
            ConfigurationError,
            tls.refuse_exposed,
            [layout.key, layout.app_key, layout.key, layout.ca_key],
        )
        message = str(e)
        self.assertTrue(message.startswith("--strict refuses private key files"))
        self.assertEqual(message.count(f"run chmod 600 {layout.key}"), 1)
        self.assertIn(f"run chmod 600 {layout.app_key}", message)
        self.assertNotIn(str(layout.ca_key), message)
        self.assertNotIn("\n", message)

    def test_suites_for_key(self) -> None:
        """ECDSA keys get the ECDSA suites and RSA keys the others."""
        suites = tls.tls12_suites(tls.DEFAULT_CIPHERS)
        ecdsa = tls.suites_for_key(suites, pki.generate_private_key())
        self.assertEqual(len(ecdsa), 3)
        self.assertTrue(all("-ECDSA-" in s for s in ecdsa))
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.assertEqual(len(tls.suites_for_key(suites, rsa_key)), 6)

    def test_alerts_logged(self) -> None:
        """With log_alerts_as, a refused TLS 1.1 client is logged with the reason."""
        layout = support.make_root()
        identity = tls.load_identity(layout.cert, layout.key)
        context = tls.build_context(tls.TLSPolicy(), identity, log_alerts_as="HTTPS")
        with capturedLogs() as events:
            result = _Handshake(
                tls.ServerConnectionCreator(context),
                _client_context(max_version=SSL.TLS1_1_VERSION),
            )
        self.assertTrue(result.failed)
        [event] = [e for e in events if e.get("label") == "HTTPS"]
        self.assertEqual(event["direction"], "sent")
        self.assertIn("only TLS versions this server refuses", event["alert"])


class FailureWordsTests(unittest.TestCase):
    """
    OpenSSL's reasons for a failed handshake become words, and say who gave up.
    """

    def test_table(self) -> None:
        """Each known OpenSSL phrase maps to its meaning and to who refused."""
        from twisted_tls4d._peer import describe_tls_failure

        cases = [
            ("peer did not return a certificate", True, "presented no certificate"),
            ("tlsv1 alert unknown ca", False, "does not trust"),
            ("wrong version number", True, "did not speak TLS"),
            ("unsupported protocol", True, "TLS versions"),
            ("no shared cipher", True, "no cipher suite"),
            ("Connection lost in a non-clean fashion", False, "closed the connection"),
        ]
        for text, refused, words in cases:
            got_refused, why = describe_tls_failure(Failure(SSL.Error(text)))
            self.assertEqual(got_refused, refused, text)
            self.assertIn(words, why)
