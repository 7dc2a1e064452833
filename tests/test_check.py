"""
Tests for ``tls4d check``: what it reports about a root, which findings are
errors and which warnings, its JSON layout, and its exit status.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
from pathlib import Path

from cryptography import x509
from twisted.trial import unittest

from tests import support
from twisted_tls4d import check, cli, dhparams, pki, revocation, root


def _run(*argv: str) -> tuple[int, str]:
    """Run ``tls4d check`` through the command line; return status and output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = cli.main(["check", *argv])
    return status, out.getvalue()


def _messages(report: check.CheckReport, severity: str) -> str:
    return "\n".join(p.message for p in report.problems if p.severity == severity)


class _RootTestCase(unittest.TestCase):
    """A fresh root for each test, and a way to check it."""

    def setUp(self) -> None:
        self.layout = support.make_root()

    def check(self, **kw: object) -> check.CheckReport:
        kw.setdefault("trust_store", [])
        return check.check_root(self.layout, **kw)  # type: ignore[arg-type]

    def install_server(
        self, certificates: list[x509.Certificate], key: pki.PrivateKey
    ) -> None:
        """Make ``certificates`` and ``key`` the web and SQL servers' pair."""
        pki.write_certificates(self.layout.cert, certificates)
        pki.write_private_key(self.layout.key, key)


class CleanRootTests(_RootTestCase):
    """
    A freshly bootstrapped root is reported in full and found sound.
    """

    def test_sound(self) -> None:
        """A new root has no errors and no warnings."""
        report = self.check()
        self.assertEqual(report.problems, ())
        self.assertTrue(report.ok)

    def test_servers(self) -> None:
        """Each pair's names, key, chain, match and key mode are reported."""
        report = self.check()
        self.assertEqual(
            [s.used_by for s in report.servers],
            ["web and SQL servers", "application server"],
        )
        ca_subject = pki.load_certificates(self.layout.ca)[0].subject
        for server in report.servers:
            self.assertEqual(server.subject, "CN=localhost")
            self.assertEqual(
                server.names, ("localhost", "127.0.0.1", "::1", "testhost")
            )
            self.assertEqual(server.issuer, ca_subject.rfc4514_string())
            self.assertEqual(
                (server.key_type, server.key_size, server.key_curve),
                ("ECDSA", 256, "P-256"),
            )
            self.assertTrue(server.key_matches)
            self.assertEqual(server.key_mode, "0600")
            assert server.days_left is not None
            self.assertGreater(server.days_left, check.EXPIRY_WARNING_DAYS)
            self.assertEqual(
                server.chain,
                check.ChainReport(1, True, True, "ca.pem", ca_subject.rfc4514_string()),
            )

    def test_policy_and_dh(self) -> None:
        """The default policy's suites are all forward-secret; DH is ffdhe2048."""
        report = self.check()
        self.assertEqual(report.tls.min_version, "1.2")
        self.assertIsNone(report.tls.settings_file)
        versions = [s.version for s in report.tls.suites]
        self.assertEqual((versions.count("1.3"), versions.count("1.2")), (3, 9))
        self.assertTrue(all(s.forward_secret for s in report.tls.suites))
        self.assertEqual(
            report.dh_parameters,
            check.DHReport(str(self.layout.dhparams), True, 2048, 2, "ffdhe2048"),
        )
        self.assertEqual((report.ca.key_present, report.ca.key_mode), (True, "0600"))
        self.assertFalse(report.crl.present)

    def test_json(self) -> None:
        """--json prints the documented object and exits 0."""
        status, out = _run("--root", str(self.layout.path), "--json")
        self.assertEqual(status, 0)
        document = json.loads(out)
        self.assertEqual(
            list(document),
            [
                "format",
                "ok",
                "errors",
                "warnings",
                "root",
                "checked_at",
                "servers",
                "ca",
                "crl",
                "tls",
                "dh_parameters",
                "problems",
            ],
        )
        self.assertEqual(document["format"], 1)
        self.assertIs(document["ok"], True)
        self.assertEqual(
            sorted(document["servers"][0]),
            sorted(
                [
                    "used_by",
                    "certificate",
                    "key",
                    "subject",
                    "names",
                    "issuer",
                    "serial",
                    "not_before",
                    "not_after",
                    "days_left",
                    "key_type",
                    "key_size",
                    "key_curve",
                    "key_matches",
                    "key_mode",
                    "chain",
                ]
            ),
        )
        self.assertEqual(document["servers"][0]["chain"]["anchor"], "ca.pem")
        self.assertEqual(
            document["tls"]["suites"][0],
            {
                "name": "TLS_AES_128_GCM_SHA256",
                "version": "1.3",
                "forward_secret": True,
            },
        )
        self.assertEqual(document["dh_parameters"]["group"], "ffdhe2048")
        self.assertTrue(document["checked_at"].endswith("Z"))

    def test_text(self) -> None:
        """The text report has each section and a final verdict."""
        status, out = _run("--root", str(self.layout.path))
        self.assertEqual(status, 0)
        for words in (
            "web and SQL servers: ",
            "application server: ",
            "matches the certificate",
            "complete up to a CA in Resources/ca.pem",
            "TLS 1.2  ECDHE-ECDSA-AES128-GCM-SHA256",
            "RFC 7919 ffdhe2048",
            "OK: 0 error(s), 0 warning(s).",
        ):
            self.assertIn(words, out)

    def test_missing_root(self) -> None:
        """A root that does not exist exits 1 with one line naming it."""
        missing = support.temporary_folder("tls4d-check-") / "nowhere"
        status, out = _run("--root", str(missing))
        self.assertEqual(status, 1)
        self.assertIn(str(missing), out)
        self.assertEqual(len(out.splitlines()), 1)


class CertificateProblemTests(_RootTestCase):
    """
    Certificates that would fail clients or the start are errors; those worth
    a look are warnings.
    """

    def test_expired(self) -> None:
        """A certificate past its end is an error, and the command exits 1."""
        leaf = pki.load_certificates(self.layout.cert)[0]
        later = leaf.not_valid_after_utc + datetime.timedelta(days=1)
        report = self.check(now=later)
        self.assertFalse(report.ok)
        self.assertIn(f"{self.layout.cert} expired on", _messages(report, "error"))
        self.assertLess(report.servers[0].days_left or 0, 0)

    def test_expiring_soon(self) -> None:
        """A certificate ending within 30 days is a warning, not an error."""
        leaf = pki.load_certificates(self.layout.cert)[0]
        soon = leaf.not_valid_after_utc - datetime.timedelta(days=10)
        report = self.check(now=soon)
        self.assertTrue(report.ok)
        self.assertIn("expires in 10 days", _messages(report, "warning"))

    def test_mismatch(self) -> None:
        """A key that is not the certificate's is an error naming both files."""
        pki.write_private_key(self.layout.key, pki.generate_private_key())
        report = self.check()
        self.assertFalse(report.ok)
        self.assertIs(report.servers[0].key_matches, False)
        errors = _messages(report, "error")
        self.assertIn(f"{self.layout.cert} does not match {self.layout.key}", errors)
        status, _ = _run("--root", str(self.layout.path))
        self.assertEqual(status, 1)

    def test_out_of_order(self) -> None:
        """A chain with the CA before the leaf is an error."""
        leaf = pki.load_certificates(self.layout.cert)[0]
        ca = pki.load_certificates(self.layout.ca)[0]
        pki.write_certificates(self.layout.cert, [ca, leaf])
        report = self.check()
        chain = report.servers[0].chain
        assert chain is not None
        self.assertFalse(chain.in_order)
        self.assertFalse(chain.complete)
        self.assertIn("not in order", _messages(report, "error"))

    def test_incomplete(self) -> None:
        """A chain ending at a CA found nowhere is warned about; the store finds it."""
        other = root.load_local_ca(support.make_root("elsewhere"))
        key = pki.generate_private_key()
        leaf = pki.issue_certificate(
            other, key.public_key(), "localhost", server_names=["localhost"]
        )
        self.install_server([leaf], key)
        report = self.check()
        self.assertIn("neither in", _messages(report, "warning"))
        self.assertIn("private root CA", _messages(report, "warning"))
        self.assertEqual(report.servers[0].chain.anchor, None)  # type: ignore[union-attr]
        trusted = self.check(trust_store=[other.certificate])
        self.assertTrue(trusted.ok)
        self.assertEqual(trusted.servers[0].chain.anchor, "system")  # type: ignore[union-attr]

    def test_self_signed(self) -> None:
        """A self-signed certificate is a warning, its chain self-issued."""
        own = pki.create_local_ca("self")
        self.install_server([own.certificate], own.key)
        report = self.check()
        self.assertTrue(report.ok)
        self.assertEqual(report.servers[0].chain.anchor, "self-issued")  # type: ignore[union-attr]
        warnings = _messages(report, "warning")
        self.assertIn("self-signed", warnings)
        self.assertIn("names no host", warnings)

    def test_damaged_and_half_missing(self) -> None:
        """A damaged certificate and a key without its certificate are errors."""
        self.layout.cert.write_bytes(b"junk\n")
        self.layout.app_cert.unlink()
        report = self.check()
        errors = _messages(report, "error")
        self.assertIn(f"{self.layout.cert} holds no PEM certificate", errors)
        self.assertIn(
            f"{self.layout.app_key} exists but {self.layout.app_cert} does not", errors
        )

    def test_both_missing(self) -> None:
        """A pair that is wholly missing is a warning: the next start makes it."""
        self.layout.app_cert.unlink()
        self.layout.app_key.unlink()
        report = self.check()
        self.assertTrue(report.ok)
        self.assertIn("generates them", _messages(report, "warning"))


class KeyModeTests(_RootTestCase):
    """
    A key every user may read is an error; one its group may read a warning.
    """

    def test_world_readable(self) -> None:
        """Mode 0644 on a server key or the CA key is an error with the chmod."""
        self.layout.app_key.chmod(0o644)
        self.layout.ca_key.chmod(0o604)
        report = self.check()
        self.assertEqual(report.servers[1].key_mode, "0644")
        self.assertEqual(report.ca.key_mode, "0604")
        errors = _messages(report, "error")
        self.assertIn(f"chmod 600 {self.layout.app_key}", errors)
        self.assertIn(f"chmod 600 {self.layout.ca_key}", errors)

    def test_group_readable(self) -> None:
        """Mode 0640 is a warning, and --strict makes it fail the command."""
        self.layout.key.chmod(0o640)
        report = self.check()
        self.assertTrue(report.ok)
        self.assertIn("its group has access", _messages(report, "warning"))
        self.assertEqual(_run("--root", str(self.layout.path), "--strict")[0], 1)

    def test_ca_key_offline(self) -> None:
        """A root without the CA's key (kept offline) is no problem."""
        self.layout.ca_key.unlink()
        report = self.check()
        self.assertEqual(report.problems, ())
        self.assertFalse(report.ca.key_present)


class PolicyTests(_RootTestCase):
    """
    The policy comes from the settings file; what it allows is listed, and
    what is unsafe or unusable is said.
    """

    def settings(self, text: str) -> None:
        self.layout.settings_file.parent.mkdir(exist_ok=True)
        self.layout.settings_file.write_text(text)

    def test_weak_suite(self) -> None:
        """A suite without forward secrecy is listed as such, with a warning."""
        self.settings('ciphers = "ECDHE-ECDSA-AES128-GCM-SHA256:AES128-GCM-SHA256"\n')
        report = self.check()
        self.assertEqual(report.tls.settings_file, str(self.layout.settings_file))
        weak = [s for s in report.tls.suites if not s.forward_secret]
        self.assertEqual([s.name for s in weak], ["AES128-GCM-SHA256"])
        self.assertIn("AES128-GCM-SHA256", _messages(report, "warning"))
        self.assertTrue(report.ok)

    def test_tls13_only(self) -> None:
        """With min-tls 1.3, only the three TLS 1.3 suites are allowed."""
        self.settings('min-tls = "1.3"\n')
        report = self.check()
        self.assertEqual(report.tls.min_version, "1.3")
        self.assertEqual({s.version for s in report.tls.suites}, {"1.3"})
        self.assertEqual(len(report.tls.suites), 3)

    def test_unusable(self) -> None:
        """A file that is not TOML, or ciphers that select nothing, are errors."""
        self.settings("this is not toml\n")
        self.assertIn("not valid TOML", _messages(self.check(), "error"))
        self.settings('ciphers = "NOSUCHCIPHER"\n')
        self.assertIn("selects no TLS 1.2", _messages(self.check(), "error"))

    def test_no_suite_for_key(self) -> None:
        """RSA-only suites with the ECDSA keys are a warning that TLS 1.2 fails."""
        self.settings('ciphers = "ECDHE-RSA-AES128-GCM-SHA256"\n')
        self.assertIn("TLS 1.2 clients will fail", _messages(self.check(), "warning"))


class DHAndCRLTests(_RootTestCase):
    """
    The DH parameters and the revocation list are identified and checked.
    """

    def test_dh(self) -> None:
        """A standard group is named; junk, or fewer than 2048 bits, is an error."""
        dhparams.install(self.layout.dhparams, dhparams.FFDHE3072_PEM)
        self.assertEqual(self.check().dh_parameters.group, "ffdhe3072")
        self.layout.dhparams.write_bytes(b"junk\n")
        self.assertIn("no usable DH parameters", _messages(self.check(), "error"))
        pem, _ = dhparams.generate_parameters(512, timeout=60)
        self.layout.dhparams.write_bytes(pem)
        report = self.check()
        self.assertEqual(
            (report.dh_parameters.bits, report.dh_parameters.group), (512, None)
        )
        self.assertIn("weaker than the 2048 bits", _messages(report, "error"))

    def test_dh_missing(self) -> None:
        """A missing dhparams.pem is a warning: the next start writes it."""
        self.layout.dhparams.unlink()
        report = self.check()
        self.assertTrue(report.ok)
        self.assertIn("ffdhe2048", _messages(report, "warning"))

    def test_crl(self) -> None:
        """A revocation list is counted; past its next update it is a warning."""
        alice = support.make_client_identity(self.layout, "alice")
        serial = pki.load_certificates(alice.cert)[0].serial_number
        revocation.revoke(self.layout, [serial])
        report = self.check()
        self.assertEqual((report.crl.present, report.crl.revoked), (True, 1))
        later = pki.utc_now() + datetime.timedelta(days=revocation.CRL_DAYS + 1)
        late = self.check(now=later)
        self.assertIn("tls4d revoke --refresh", _messages(late, "warning"))

    def test_crl_damaged(self) -> None:
        """A damaged revocation list is an error naming it."""
        path: Path = revocation.crl_path(self.layout)
        path.write_bytes(b"junk\n")
        self.assertIn(str(path), _messages(self.check(), "error"))
