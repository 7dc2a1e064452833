"""
The TLS audit: sslyze checks the real listeners against Mozilla's
"intermediate" and "modern" profiles, and ``openssl s_client`` checks what
sslyze does not fail on (no TLS compression, no client-initiated
renegotiation).

sslyze 6 pins an older cryptography than tls4d runs on, so it lives in a
virtual environment of its own: the tests use it if it is importable here,
else ``$TLS4D_SSLYZE`` (a command, e.g. ``/path/.venv-sslyze/bin/sslyze``),
else ``.venv-sslyze/bin/sslyze`` in the repository, else ``sslyze`` on the
PATH; without any, they are skipped.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from tests import support
from twisted_tls4d import pki, root, service, settings

REPOSITORY = Path(__file__).resolve().parent.parent

#: Seconds one scan or one s_client run may take.
DEADLINE = 60

#: The lifespan of the certificates the audit serves: under the 90 days of
#: the "modern" profile, whatever the root generates.
AUDIT_CERTIFICATE_DAYS = 60


def sslyze_command() -> list[str] | None:
    """
    Returns:
        The command that runs sslyze, or None if there is none.
    """
    if importlib.util.find_spec("sslyze") is not None:
        return [sys.executable, "-m", "sslyze"]
    configured = os.environ.get("TLS4D_SSLYZE")
    if configured:
        return shlex.split(configured)
    beside = REPOSITORY / ".venv-sslyze" / "bin" / "sslyze"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("sslyze")
    return [found] if found else None


def _run(command: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )


def _short_lived_certificates(layout: root.RootLayout) -> None:
    """Replace the root's server certificates with ones of the audit's lifespan."""
    ca = root.load_local_ca(layout)
    for key_path, cert_path in (
        (layout.key, layout.cert),
        (layout.app_key, layout.app_cert),
    ):
        key = pki.generate_private_key()
        certificate = pki.issue_certificate(
            ca,
            key.public_key(),
            "localhost",
            server_names=["localhost", "127.0.0.1"],
            days=AUDIT_CERTIFICATE_DAYS,
        )
        pki.write_private_key(key_path, key)
        pki.write_certificates(cert_path, [certificate])


class _AuditCase(unittest.TestCase):
    """
    Serves a new root, with short-lived certificates, on loopback.
    """

    def setUp(self) -> None:
        self.layout = support.make_root()
        _short_lived_certificates(self.layout)

    @defer.inlineCallbacks
    def start(self, **values: Any) -> Any:
        values = {
            "interface": "127.0.0.1",
            "https_port": 0,
            "http_port": 0,
            "app_port": 0,
            "sql_port": 0,
            **values,
        }
        top = service.build_service(settings.resolve(values, self.layout.path), reactor)
        top.startService()
        self.addCleanup(top.stopService)
        yield None
        return {
            child.name: child.port.getHost().port  # type: ignore[union-attr]
            for child in top
        }


class MozillaProfileTests(_AuditCase):
    """
    sslyze finds each listener compliant with Mozilla's profiles.
    """

    def setUp(self) -> None:
        self.sslyze = sslyze_command()
        if self.sslyze is None:
            raise unittest.SkipTest(
                "sslyze is not installed; python3 -m venv .venv-sslyze && "
                ".venv-sslyze/bin/pip install 'sslyze>=6,<7'"
            )
        super().setUp()

    @defer.inlineCallbacks
    def scan(self, profile: str, port: int, *arguments: str) -> Any:
        assert self.sslyze is not None
        command = [
            *self.sslyze,
            f"--mozilla_config={profile}",
            "--certinfo_ca_file",
            str(self.layout.ca),
            *arguments,
            f"localhost:{port}",
        ]
        result = yield threads.deferToThread(_run, command)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("OK - Compliant", result.stdout)

    @defer.inlineCallbacks
    def test_https_intermediate(self) -> Any:
        """With its default settings, the HTTPS listener is "intermediate"-compliant."""
        ports = yield self.start(web=True, no_http=True)
        yield self.scan("intermediate", ports["https"])

    @defer.inlineCallbacks
    def test_https_modern(self) -> Any:
        """With --min-tls 1.3, the HTTPS listener is "modern"-compliant."""
        ports = yield self.start(web=True, no_http=True, min_tls="1.3")
        yield self.scan("modern", ports["https"])

    @defer.inlineCallbacks
    def test_application_server_intermediate(self) -> Any:
        """The application server (mutual TLS) is "intermediate"-compliant."""
        ports = yield self.start(app=True)
        client = support.make_client_identity(self.layout)
        yield self.scan(
            "intermediate",
            ports["app"],
            "--cert",
            str(client.cert),
            "--key",
            str(client.key),
        )


class HandshakeTests(_AuditCase):
    """
    No listener compresses TLS records or lets a client renegotiate.
    """

    def setUp(self) -> None:
        if shutil.which("openssl") is None:
            raise unittest.SkipTest("openssl is not installed")
        super().setUp()

    @defer.inlineCallbacks
    def test_no_compression_no_renegotiation(self) -> Any:
        """openssl s_client sees no compression, and its renegotiation is refused."""
        ports = yield self.start(web=True, app=True, sql=True, no_http=True)
        client = support.make_client_identity(self.layout)
        identity = ["-cert", str(client.cert), "-key", str(client.key)]
        for name, extra in (("https", []), ("app", identity), ("sql", identity)):
            command = [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{ports[name]}",
                "-servername",
                "localhost",
                "-tls1_2",
                "-CAfile",
                str(self.layout.ca),
                *extra,
            ]
            # "R" on a line of its own asks s_client to renegotiate.
            result = yield threads.deferToThread(_run, command, "R\n")
            output = result.stdout + result.stderr
            self.assertIn("Compression: NONE", output, name)
            self.assertIn("RENEGOTIATING", output, name)
            self.assertIn("no renegotiation", output, name)
