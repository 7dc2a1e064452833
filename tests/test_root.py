"""
Tests for twisted_tls4d.root: the first start creates what a root lacks, and
later starts regenerate nothing.
"""

from __future__ import annotations

import stat

from cryptography import x509
from twisted.logger import LogLevel, capturedLogs
from twisted.trial import unittest

from tests import support
from twisted_tls4d import pki, root, tls
from twisted_tls4d.errors import ConfigurationError


def _new_layout() -> root.RootLayout:
    return root.RootLayout(support.temporary_folder("tls4d-root-") / "root")


class FirstStartTests(unittest.TestCase):
    """
    Bootstrapping an empty root creates the whole layout.
    """

    def setUp(self) -> None:
        self.layout = _new_layout()
        with capturedLogs() as self.events:
            self.created = root.bootstrap(self.layout, hostname="db1.example.test")

    def test_creates_everything(self) -> None:
        """Every file of the layout exists after the first start, each logged."""
        lay = self.layout
        expected = [
            lay.web_folder / "index.html",
            lay.ca_key,
            lay.ca,
            lay.key,
            lay.cert,
            lay.app_key,
            lay.app_cert,
            lay.dhparams,
        ]
        self.assertEqual(self.created, expected)
        for path in expected:
            self.assertTrue(path.is_file(), path)
        self.assertTrue(lay.data.is_dir())
        logged = " ".join(str(e.get("path")) for e in self.events)
        for path in expected:
            self.assertIn(str(path), logged)

    def test_private_keys_0600(self) -> None:
        """The CA key and both server keys are readable by their owner only."""
        for path in (self.layout.ca_key, self.layout.key, self.layout.app_key):
            self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600, path)

    def test_no_secret_logged(self) -> None:
        """No log event carries private key material."""
        for event in self.events:
            self.assertNotIn("PRIVATE KEY", repr(event))

    def test_generated_certificate_warned(self) -> None:
        """Each generated server certificate is logged as a warning to replace it."""
        warnings = [e for e in self.events if e["log_level"] is LogLevel.warn]
        self.assertEqual(len(warnings), 2)
        self.assertIn("production", warnings[0]["log_format"])

    def test_certificates_signed_by_local_ca(self) -> None:
        """The server certificates chain to Resources/ca.pem and match their keys."""
        ca = pki.load_certificates(self.layout.ca)[0]
        for _, key_path, cert_path in self.layout.server_pairs():
            identity = tls.load_identity(cert_path, key_path)
            identity.certificate.verify_directly_issued_by(ca)

    def test_names(self) -> None:
        """The server certificates cover localhost, 127.0.0.1, ::1 and the host name."""
        cert = pki.load_certificates(self.layout.cert)[0]
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(
            san.get_values_for_type(x509.DNSName), ["localhost", "db1.example.test"]
        )
        self.assertEqual(
            [str(a) for a in san.get_values_for_type(x509.IPAddress)],
            ["127.0.0.1", "::1"],
        )

    def test_dhparams(self) -> None:
        """dhparams.pem holds the ffdhe2048 group, written at once."""
        self.assertEqual(self.layout.dhparams.read_bytes(), pki.FFDHE2048_PEM)

    def test_second_start_regenerates_nothing(self) -> None:
        """A second start creates nothing and leaves every file as it was."""
        before = {p: p.read_bytes() for p in self.created}
        self.assertEqual(root.bootstrap(self.layout, hostname="db1.example.test"), [])
        self.assertEqual({p: p.read_bytes() for p in self.created}, before)

    def test_existing_web_folder_kept(self) -> None:
        """An existing WebFolder gets no start page."""
        other = _new_layout()
        other.web_folder.mkdir(parents=True)
        root.bootstrap(other, hostname="h")
        self.assertEqual(list(other.web_folder.iterdir()), [])

    def test_roots_never_share_keys(self) -> None:
        """Two roots get different CA and server keys."""
        other = _new_layout()
        root.bootstrap(other, hostname="db1.example.test")
        for a, b in [
            (self.layout.ca_key, other.ca_key),
            (self.layout.key, other.key),
            (self.layout.app_key, other.app_key),
        ]:
            self.assertNotEqual(a.read_bytes(), b.read_bytes())


class HalfPairTests(unittest.TestCase):
    """
    A root holding half of a key pair stops the start instead of guessing.
    """

    def test_key_without_certificate(self) -> None:
        """A key.pem without cert.pem is refused, naming both files."""
        layout = _new_layout()
        root.bootstrap(layout, hostname="h")
        layout.cert.unlink()
        e = self.assertRaises(ConfigurationError, root.bootstrap, layout, "h")
        self.assertIn(str(layout.cert), str(e))
        self.assertIn(str(layout.key), str(e))

    def test_ca_key_without_certificate(self) -> None:
        """A CA key without its certificate is refused."""
        layout = _new_layout()
        root.bootstrap(layout, hostname="h")
        layout.ca.unlink()
        e = self.assertRaises(ConfigurationError, root.bootstrap, layout, "h")
        self.assertIn(str(layout.ca), str(e))

    def test_missing_pair_without_ca_key(self) -> None:
        """A missing server pair cannot be generated without the CA key, and says so."""
        layout = _new_layout()
        root.bootstrap(layout, hostname="h")
        layout.ca_key.unlink()
        layout.key.unlink()
        layout.cert.unlink()
        e = self.assertRaises(ConfigurationError, root.bootstrap, layout, "h")
        self.assertIn(str(layout.ca_key), str(e))

    def test_regenerates_a_removed_pair(self) -> None:
        """A removed server pair is generated again, signed by the same CA."""
        layout = _new_layout()
        root.bootstrap(layout, hostname="h")
        old_key = layout.app_key.read_bytes()
        layout.app_key.unlink()
        layout.app_cert.unlink()
        self.assertEqual(root.bootstrap(layout, "h"), [layout.app_key, layout.app_cert])
        self.assertNotEqual(layout.app_key.read_bytes(), old_key)
        ca = pki.load_certificates(layout.ca)[0]
        pki.load_certificates(layout.app_cert)[0].verify_directly_issued_by(ca)


class ServerNamesTests(unittest.TestCase):
    """
    The host name joins the certificate names only when it is a usable DNS name.
    """

    def test_names(self) -> None:
        """Valid names are added once; empty, invalid and duplicate ones are not."""
        base = ["localhost", "127.0.0.1", "::1"]
        self.assertEqual(root.server_names("web-1.example"), [*base, "web-1.example"])
        self.assertEqual(root.server_names(""), base)
        self.assertEqual(root.server_names("LOCALHOST"), base)
        self.assertEqual(root.server_names("bad_name!"), base)
