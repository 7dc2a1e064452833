"""
Tests for the key and certificate life cycle: ``tls4d keypair``, ``tls4d
request`` and ``tls4d install`` and the functions behind them, with
certificates, requests and PKCS#12 files the real ``openssl`` command reads
and makes.
"""

from __future__ import annotations

import datetime
import getpass
import io
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.trial import unittest

from tests import support
from twisted_tls4d import cli, lifecycle, lifecycle_cli, pki, root, tls
from twisted_tls4d.errors import ConfigurationError, PEMError

_DAY = datetime.timedelta(days=1)

_SERVER_EXTENSIONS = """\
basicConstraints = CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
"""


def _temp() -> Path:
    return support.temporary_folder("tls4d-lifecycle-")


def _need_openssl() -> None:
    if shutil.which("openssl") is None:
        raise unittest.SkipTest("the openssl command is not installed")


def _openssl(folder: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """
    Run the openssl command in ``folder``, failing the test if it fails.
    """
    result = subprocess.run(
        ["openssl", *arguments], cwd=folder, capture_output=True, text=True
    )
    if result.returncode != 0:
        msg = f"openssl {' '.join(arguments)} failed: {result.stdout}{result.stderr}"
        raise AssertionError(msg)
    return result


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca(common_name: str, issuer: pki.LocalCA | None = None) -> pki.LocalCA:
    """
    Returns:
        A certificate authority: a root when ``issuer`` is None, else an
        intermediate it signed.
    """
    key = pki.generate_private_key()
    now = pki.utc_now()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer.certificate.subject if issuer else _name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + 365 * _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(issuer.key if issuer else key, hashes.SHA256())
    )
    return pki.LocalCA(certificate, key)


def _leaf(
    ca: pki.LocalCA,
    key: pki.PrivateKey,
    *,
    names: Sequence[str] = ("localhost",),
    purposes: Sequence[x509.ObjectIdentifier] | None = (
        ExtendedKeyUsageOID.SERVER_AUTH,
    ),
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> x509.Certificate:
    """
    Returns:
        A server certificate for ``key`` from ``ca``; ``purposes`` None
        leaves out the extended key usage.
    """
    now = pki.utc_now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - _DAY)
        .not_valid_after(not_after or now + 90 * _DAY)
        .add_extension(
            x509.SubjectAlternativeName(pki.general_names(list(names))), False
        )
    )
    if purposes is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(purposes)), False)
    return builder.sign(ca.key, hashes.SHA256())


def _write(folder: Path, name: str, *certificates: x509.Certificate) -> Path:
    path = folder / name
    pki.write_certificates(path, certificates)
    return path


def _write_key(folder: Path, name: str, key: pki.PrivateKey) -> Path:
    path = folder / name
    pki.write_private_key(path, key)
    return path


def _answers(answers: Sequence[str]) -> Callable[[str], str]:
    """
    Returns:
        A stand-in for `getpass.getpass` that gives ``answers`` in turn.
    """
    given = iter(answers)
    return lambda prompt: next(given)


class _Output:
    """
    Runs the ``tls4d`` command in the test's process, capturing what it
    prints.
    """

    def __init__(self, test: unittest.TestCase) -> None:
        self.stdout = io.StringIO()
        self.stderr = io.StringIO()
        test.patch(sys, "stdout", self.stdout)
        test.patch(sys, "stderr", self.stderr)

    def run(self, *argv: str | Path) -> int:
        return cli.main([str(a) for a in argv])


class KeypairTests(unittest.TestCase):
    """
    ``tls4d keypair`` makes a private key for its owner's eyes only, with its
    public key, and refuses weak keys and overwriting.
    """

    def setUp(self) -> None:
        self.folder = _temp()
        self.out = _Output(self)

    def test_default_ecdsa(self) -> None:
        """By default: an ECDSA P-256 PKCS#8 key, mode 0600, and its public key."""
        key_path = self.folder / "key.pem"
        public_path = self.folder / "public.pem"
        status = self.out.run("keypair", "--out", key_path, "--public-out", public_path)
        self.assertEqual(status, 0, self.out.stderr.getvalue())
        self.assertEqual(stat.S_IMODE(key_path.stat().st_mode), 0o600)
        pem = key_path.read_bytes()
        self.assertTrue(pem.startswith(b"-----BEGIN PRIVATE KEY-----"))
        key = pki.load_private_key(key_path)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.assertIsInstance(key.curve, ec.SECP256R1)
        public = public_path.read_bytes()
        self.assertTrue(public.startswith(b"-----BEGIN PUBLIC KEY-----"))
        self.assertEqual(
            serialization.load_pem_public_key(public),
            key.public_key(),
        )
        self.assertIn("ECDSA P-256", self.out.stdout.getvalue())

    def test_p384_and_rsa(self) -> None:
        """P-384 and RSA 3072-bit keys are made when asked for."""
        key = lifecycle.generate_keypair(curve="P-384")
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.assertIsInstance(key.curve, ec.SECP384R1)
        status = self.out.run(
            "keypair", "--type", "rsa", "--bits", "3072", "--out", self.folder / "r"
        )
        self.assertEqual(status, 0, self.out.stderr.getvalue())
        rsa_key = pki.load_private_key(self.folder / "r")
        assert isinstance(rsa_key, rsa.RSAPrivateKey)
        self.assertEqual(rsa_key.key_size, 3072)
        self.assertEqual(rsa_key.public_key().public_numbers().e, 65537)

    def test_small_rsa_refused(self) -> None:
        """An RSA key under 2048 bits is refused, saying 4D's 512 bits are breakable."""
        status = self.out.run(
            "keypair", "--type", "rsa", "--bits", "512", "--out", self.folder / "k"
        )
        self.assertEqual(status, 1)
        message = self.out.stderr.getvalue()
        self.assertTrue(message.startswith("tls4d: An RSA key of 512 bits is refused"))
        self.assertIn("4D's GENERATE ENCRYPTION KEYPAIR", message)
        self.assertIn("broken", message)
        self.assertFalse((self.folder / "k").exists())

    def test_mismatched_options(self) -> None:
        """A size for an ECDSA key, a curve for an RSA key or an odd size is refused."""
        self.assertRaises(ConfigurationError, lifecycle.generate_keypair, bits=2048)
        self.assertRaises(
            ConfigurationError, lifecycle.generate_keypair, "rsa", curve="P-256"
        )
        e = self.assertRaises(
            ConfigurationError, lifecycle.generate_keypair, "rsa", bits=2500
        )
        self.assertIn("2048, 3072, 4096", str(e))
        self.assertRaises(ConfigurationError, lifecycle.generate_keypair, "dsa")

    def test_never_overwrites(self) -> None:
        """An existing key or public key file is refused; neither file is written."""
        key_path = self.folder / "key.pem"
        key_path.write_bytes(b"old key")
        status = self.out.run("keypair", "--out", key_path)
        self.assertEqual(status, 1)
        self.assertIn(f"{key_path} already exists", self.out.stderr.getvalue())
        self.assertEqual(key_path.read_bytes(), b"old key")

        public_path = self.folder / "public.pem"
        public_path.write_bytes(b"old public")
        new_key = self.folder / "new.pem"
        e = self.assertRaises(
            ConfigurationError,
            lifecycle.write_keypair,
            pki.generate_private_key(),
            new_key,
            public_out=public_path,
        )
        self.assertIn(str(public_path), str(e))
        self.assertFalse(new_key.exists())
        self.assertEqual(public_path.read_bytes(), b"old public")

    def test_public_key_unwritable(self) -> None:
        """When the public key cannot be written, the new private key goes too."""
        (self.folder / "file").write_bytes(b"")
        key_path = self.folder / "key.pem"
        e = self.assertRaises(
            ConfigurationError,
            lifecycle.write_keypair,
            pki.generate_private_key(),
            key_path,
            public_out=self.folder / "file" / "public.pem",
        )
        self.assertIn("is not a folder", str(e))
        self.assertFalse(key_path.exists())
        self.assertEqual(sorted(p.name for p in self.folder.iterdir()), ["file"])

    def test_encrypted_with_passphrase_file(self) -> None:
        """--passphrase-file encrypts the key; openssl decrypts it with the same."""
        _need_openssl()
        secret = self.folder / "secret.txt"
        secret.write_text("correct horse\n")
        key_path = self.folder / "key.pem"
        status = self.out.run("keypair", "--out", key_path, "--passphrase-file", secret)
        self.assertEqual(status, 0, self.out.stderr.getvalue())
        self.assertEqual(stat.S_IMODE(key_path.stat().st_mode), 0o600)
        pem = key_path.read_bytes()
        self.assertTrue(pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----"))
        self.assertRaises(PEMError, pki.load_private_key, key_path)
        key = lifecycle.load_key(key_path, lambda what: b"correct horse")
        self.assertIsInstance(key, ec.EllipticCurvePrivateKey)
        result = _openssl(
            self.folder, "pkey", "-in", "key.pem", "-passin", "file:secret.txt"
        )
        self.assertIn("-----BEGIN PRIVATE KEY-----", result.stdout)

    def test_ask_passphrase(self) -> None:
        """--ask-passphrase asks twice at the terminal and encrypts with the answer."""
        answers = iter(["s3cret!", "s3cret!"])
        self.patch(lifecycle_cli, "_interactive", lambda: True)
        self.patch(getpass, "getpass", lambda prompt: next(answers))
        key_path = self.folder / "key.pem"
        status = self.out.run("keypair", "--out", key_path, "--ask-passphrase")
        self.assertEqual(status, 0, self.out.stderr.getvalue())
        lifecycle.load_key(key_path, lambda what: b"s3cret!")
        self.assertIn("encrypted with your passphrase", self.out.stdout.getvalue())

    def test_ask_passphrase_refusals(self) -> None:
        """Two different passphrases, an empty one, or no terminal write no key."""
        self.patch(lifecycle_cli, "_interactive", lambda: False)
        key_path = self.folder / "key.pem"
        self.assertEqual(
            self.out.run("keypair", "--out", key_path, "--ask-passphrase"), 1
        )
        self.assertIn("--passphrase-file", self.out.stderr.getvalue())

        self.patch(lifecycle_cli, "_interactive", lambda: True)
        for answers, expected in [
            (["one", "two"], "differ"),
            (["", ""], "empty passphrase"),
        ]:
            self.patch(getpass, "getpass", _answers(answers))
            self.assertEqual(
                self.out.run("keypair", "--out", key_path, "--ask-passphrase"), 1
            )
            self.assertIn(expected, self.out.stderr.getvalue())
        self.assertFalse(key_path.exists())

    def test_empty_passphrase_file(self) -> None:
        """A passphrase file whose first line is empty is refused, naming it."""
        secret = self.folder / "secret.txt"
        secret.write_text("\nsecond line\n")
        status = self.out.run(
            "keypair", "--out", self.folder / "k.pem", "--passphrase-file", secret
        )
        self.assertEqual(status, 1)
        self.assertIn(str(secret), self.out.stderr.getvalue())


class RequestTests(unittest.TestCase):
    """
    ``tls4d request`` writes a SHA-256 PKCS#10 request that openssl verifies,
    always with subject alternative names, in any script.
    """

    def setUp(self) -> None:
        self.folder = _temp()
        self.key = pki.generate_private_key()
        self.key_path = _write_key(self.folder, "key.pem", self.key)
        self.out = _Output(self)

    def _request(self, *arguments: str) -> x509.CertificateSigningRequest:
        status = self.out.run(
            "request",
            "--key",
            self.key_path,
            "--out",
            self.folder / "request.pem",
            *arguments,
        )
        self.assertEqual(status, 0, self.out.stderr.getvalue())
        return x509.load_pem_x509_csr((self.folder / "request.pem").read_bytes())

    def test_openssl_verifies(self) -> None:
        """openssl req -verify accepts the request, signed with SHA-256 by the key."""
        _need_openssl()
        request = self._request(
            "--common-name",
            "www.example.com",
            "--country",
            "fr",
            "--state",
            "Île-de-France",
            "--locality",
            "Paris",
            "--organization",
            "Example",
            "--unit",
            "IT",
            "--email",
            "admin@example.com",
            "--san",
            "DNS:example.com,IP:192.0.2.7",
        )
        self.assertIsInstance(request.signature_hash_algorithm, hashes.SHA256)
        self.assertEqual(request.public_key(), self.key.public_key())
        result = _openssl(
            self.folder,
            "req",
            "-verify",
            "-in",
            "request.pem",
            "-noout",
            "-subject",
            "-nameopt",
            "utf8,sep_comma_plus",
        )
        self.assertIn("verify OK", result.stdout + result.stderr)
        self.assertIn("C=FR", result.stdout)
        self.assertIn("ST=Île-de-France", result.stdout)
        self.assertEqual(
            lifecycle.names_of(request),
            ["DNS:www.example.com", "DNS:example.com", "IP:192.0.2.7"],
        )

    def test_common_name_as_name(self) -> None:
        """Without --san, the request names the common name (a host or an address)."""
        request = self._request("--common-name", "db.example.com")
        self.assertEqual(lifecycle.names_of(request), ["DNS:db.example.com"])
        request = lifecycle.build_request(self.key, "::1")
        self.assertEqual(lifecycle.names_of(request), ["IP:::1"])

    def test_common_name_not_a_host(self) -> None:
        """A common name that is no host name, without --san, is refused, saying why."""
        e = self.assertRaises(
            ConfigurationError, lifecycle.build_request, self.key, "My web server"
        )
        self.assertIn("browsers ignore the common name", str(e))
        self.assertIn("--san", str(e))
        request = lifecycle.build_request(
            self.key, "My web server", names=["www.example.com"]
        )
        self.assertEqual(lifecycle.names_of(request), ["DNS:www.example.com"])

    def test_non_ascii_round_trip(self) -> None:
        """Non-ASCII fields are UTF-8 in the subject, IDNA in the names, read back."""
        _need_openssl()
        request = self._request(
            "--common-name",
            "bücher.example",
            "--organization",
            "Société Générale",
            "--locality",
            "Zürich",
            "--san",
            "www.bücher.example",
        )
        self.assertEqual(
            request.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value,
            "Société Générale",
        )
        common_name = request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0]
        self.assertEqual(common_name.value, "bücher.example")
        self.assertEqual(common_name._type, x509.name._ASN1Type.UTF8String)
        self.assertEqual(
            lifecycle.names_of(request),
            ["DNS:xn--bcher-kva.example", "DNS:www.xn--bcher-kva.example"],
        )
        result = _openssl(
            self.folder,
            "req",
            "-verify",
            "-in",
            "request.pem",
            "-noout",
            "-subject",
            "-nameopt",
            "utf8",
        )
        self.assertIn("Société Générale", result.stdout)
        self.assertIn("Zürich", result.stdout)

    def test_country_two_letters(self) -> None:
        """A country that is not two letters is refused, naming it."""
        for country in ("FRA", "F", "F1", "ÉÉ"):
            e = self.assertRaises(
                ConfigurationError,
                lifecycle.build_request,
                self.key,
                "localhost",
                country=country,
            )
            self.assertIn(repr(country), str(e))
            self.assertIn("two-letter", str(e))

    def test_bad_names(self) -> None:
        """Invalid DNS names, IP addresses and other kinds of name are refused."""
        for name, expected in [
            ("DNS:bad_name.example", "not a valid DNS name"),
            ("IP:300.1.2.3", "not an IP address"),
            ("email:a@example.com", "DNS:name and IP:address names only"),
            ("-x.example", "not a valid DNS name"),
        ]:
            e = self.assertRaises(
                ConfigurationError,
                lifecycle.build_request,
                self.key,
                "localhost",
                names=[name],
            )
            self.assertIn(expected, str(e))
            self.assertIn(repr(name), str(e))
        wildcard = lifecycle.subject_alternative_name("*.Example.COM")
        self.assertEqual(wildcard, x509.DNSName("*.example.com"))

    def test_field_limits(self) -> None:
        """A too long common name, an empty field or a non-ASCII mailbox is refused."""
        long_name = "a" * 60 + ".example.com"
        e = self.assertRaises(
            ConfigurationError, lifecycle.build_request, self.key, long_name
        )
        self.assertIn("at most 64", str(e))
        self.assertIn("--san", str(e))
        self.assertRaises(
            ConfigurationError,
            lifecycle.build_request,
            self.key,
            "localhost",
            organization=" ",
        )
        e = self.assertRaises(
            ConfigurationError,
            lifecycle.build_request,
            self.key,
            "localhost",
            email="jérôme@example.com",
        )
        self.assertIn("non-ASCII", str(e))
        request = lifecycle.build_request(
            self.key, "localhost", email="info@bücher.example"
        )
        self.assertEqual(
            request.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)[0].value,
            "info@xn--bcher-kva.example",
        )

    def test_encrypted_key(self) -> None:
        """An encrypted key takes its passphrase from a file or the terminal."""
        encrypted = self.folder / "encrypted.pem"
        encrypted.write_bytes(pki.private_key_pem(self.key, b"open sesame"))
        secret = self.folder / "secret.txt"
        secret.write_bytes(b"open sesame\r\n")
        self.key_path = encrypted
        request = self._request(
            "--common-name", "localhost", "--passphrase-file", str(secret)
        )
        self.assertEqual(request.public_key(), self.key.public_key())

        prompts: list[str] = []

        def ask(prompt: str) -> str:
            prompts.append(prompt)
            return "open sesame"

        self.patch(lifecycle_cli, "_interactive", lambda: True)
        self.patch(getpass, "getpass", ask)
        self._request("--common-name", "localhost")
        self.assertEqual(prompts, [f"Passphrase for {encrypted}: "])

    def test_encrypted_key_refusals(self) -> None:
        """A wrong passphrase, or none and no terminal, is refused naming the key."""
        encrypted = self.folder / "encrypted.pem"
        encrypted.write_bytes(pki.private_key_pem(self.key, b"open sesame"))
        self.patch(lifecycle_cli, "_interactive", lambda: False)
        arguments: list[str | Path] = [
            "request",
            "--key",
            encrypted,
            "--common-name",
            "localhost",
        ]
        out: list[str | Path] = ["--out", self.folder / "r.pem"]
        self.assertEqual(self.out.run(*arguments, *out), 1)
        self.assertIn(f"{encrypted} is protected", self.out.stderr.getvalue())
        self.assertIn("--passphrase-file", self.out.stderr.getvalue())

        wrong = self.folder / "wrong.txt"
        wrong.write_text("guess\n")
        self.assertEqual(self.out.run(*arguments, *out, "--passphrase-file", wrong), 1)
        self.assertIn(
            f"passphrase for {encrypted} is wrong", self.out.stderr.getvalue()
        )
        self.assertFalse((self.folder / "r.pem").exists())

    def test_rsa_key(self) -> None:
        """A request for an RSA key verifies too."""
        key = lifecycle.generate_keypair("rsa")
        request = lifecycle.build_request(key, "localhost")
        self.assertTrue(request.is_signature_valid)
        self.assertIsInstance(request.signature_hash_algorithm, hashes.SHA256)


class InteroperabilityTests(unittest.TestCase):
    """
    The three steps work with the openssl command as the certification
    authority: what openssl issues and exports, ``tls4d install`` takes.
    """

    def setUp(self) -> None:
        _need_openssl()
        self.folder = _temp()
        self.layout = support.make_root()
        self.out = _Output(self)
        self.ca = _ca("openssl test CA")
        _write(self.folder, "ca.pem", self.ca.certificate)
        _write_key(self.folder, "ca-key.pem", self.ca.key)
        (self.folder / "server.ext").write_text(_SERVER_EXTENSIONS)

    def _keypair_and_request(self) -> None:
        commands: list[list[str | Path]] = [
            ["keypair", "--out", self.folder / "key.pem"],
            [
                "request",
                "--key",
                self.folder / "key.pem",
                "--common-name",
                "localhost",
                "--organization",
                "Crêperie Bretonne",
                "--out",
                self.folder / "request.pem",
            ],
        ]
        for argv in commands:
            self.assertEqual(self.out.run(*argv), 0, self.out.stderr.getvalue())

    def _openssl_issue(self, *extra: str) -> None:
        _openssl(
            self.folder,
            "x509",
            "-req",
            "-in",
            "request.pem",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-set_serial",
            "4242",
            "-days",
            "90",
            "-extfile",
            "server.ext",
            "-out",
            "cert.pem",
            *extra,
        )

    def test_openssl_issued(self) -> None:
        """A certificate openssl issued for tls4d's request installs, with a report."""
        self._keypair_and_request()
        self._openssl_issue()
        old_key = self.layout.key.read_bytes()
        old_cert = self.layout.cert.read_bytes()
        status = self.out.run(
            "install",
            self.folder / "cert.pem",
            "--key",
            self.folder / "key.pem",
            "--for",
            "web",
            "--root",
            self.layout.path,
        )
        self.assertEqual(status, 0, self.out.stderr.getvalue())
        self.assertEqual(
            self.layout.key.read_bytes(), (self.folder / "key.pem").read_bytes()
        )
        self.assertEqual(stat.S_IMODE(self.layout.key.stat().st_mode), 0o600)
        installed = pki.load_certificates(self.layout.cert)
        self.assertEqual(installed[0].serial_number, 4242)
        tls.load_identity(self.layout.cert, self.layout.key)

        report = self.out.stdout.getvalue()
        self.assertIn("O=Crêperie Bretonne", report)
        self.assertIn("DNS:localhost, IP:127.0.0.1", report)
        self.assertIn("CN=openssl test CA", report)
        self.assertIn(installed[0].not_valid_after_utc.strftime("%Y-%m-%d"), report)
        self.assertIn("web and SQL servers", report)
        self.assertIn(f"tls4d reload --root {self.layout.path}", report)
        self.assertIn("unencrypted, mode 0600", report)

        backups = sorted(self.layout.path.glob("*.bak-*"))
        self.assertEqual(
            [b.name.split(".bak-")[0] for b in backups], ["cert.pem", "key.pem"]
        )
        self.assertEqual(backups[0].read_bytes(), old_cert)
        self.assertEqual(backups[1].read_bytes(), old_key)
        self.assertEqual(stat.S_IMODE(backups[1].stat().st_mode), 0o600)

    def test_openssl_pkcs12(self) -> None:
        """A PKCS#12 file openssl exported gives key, certificate and ordered chain."""
        intermediate = _ca("openssl intermediate", self.ca)
        key = pki.generate_private_key("P-384")
        leaf = _leaf(intermediate, key)
        _write_key(self.folder, "key.pem", key)
        _write(self.folder, "leaf.pem", leaf)
        _write(self.folder, "chain.pem", self.ca.certificate, intermediate.certificate)
        (self.folder / "pass.txt").write_text("pfx secret\n")
        _openssl(
            self.folder,
            "pkcs12",
            "-export",
            "-inkey",
            "key.pem",
            "-in",
            "leaf.pem",
            "-certfile",
            "chain.pem",
            "-passout",
            "file:pass.txt",
            "-out",
            "bundle.pfx",
        )
        status = self.out.run(
            "install",
            self.folder / "bundle.pfx",
            "--passphrase-file",
            self.folder / "pass.txt",
            "--for",
            "app",
            "--root",
            self.layout.path,
        )
        self.assertEqual(status, 0, self.out.stderr.getvalue())
        self.assertIn("(PKCS#12)", self.out.stdout.getvalue())
        self.assertEqual(
            pki.load_certificates(self.layout.app_cert),
            [leaf, intermediate.certificate, self.ca.certificate],
        )
        stored = pki.load_private_key(self.layout.app_key)
        assert isinstance(stored, ec.EllipticCurvePrivateKey)
        self.assertEqual(stored.private_numbers(), key.private_numbers())
        self.assertEqual(stat.S_IMODE(self.layout.app_key.stat().st_mode), 0o600)
        tls.load_identity(self.layout.app_cert, self.layout.app_key)

    def test_pkcs12_prompt_and_wrong_passphrase(self) -> None:
        """A PKCS#12 passphrase is asked at the terminal; a wrong one is refused."""
        key = pki.generate_private_key()
        _write_key(self.folder, "key.pem", key)
        _write(self.folder, "leaf.pem", _leaf(self.ca, key))
        _openssl(
            self.folder,
            "pkcs12",
            "-export",
            "-inkey",
            "key.pem",
            "-in",
            "leaf.pem",
            "-passout",
            "pass:right",
            "-out",
            "bundle.p12",
        )
        arguments: list[str | Path] = [
            "install",
            self.folder / "bundle.p12",
            "--for",
            "sql",
            "--root",
            self.layout.path,
        ]
        self.patch(lifecycle_cli, "_interactive", lambda: True)
        self.patch(getpass, "getpass", lambda prompt: "wrong")
        before = self.layout.cert.read_bytes()
        self.assertEqual(self.out.run(*arguments), 1)
        self.assertIn("passphrase for", self.out.stderr.getvalue())
        self.assertIn("is wrong", self.out.stderr.getvalue())
        self.assertEqual(self.layout.cert.read_bytes(), before)

        self.patch(getpass, "getpass", lambda prompt: "right")
        self.assertEqual(self.out.run(*arguments), 0, self.out.stderr.getvalue())
        self.assertEqual(
            pki.load_certificates(self.layout.cert)[0].public_key(), key.public_key()
        )

    def test_der(self) -> None:
        """A DER certificate from openssl installs for the key already in the root."""
        key = pki.load_private_key(self.layout.key)
        _write(self.folder, "leaf.pem", _leaf(self.ca, key))
        _openssl(
            self.folder,
            "x509",
            "-in",
            "leaf.pem",
            "-outform",
            "DER",
            "-out",
            "leaf.cer",
        )
        old_key = self.layout.key.read_bytes()
        status = self.out.run(
            "install",
            self.folder / "leaf.cer",
            "--for",
            "web",
            "--root",
            self.layout.path,
        )
        self.assertEqual(status, 0, self.out.stderr.getvalue())
        self.assertIn("(DER)", self.out.stdout.getvalue())
        self.assertIn("unchanged", self.out.stdout.getvalue())
        self.assertEqual(self.layout.key.read_bytes(), old_key)
        self.assertEqual(
            [b.name.split(".bak-")[0] for b in self.layout.path.glob("*.bak-*")],
            ["cert.pem"],
        )

    def test_sha1_refused(self) -> None:
        """A leaf openssl signed with SHA-1 is refused, saying to ask for SHA-256."""
        self._keypair_and_request()
        self._openssl_issue("-sha1")
        status = self.out.run(
            "install",
            self.folder / "cert.pem",
            "--key",
            self.folder / "key.pem",
            "--for",
            "web",
            "--root",
            self.layout.path,
        )
        self.assertEqual(status, 1)
        self.assertIn("signed with SHA1", self.out.stderr.getvalue())
        self.assertIn("SHA-256", self.out.stderr.getvalue())

    def test_md5_refused(self) -> None:
        """A self-signed RSA certificate openssl signed with MD5 is refused."""
        _openssl(
            self.folder,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "md5-key.pem",
            "-out",
            "md5.pem",
            "-subj",
            "/CN=localhost",
            "-md5",
            "-days",
            "30",
        )
        status = self.out.run(
            "install",
            self.folder / "md5.pem",
            "--key",
            self.folder / "md5-key.pem",
            "--for",
            "web",
            "--root",
            self.layout.path,
        )
        self.assertEqual(status, 1)
        message = self.out.stderr.getvalue()
        self.assertIn("md5.pem is signed with MD5", message)
        self.assertIn("ask the CA for one signed with SHA-256", message)

    def test_legacy_pkcs12(self) -> None:
        """A PKCS#12 file in openssl's legacy RC2 encryption installs too."""
        key = pki.generate_private_key()
        _write_key(self.folder, "key.pem", key)
        _write(self.folder, "leaf.pem", _leaf(self.ca, key))
        result = subprocess.run(
            [
                "openssl",
                "pkcs12",
                "-export",
                "-legacy",
                "-inkey",
                "key.pem",
                "-in",
                "leaf.pem",
                "-passout",
                "pass:old",
                "-out",
                "legacy.p12",
            ],
            cwd=self.folder,
            capture_output=True,
        )
        if result.returncode != 0:
            raise unittest.SkipTest("this openssl cannot write legacy PKCS#12")
        installable = lifecycle.load_for_install(
            self.folder / "legacy.p12", passphrase=lambda what: b"old"
        )
        lifecycle.install_identity(self.layout, "web", installable)
        self.assertEqual(
            pki.load_private_key(self.layout.key).public_key(), key.public_key()
        )

    def test_sha1_root_at_chain_end(self) -> None:
        """A SHA-1 root ending the chain is refused, saying to leave it out."""
        _openssl(
            self.folder,
            "req",
            "-x509",
            "-new",
            "-key",
            "ca-key.pem",
            "-subj",
            "/CN=openssl test CA",
            "-sha1",
            "-days",
            "30",
            "-out",
            "sha1-ca.pem",
        )
        key = pki.generate_private_key()
        leaf = _write(self.folder, "leaf.pem", _leaf(self.ca, key))
        installable = lifecycle.load_for_install(
            leaf,
            key=_write_key(self.folder, "key.pem", key),
            chain=self.folder / "sha1-ca.pem",
        )
        e = self.assertRaises(
            lifecycle.CertificateRefusedError, lifecycle.check_installable, installable
        )
        self.assertIn("leave this root out of the chain", str(e))


class FormatTests(unittest.TestCase):
    """
    `lifecycle.load_for_install` reads PEM with any line endings, DER and
    PKCS#12, and says what it could not read.
    """

    def setUp(self) -> None:
        self.folder = _temp()
        self.ca = _ca("format CA")
        self.key = pki.generate_private_key()
        self.leaf = _leaf(self.ca, self.key)
        self.lf = self.leaf.public_bytes(
            serialization.Encoding.PEM
        ) + pki.private_key_pem(self.key)

    def test_crlf(self) -> None:
        """A PEM file with CRLF endings reads without a note, key included."""
        path = self.folder / "crlf.pem"
        path.write_bytes(self.lf.replace(b"\n", b"\r\n"))
        installable = lifecycle.load_for_install(path)
        self.assertEqual(installable.certificate, self.leaf)
        self.assertEqual(installable.key_source, path)
        self.assertEqual(installable.notes, ())
        self.assertEqual(installable.source_format, "PEM")

    def test_cr_only_through_install(self) -> None:
        """A CR-only certificate installs, with a note naming the file."""
        layout = support.make_root()
        key = pki.load_private_key(layout.key)
        path = self.folder / "cr.pem"
        path.write_bytes(
            _leaf(self.ca, key)
            .public_bytes(serialization.Encoding.PEM)
            .replace(b"\n", b"\r")
        )
        out = _Output(self)
        status = out.run("install", path, "--for", "web", "--root", layout.path)
        self.assertEqual(status, 0, out.stderr.getvalue())
        self.assertIn(f"note: {path} has CR-only line endings", out.stderr.getvalue())
        self.assertNotIn(b"\r", layout.cert.read_bytes())

    def test_der_library(self) -> None:
        """A DER certificate reads as one certificate without a chain."""
        path = self.folder / "leaf.der"
        path.write_bytes(self.leaf.public_bytes(serialization.Encoding.DER))
        installable = lifecycle.load_for_install(path)
        self.assertEqual(
            (installable.certificate, installable.chain, installable.source_format),
            (self.leaf, (), "DER"),
        )

    def test_pkcs12_without_passphrase(self) -> None:
        """A PKCS#12 file without a passphrase, named .bin, is recognised and read."""
        from cryptography.hazmat.primitives.serialization import pkcs12

        path = self.folder / "bundle.bin"
        path.write_bytes(
            pkcs12.serialize_key_and_certificates(
                None,
                self.key,
                self.leaf,
                [self.ca.certificate],
                serialization.NoEncryption(),
            )
        )
        installable = lifecycle.load_for_install(path)
        self.assertEqual(installable.source_format, "PKCS#12")
        self.assertEqual(installable.chain, (self.ca.certificate,))
        assert installable.key is not None
        self.assertEqual(installable.key.public_key(), self.key.public_key())

    def test_key_given_twice(self) -> None:
        """--key beside a certificate file that holds a key is refused."""
        path = self.folder / "both.pem"
        path.write_bytes(self.lf)
        e = self.assertRaises(
            ConfigurationError,
            lifecycle.load_for_install,
            path,
            key=_write_key(self.folder, "key.pem", self.key),
        )
        self.assertIn("leave out --key", str(e))

    def test_unreadable(self) -> None:
        """A file that is no certificate, or PKCS#7, is refused with a hint."""
        junk = self.folder / "junk.crt"
        junk.write_bytes(b"\x01\x02 not a certificate")
        e = self.assertRaises(PEMError, lifecycle.load_for_install, junk)
        self.assertIn(f"{junk} is neither a PEM nor a DER certificate", str(e))
        bundle = self.folder / "bundle.p7b"
        bundle.write_bytes(b"-----BEGIN PKCS7-----\nMAA=\n-----END PKCS7-----\n")
        e = self.assertRaises(PEMError, lifecycle.load_for_install, bundle)
        self.assertIn("openssl pkcs7", str(e))
        e = self.assertRaises(
            PEMError, lifecycle.load_for_install, self.folder / "absent.pem"
        )
        self.assertIn("absent.pem", str(e))

    def test_duplicates_dropped(self) -> None:
        """A certificate given in both the certificate file and --chain is kept once."""
        full = _write(self.folder, "full.pem", self.leaf, self.ca.certificate)
        chain = _write(self.folder, "chain.pem", self.ca.certificate)
        installable = lifecycle.load_for_install(full, chain=chain)
        self.assertEqual(installable.chain, (self.ca.certificate,))
        self.assertEqual(len(installable.notes), 1)
        self.assertIn("given twice", installable.notes[0])


class CheckTests(unittest.TestCase):
    """
    `lifecycle.check_installable` refuses what a TLS client would refuse,
    and ``tls4d install`` then leaves the root as it was.
    """

    def setUp(self) -> None:
        self.folder = _temp()
        self.root_ca = _ca("check root CA")
        self.intermediate = _ca("check intermediate CA", self.root_ca)
        self.key = pki.generate_private_key()
        self.key_path = _write_key(self.folder, "key.pem", self.key)

    def _installable(
        self,
        leaf: x509.Certificate,
        chain: Sequence[x509.Certificate] = (),
        key: pki.PrivateKey | None = None,
    ) -> lifecycle.Installable:
        return lifecycle.Installable(
            certificate=leaf,
            certificate_source=Path("cert.pem"),
            source_format="PEM",
            chain=tuple(chain),
            key=key or self.key,
            key_source=Path("key.pem"),
        )

    def _refused(self, installable: lifecycle.Installable) -> str:
        e = self.assertRaises(
            lifecycle.CertificateRefusedError,
            lifecycle.check_installable,
            installable,
        )
        return str(e)

    def test_good_chain(self) -> None:
        """A leaf, its intermediate and the root in order pass, noting the root."""
        leaf = _leaf(self.intermediate, self.key)
        warnings = lifecycle.check_installable(
            self._installable(
                leaf, [self.intermediate.certificate, self.root_ca.certificate]
            )
        )
        self.assertEqual(len(warnings), 1)
        self.assertIn("clients have it already", warnings[0])
        self.assertEqual(
            lifecycle.check_installable(
                self._installable(leaf, [self.intermediate.certificate])
            ),
            [],
        )

    def test_key_mismatch(self) -> None:
        """A certificate for another key is refused, naming both files and the fix."""
        leaf = _leaf(self.intermediate, pki.generate_private_key())
        message = self._refused(
            self._installable(leaf, [self.intermediate.certificate])
        )
        self.assertEqual(
            message,
            "cert.pem does not match key.pem (public keys differ); install the "
            "certificate issued for this key, or give the key it was issued for "
            "with --key.",
        )

    def test_expired_and_not_yet_valid(self) -> None:
        """An expired or not yet valid certificate is refused with its date."""
        now = pki.utc_now()
        expired = _leaf(
            self.root_ca, self.key, not_before=now - 100 * _DAY, not_after=now - _DAY
        )
        message = self._refused(self._installable(expired))
        self.assertIn("cert.pem expired on", message)
        self.assertIn("renew", message)
        future = _leaf(
            self.root_ca, self.key, not_before=now + 2 * _DAY, not_after=now + 50 * _DAY
        )
        message = self._refused(self._installable(future))
        self.assertIn("cert.pem is not valid before", message)
        self.assertIn("clock", message)

    def test_expired_chain_certificate(self) -> None:
        """An expired intermediate is refused, naming it."""
        leaf = _leaf(self.intermediate, self.key)
        later = pki.utc_now() + 400 * _DAY
        e = self.assertRaises(
            lifecycle.CertificateRefusedError,
            lifecycle.check_installable,
            self._installable(leaf, [self.intermediate.certificate]),
            now=later,
        )
        self.assertIn(
            "chain certificate 1 ('CN=check intermediate CA') expired", str(e)
        )

    def test_client_only_purpose(self) -> None:
        """A certificate whose extended key usage lacks serverAuth is refused."""
        leaf = _leaf(self.root_ca, self.key, purposes=[ExtendedKeyUsageOID.CLIENT_AUTH])
        message = self._refused(self._installable(leaf))
        self.assertIn("allows clientAuth but not serverAuth", message)
        self.assertIn("TLS server certificate", message)

    def test_no_purpose_extension(self) -> None:
        """A certificate without extended key usage may serve TLS."""
        leaf = _leaf(self.root_ca, self.key, purposes=None)
        lifecycle.check_installable(self._installable(leaf))

    def test_wrong_order(self) -> None:
        """A chain with the root before the intermediate is refused as out of order."""
        leaf = _leaf(self.intermediate, self.key)
        message = self._refused(
            self._installable(
                leaf, [self.root_ca.certificate, self.intermediate.certificate]
            )
        )
        self.assertIn("wrong order", message)
        self.assertIn("chain certificate 2", message)
        self.assertIn("leaf first", message)

    def test_gap(self) -> None:
        """A chain that skips the intermediate is refused as having a gap."""
        leaf = _leaf(self.intermediate, self.key)
        message = self._refused(self._installable(leaf, [self.root_ca.certificate]))
        self.assertIn("gap", message)
        self.assertIn("CN=check intermediate CA", message)
        self.assertIn("missing intermediate", message)

    def test_same_name_other_key(self) -> None:
        """An intermediate with the right name but another key is refused."""
        leaf = _leaf(self.intermediate, self.key)
        impostor = _ca("check intermediate CA", self.root_ca)
        message = self._refused(self._installable(leaf, [impostor.certificate]))
        self.assertIn("does not verify", message)

    def test_small_rsa_key(self) -> None:
        """A 1024-bit RSA key is refused, saying to make a new key."""
        weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        leaf = _leaf(self.root_ca, weak)
        message = self._refused(self._installable(leaf, key=weak))
        self.assertIn("RSA key of 1024 bits", message)
        self.assertIn("tls4d keypair", message)

    def test_every_problem_listed(self) -> None:
        """Several problems are listed together, numbered."""
        now = pki.utc_now()
        leaf = _leaf(
            self.root_ca,
            pki.generate_private_key(),
            purposes=[ExtendedKeyUsageOID.CODE_SIGNING],
            not_before=now - 10 * _DAY,
            not_after=now - _DAY,
        )
        e = self.assertRaises(
            lifecycle.CertificateRefusedError,
            lifecycle.check_installable,
            self._installable(leaf),
        )
        self.assertEqual(len(e.problems), 3)
        self.assertTrue(str(e).startswith("cert.pem is refused for 3 reasons: (1) "))

    def test_warnings(self) -> None:
        """A leaf without names, near expiry and without chain passes with warnings."""
        now = pki.utc_now()
        leaf = (
            x509.CertificateBuilder()
            .subject_name(_name("localhost"))
            .issuer_name(self.root_ca.certificate.subject)
            .public_key(self.key.public_key())
            .serial_number(7)
            .not_valid_before(now - _DAY)
            .not_valid_after(now + 5 * _DAY)
            .sign(self.root_ca.key, hashes.SHA256())
        )
        warnings = " ".join(lifecycle.check_installable(self._installable(leaf)))
        self.assertIn("no subject alternative names", warnings)
        self.assertIn("expires in 4 days", warnings)
        self.assertIn("without a chain", warnings)

    def test_refusal_leaves_root(self) -> None:
        """A refused install exits 1 with one line and changes no file of the root."""
        layout = support.make_root()
        before = {p: p.read_bytes() for p in layout.path.rglob("*.pem")}
        now = pki.utc_now()
        expired = _leaf(
            self.root_ca, self.key, not_before=now - 10 * _DAY, not_after=now - _DAY
        )
        path = _write(self.folder, "expired.pem", expired)
        out = _Output(self)
        status = out.run(
            "install",
            path,
            "--key",
            self.key_path,
            "--for",
            "web",
            "--root",
            layout.path,
        )
        self.assertEqual(status, 1)
        self.assertEqual(len(out.stderr.getvalue().splitlines()), 1)
        self.assertTrue(out.stderr.getvalue().startswith(f"tls4d: {path} expired on"))
        self.assertEqual(
            {p: p.read_bytes() for p in layout.path.rglob("*.pem")}, before
        )
        self.assertEqual(list(layout.path.glob("*.bak-*")), [])


class InstallTests(unittest.TestCase):
    """
    `lifecycle.install_identity` writes where each server reads, keeps the
    previous files, and needs a key it can check.
    """

    def setUp(self) -> None:
        self.layout = support.make_root()
        self.folder = _temp()
        self.ca = _ca("install CA")

    def _for_root_key(self, target: str = "web") -> lifecycle.Installable:
        key_path = self.layout.app_key if target == "app" else self.layout.key
        leaf = _leaf(self.ca, pki.load_private_key(key_path))
        return lifecycle.load_for_install(_write(self.folder, "cert.pem", leaf))

    def test_targets(self) -> None:
        """web and sql write the root's cert.pem, app the Resources one."""
        for target, cert_path in [
            ("web", self.layout.cert),
            ("sql", self.layout.cert),
            ("app", self.layout.app_cert),
        ]:
            result = lifecycle.install_identity(
                self.layout, target, self._for_root_key(target)
            )
            self.assertEqual(result.cert, cert_path)
            self.assertFalse(result.key_written)
            self.assertEqual(pki.load_certificates(cert_path)[0], result.certificate)
        self.assertEqual(result.servers, "application server")
        self.assertRaises(
            ConfigurationError,
            lifecycle.install_identity,
            self.layout,
            "ftp",
            self._for_root_key(),
        )

    def test_backups_same_second(self) -> None:
        """Two installs in the same second keep both previous files, named apart."""
        now = pki.utc_now()
        first = lifecycle.install_identity(
            self.layout, "web", self._for_root_key(), now=now
        )
        second = lifecycle.install_identity(
            self.layout, "web", self._for_root_key(), now=now
        )
        stamp = now.strftime("%Y%m%dT%H%M%SZ")
        self.assertEqual(first.backups[0].name, f"cert.pem.bak-{stamp}")
        self.assertEqual(second.backups[0].name, f"cert.pem.bak-{stamp}-2")
        self.assertEqual(pki.load_certificates(second.backups[0])[0], first.certificate)

    def test_new_key_backed_up(self) -> None:
        """A new key replaces the old one, which is kept with mode 0600."""
        old_key = self.layout.app_key.read_bytes()
        key = lifecycle.generate_keypair("rsa")
        installable = lifecycle.load_for_install(
            _write(self.folder, "cert.pem", _leaf(self.ca, key)),
            key=_write_key(self.folder, "key.pem", key),
        )
        result = lifecycle.install_identity(self.layout, "app", installable)
        self.assertTrue(result.key_written)
        key_backup = [b for b in result.backups if b.name.startswith("key.pem")][0]
        self.assertEqual(key_backup.parent, self.layout.resources)
        self.assertEqual(key_backup.read_bytes(), old_key)
        self.assertEqual(stat.S_IMODE(key_backup.stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(self.layout.app_key.stat().st_mode), 0o600)

    def test_encrypted_key_stored_decrypted(self) -> None:
        """An encrypted key is installed decrypted, mode 0600, for the server."""
        key = pki.generate_private_key()
        encrypted = self.folder / "key.pem"
        encrypted.write_bytes(pki.private_key_pem(key, b"pw"))
        installable = lifecycle.load_for_install(
            _write(self.folder, "cert.pem", _leaf(self.ca, key)),
            key=encrypted,
            passphrase=lambda what: b"pw",
        )
        lifecycle.install_identity(self.layout, "web", installable)
        self.assertEqual(
            pki.load_private_key(self.layout.key).public_key(), key.public_key()
        )
        self.assertEqual(stat.S_IMODE(self.layout.key.stat().st_mode), 0o600)

    def test_root_key_must_match(self) -> None:
        """Without --key, a certificate for another key is refused; nothing changes."""
        before = self.layout.cert.read_bytes()
        leaf = _leaf(self.ca, pki.generate_private_key())
        installable = lifecycle.load_for_install(_write(self.folder, "cert.pem", leaf))
        e = self.assertRaises(
            lifecycle.CertificateRefusedError,
            lifecycle.install_identity,
            self.layout,
            "web",
            installable,
        )
        self.assertIn(f"does not match {self.layout.key}", str(e))
        self.assertEqual(self.layout.cert.read_bytes(), before)

    def test_no_root(self) -> None:
        """A root folder that does not exist is refused, naming it."""
        missing = root.RootLayout(self.folder / "nowhere")
        e = self.assertRaises(
            ConfigurationError,
            lifecycle.install_identity,
            missing,
            "web",
            self._for_root_key(),
        )
        self.assertIn(f"{missing.path} is not a server root", str(e))
        self.assertFalse(missing.path.exists())

    def test_no_key_anywhere(self) -> None:
        """Without --key and without a key in the root, install says to give --key."""
        self.layout.app_key.unlink()
        leaf = _leaf(self.ca, pki.generate_private_key())
        installable = lifecycle.load_for_install(_write(self.folder, "cert.pem", leaf))
        e = self.assertRaises(
            ConfigurationError,
            lifecycle.install_identity,
            self.layout,
            "app",
            installable,
        )
        self.assertIn("give the key with --key", str(e))
