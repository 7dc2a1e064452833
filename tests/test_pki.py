"""
Tests for twisted_tls4d.pki: keys, the local CA, issued certificates, PEM
reading and the built-in DH group.
"""

from __future__ import annotations

import datetime
import shutil
import stat
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.trial import unittest

from tests import support
from twisted_tls4d import pki
from twisted_tls4d.errors import KeyMismatchError, PEMError


def _temp() -> Path:
    return support.temporary_folder("tls4d-pki-")


class PrivateKeyTests(unittest.TestCase):
    """
    Private keys are made on the curves asked for and written for their
    owner's eyes only.
    """

    def test_default_curve(self) -> None:
        """A new key is ECDSA P-256 unless another curve is asked for."""
        key = pki.generate_private_key()
        self.assertIsInstance(key.curve, ec.SECP256R1)
        self.assertIsInstance(pki.generate_private_key("P-384").curve, ec.SECP384R1)

    def test_unknown_curve(self) -> None:
        """An unsupported curve is refused with a message naming it."""
        e = self.assertRaises(ValueError, pki.generate_private_key, "P-521")
        self.assertIn("'P-521'", str(e))

    def test_written_mode_0600(self) -> None:
        """A written private key is mode 0600 and loads back as the same key."""
        path = _temp() / "key.pem"
        key = pki.generate_private_key()
        pki.write_private_key(path, key)
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        loaded = pki.load_private_key(path)
        self.assertEqual(loaded.private_numbers(), key.private_numbers())  # type: ignore[union-attr]
        self.assertEqual([p.name for p in path.parent.iterdir()], ["key.pem"])

    def test_encrypted_key_refused(self) -> None:
        """An encrypted key is refused with a message saying to store it unencrypted."""
        from cryptography.hazmat.primitives import serialization

        path = _temp() / "key.pem"
        path.write_bytes(
            pki.generate_private_key().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            )
        )
        e = self.assertRaises(PEMError, pki.load_private_key, path)
        self.assertIn("encrypted", str(e))
        self.assertIn(str(path), str(e))


class LocalCATests(unittest.TestCase):
    """
    The local CA and the certificates it issues meet the rules browsers and
    Mozilla's profiles apply.
    """

    def setUp(self) -> None:
        self.ca = pki.create_local_ca("unit test")

    def test_ca_certificate(self) -> None:
        """The CA is a CA limited to issuing end-entity certificates."""
        constraints = self.ca.certificate.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value
        self.assertTrue(constraints.ca)
        self.assertEqual(constraints.path_length, 0)
        self.assertGreater(self.ca.certificate.serial_number, 0)

    def test_two_cas_differ(self) -> None:
        """Two CAs never share a key or a name."""
        other = pki.create_local_ca("unit test")
        self.assertNotEqual(other.certificate.subject, self.ca.certificate.subject)
        self.assertNotEqual(
            other.key.private_numbers(),  # type: ignore[union-attr]
            self.ca.key.private_numbers(),  # type: ignore[union-attr]
        )

    def test_server_certificate(self) -> None:
        """
        A server certificate is not a CA, has the serverAuth purpose, names
        its hosts and addresses, lives under 366 days and has a positive serial.
        """
        key = pki.generate_private_key()
        names = ["localhost", "127.0.0.1", "::1"]
        cert = pki.issue_certificate(
            self.ca, key.public_key(), "localhost", server_names=names
        )
        ext = cert.extensions
        self.assertFalse(ext.get_extension_for_class(x509.BasicConstraints).value.ca)
        self.assertEqual(
            list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value),
            [ExtendedKeyUsageOID.SERVER_AUTH],
        )
        san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(
            [str(a) for a in san.get_values_for_type(x509.IPAddress)],
            ["127.0.0.1", "::1"],
        )
        lifespan = cert.not_valid_after_utc - cert.not_valid_before_utc
        self.assertLessEqual(lifespan, datetime.timedelta(days=366))
        self.assertGreater(cert.serial_number, 0)
        self.assertEqual(cert.issuer, self.ca.certificate.subject)
        cert.verify_directly_issued_by(self.ca.certificate)

    def test_overlong_server_certificate_refused(self) -> None:
        """A server certificate longer than 366 days is refused, saying why."""
        key = pki.generate_private_key()
        e = self.assertRaises(
            ValueError,
            pki.issue_certificate,
            self.ca,
            key.public_key(),
            "x",
            server_names=["x"],
            days=825,
        )
        self.assertIn("825 days", str(e))

    def test_at_least_one_day(self) -> None:
        """A certificate valid for less than a day is refused, naming the days."""
        key = pki.generate_private_key()
        for days in (0, -5):
            e = self.assertRaises(
                ValueError,
                pki.issue_certificate,
                self.ca,
                key.public_key(),
                "x",
                client=True,
                days=days,
            )
            self.assertIn(f"not {days}", str(e))

    def test_client_certificate(self) -> None:
        """A client certificate has the clientAuth purpose and no host names."""
        key = pki.generate_private_key()
        cert = pki.issue_certificate(self.ca, key.public_key(), "alice", client=True)
        self.assertEqual(
            list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value),
            [ExtendedKeyUsageOID.CLIENT_AUTH],
        )
        self.assertRaises(
            x509.ExtensionNotFound,
            cert.extensions.get_extension_for_class,
            x509.SubjectAlternativeName,
        )

    def test_openssl_verifies_chain(self) -> None:
        """The openssl command verifies an issued server certificate against the CA."""
        if shutil.which("openssl") is None:
            raise unittest.SkipTest("the openssl command is not installed")
        folder = _temp()
        key = pki.generate_private_key()
        cert = pki.issue_certificate(
            self.ca, key.public_key(), "localhost", server_names=["localhost"]
        )
        pki.write_certificates(folder / "ca.pem", [self.ca.certificate])
        pki.write_certificates(folder / "cert.pem", [cert])
        result = subprocess.run(
            [
                "openssl",
                "verify",
                "-purpose",
                "sslserver",
                "-CAfile",
                "ca.pem",
                "cert.pem",
            ],
            cwd=folder,
            capture_output=True,
            text=True,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)


class PEMReadingTests(unittest.TestCase):
    """
    PEM files load whatever their line endings, and mismatches are named.
    """

    def setUp(self) -> None:
        ca = pki.create_local_ca("pem test")
        self.key = pki.generate_private_key()
        self.cert = pki.issue_certificate(
            ca, self.key.public_key(), "localhost", server_names=["localhost"]
        )
        self.folder = _temp()
        pki.write_certificates(self.folder / "cert.pem", [self.cert])
        self.lf = (self.folder / "cert.pem").read_bytes()

    def test_crlf(self) -> None:
        """A certificate with CRLF line endings loads without a note."""
        path = self.folder / "crlf.pem"
        path.write_bytes(self.lf.replace(b"\n", b"\r\n"))
        text = pki.read_pem(path)
        self.assertIsNone(text.note)
        self.assertEqual(pki.load_certificates(path, text), [self.cert])

    def test_cr_only(self) -> None:
        """A certificate with CR-only line endings loads, with a note naming it."""
        path = self.folder / "cr.pem"
        path.write_bytes(self.lf.replace(b"\n", b"\r"))
        text = pki.read_pem(path)
        assert text.note is not None
        self.assertIn(str(path), text.note)
        self.assertEqual(pki.load_certificates(path, text), [self.cert])

    def test_not_a_certificate(self) -> None:
        """A file without a certificate is refused, naming the file."""
        path = self.folder / "junk.pem"
        path.write_bytes(b"hello\n")
        e = self.assertRaises(PEMError, pki.load_certificates, path)
        self.assertIn(str(path), str(e))

    def test_truncated_certificate(self) -> None:
        """A truncated certificate is refused, naming the file."""
        path = self.folder / "cut.pem"
        path.write_bytes(
            self.lf[: len(self.lf) // 2] + b"\n-----END CERTIFICATE-----\n"
        )
        e = self.assertRaises(PEMError, pki.load_certificates, path)
        self.assertIn(str(path), str(e))

    def test_missing_file(self) -> None:
        """A missing file is refused, naming the file."""
        path = self.folder / "absent.pem"
        e = self.assertRaises(PEMError, pki.read_pem, path)
        self.assertIn(str(path), str(e))

    def test_damaged_public_key(self) -> None:
        """A certificate whose public key was damaged is refused, naming the file."""
        from cryptography.hazmat.primitives import serialization

        der = self.cert.public_bytes(serialization.Encoding.DER)
        point = self.key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        at = der.index(point) + len(point) - 1
        damaged = x509.load_der_x509_certificate(
            der[:at] + bytes([der[at] ^ 0x01]) + der[at + 1 :]
        )
        e = self.assertRaises(
            PEMError,
            pki.check_key_matches,
            damaged,
            self.key,
            Path("cert.pem"),
            Path("key.pem"),
        )
        self.assertIn("cert.pem holds a certificate whose public key", str(e))

    def test_key_mismatch(self) -> None:
        """A certificate issued for another key is refused, naming both files."""
        other = pki.generate_private_key()
        e = self.assertRaises(
            KeyMismatchError,
            pki.check_key_matches,
            self.cert,
            other,
            Path("cert.pem"),
            Path("key.pem"),
        )
        self.assertIn("cert.pem does not match key.pem", str(e))
        pki.check_key_matches(self.cert, self.key, Path("cert.pem"), Path("key.pem"))


class DHGroupTests(unittest.TestCase):
    """
    The DH parameters written on first start are RFC 7919's ffdhe2048 group.
    """

    def test_same_as_openssl(self) -> None:
        """The built-in group is byte for byte what openssl writes for ffdhe2048."""
        if shutil.which("openssl") is None:
            raise unittest.SkipTest("the openssl command is not installed")
        result = subprocess.run(
            [
                "openssl",
                "genpkey",
                "-genparam",
                "-algorithm",
                "DH",
                "-pkeyopt",
                "group:ffdhe2048",
            ],
            capture_output=True,
            check=True,
        )
        self.assertEqual(result.stdout, pki.FFDHE2048_PEM)

    def test_safe_prime(self) -> None:
        """The modulus p and (p - 1) / 2 are probable primes, and g is 2."""
        import warnings

        from cryptography.hazmat.primitives.serialization import load_pem_parameters

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            numbers = load_pem_parameters(pki.FFDHE2048_PEM).parameter_numbers()  # type: ignore[attr-defined]
        p = numbers.p
        self.assertEqual(p.bit_length(), 2048)
        self.assertEqual(numbers.g, 2)
        for n in (p, (p - 1) // 2):
            for base in (2, 3, 5, 7, 11, 13):
                self.assertEqual(pow(base, n - 1, n), 1)
