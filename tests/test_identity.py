"""
Tests for issuing client identities (``tls4d client``) and reading them back
in the clients' options.
"""

from __future__ import annotations

import stat
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.trial import unittest

from tests import support
from twisted_tls4d import cli, clienttls, identity, pki
from twisted_tls4d.errors import ConfigurationError


class IssueTests(unittest.TestCase):
    """
    A client identity is a fresh key, a clientAuth certificate from the
    root's CA, and that CA's certificate.
    """

    def setUp(self) -> None:
        self.layout = support.make_root()
        self.out = support.temporary_folder("tls4d-id-") / "bob"
        self.written = identity.issue_client_identity(self.layout, "bob", self.out)

    def test_files(self) -> None:
        """The key is mode 0600, the certificate names bob, ca.pem is the root CA."""
        self.assertEqual(
            self.written, clienttls.ClientIdentity.from_directory(self.out)
        )
        self.assertEqual(stat.S_IMODE(self.written.key.stat().st_mode), 0o600)
        self.assertEqual(self.written.ca.read_bytes(), self.layout.ca.read_bytes())
        cert = pki.load_certificates(self.written.cert)[0]
        self.assertEqual(cert.subject.rfc4514_string(), "CN=bob")
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(usage), [ExtendedKeyUsageOID.CLIENT_AUTH])
        cert.verify_directly_issued_by(pki.load_certificates(self.layout.ca)[0])
        pki.check_key_matches(
            cert,
            pki.load_private_key(self.written.key),
            self.written.cert,
            self.written.key,
        )

    def test_never_overwrites(self) -> None:
        """Issuing into a folder that holds a key is refused; the key stays."""
        before = self.written.key.read_bytes()
        e = self.assertRaises(
            ConfigurationError,
            identity.issue_client_identity,
            self.layout,
            "eve",
            self.out,
        )
        self.assertIn(str(self.written.key), str(e))
        self.assertEqual(self.written.key.read_bytes(), before)

    def test_empty_name(self) -> None:
        """An empty name is refused."""
        self.assertRaises(
            ConfigurationError,
            identity.issue_client_identity,
            self.layout,
            " ",
            self.out.parent / "empty",
        )

    def test_command_without_ca(self) -> None:
        """tls4d client on a root without a CA fails with one line naming the CA key."""
        missing = support.temporary_folder("tls4d-id-") / "nowhere"
        status = cli.main(
            ["client", "x", "--root", str(missing), "--out", str(missing)]
        )
        self.assertEqual(status, 1)
        self.assertFalse((missing / "key.pem").exists())

    def test_command(self) -> None:
        """tls4d client writes an identity the clients' options read back."""
        out = self.out.parent / "carol"
        status = cli.main(
            ["client", "carol", "--root", str(self.layout.path), "--out", str(out)]
        )
        self.assertEqual(status, 0)
        found = clienttls.ClientIdentity.from_options(out)
        self.assertEqual(found, clienttls.ClientIdentity.from_directory(out))


class OptionsTests(unittest.TestCase):
    """
    The clients' identity options: a folder, with single files overriding it.
    """

    def test_overrides(self) -> None:
        """--key, --cert and --ca win over the folder's files."""
        folder = support.temporary_folder("tls4d-id-")
        found = clienttls.ClientIdentity.from_options(folder, ca=Path("other-ca.pem"))
        self.assertEqual(found.key, folder / "key.pem")
        self.assertEqual(found.ca, Path("other-ca.pem"))

    def test_incomplete(self) -> None:
        """Without a folder, each missing file is named."""
        e = self.assertRaises(
            ConfigurationError,
            clienttls.ClientIdentity.from_options,
            None,
            Path("k.pem"),
        )
        self.assertIn("--cert, --ca missing", str(e))

    def test_not_a_folder(self) -> None:
        """A folder that does not exist is refused, naming it."""
        e = self.assertRaises(
            ConfigurationError,
            clienttls.ClientIdentity.from_options,
            Path("/nonexistent/x"),
        )
        self.assertIn("/nonexistent/x is not a folder", str(e))
