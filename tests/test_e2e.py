"""
End-to-end tests: the real ``twistd -n tls4d`` on loopback ports, driven by
curl, ``openssl s_client`` and the project's own ``tls4d`` command.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from twisted.trial import unittest

from tests import support
from twisted_tls4d import identity, pki, revocation, root
from twisted_tls4d.sql import dbapi

REPOSITORY = Path(__file__).resolve().parent.parent

#: How long a server may take to start, or a client to answer, in seconds.
DEADLINE = 30


def _twistd() -> str:
    beside = Path(sys.executable).parent / "twistd"
    found = str(beside) if beside.exists() else shutil.which("twistd")
    if found is None:
        raise unittest.SkipTest("twistd is not installed")
    return found


def _environment() -> dict[str, str]:
    """The environment of the processes run here: this repository first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPOSITORY), *filter(None, [env.get("PYTHONPATH")])]
    )
    return env


class Server:
    """
    A ``twistd -n tls4d`` process on 127.0.0.1 with every port 0, whose log
    is collected as it runs.
    """

    def __init__(self, root: Path, *arguments: str) -> None:
        self.root = root
        command = [
            _twistd(),
            "-n",
            "--pidfile=",
            "tls4d",
            "--root",
            str(root),
            "--interface",
            "127.0.0.1",
            "--https-port",
            "0",
            "--http-port",
            "0",
            "--app-port",
            "0",
            "--sql-port",
            "0",
            *arguments,
        ]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=_environment(),
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, deadline: float = DEADLINE) -> re.Match[str]:
        """
        Returns:
            The first match of ``pattern`` in the log, waiting for it.

        Raises:
            AssertionError: It did not appear in time, or the server ended.
        """
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            found = re.search(pattern, self.log)
            if found:
                return found
            if self.process.poll() is not None:
                self._reader.join(5)
                found = re.search(pattern, self.log)
                if found:
                    return found
                msg = f"twistd ended ({self.process.returncode}):\n{self.log}"
                raise AssertionError(msg)
            time.sleep(0.05)
        msg = f"{pattern!r} not logged within {deadline} s:\n{self.log}"
        raise AssertionError(msg)

    def port(self, label: str) -> int:
        """
        Returns:
            The port the listener ``label`` logged it is listening on.
        """
        found = self.wait_for(re.escape(label) + r" listening on 127\.0\.0\.1:(\d+)")
        return int(found.group(1))

    def stop(self) -> None:
        """Stop the server and wait for it to end."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)


def _run(*command: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        env=_environment(),
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
    )


def _tls4d(*arguments: str) -> subprocess.CompletedProcess[str]:
    return _run(sys.executable, "-m", "twisted_tls4d.cli", *arguments)


def _s_client(port: int, *arguments: str) -> subprocess.CompletedProcess[str]:
    """Connect with ``openssl s_client``, send nothing, and report what happened."""
    return _run(
        "openssl",
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-servername",
        "localhost",
        *arguments,
        input="",
    )


class AllServersTests(unittest.TestCase):
    """
    A twistd runs the three servers of a new root; real clients use them.
    """

    def setUp(self) -> None:
        for tool in ("curl", "openssl"):
            if shutil.which(tool) is None:
                raise unittest.SkipTest(f"{tool} is not installed")
        self.folder = support.temporary_folder("tls4d-e2e-")
        self.server = Server(self.folder / "root", "--web", "--app", "--sql", "--hsts")
        self.addCleanup(self.server.stop)
        for label in (
            "HTTPS web server",
            "HTTP web server",
            "Application server",
            "SQL server",
        ):
            self.server.port(label)
        result = _tls4d(
            "client",
            "alice",
            "--root",
            str(self.root),
            "--out",
            str(self.folder / "alice"),
        )
        self.assertEqual(result.returncode, 0, result.stderr)

    @property
    def root(self) -> Path:
        return self.folder / "root"

    def test_first_start_logged(self) -> None:
        """The first start logs each file it creates and warns of its certificates."""
        for name in (
            "Resources/ca.pem",
            "Resources/ca-key.pem",
            "key.pem",
            "cert.pem",
            "Resources/key.pem",
            "Resources/cert.pem",
            "dhparams.pem",
        ):
            self.assertRegex(
                self.server.log,
                rf"First start: created .+ at {re.escape(str(self.root / name))}\n",
            )
        self.assertIn("install one issued by a public or company CA", self.server.log)
        self.assertNotIn("PRIVATE KEY", self.server.log)

    def test_curl_start_page(self) -> None:
        """curl trusting Resources/ca.pem gets the start page over HTTPS, with HSTS."""
        port = self.server.port("HTTPS web server")
        result = _run(
            "curl",
            "--silent",
            "--show-error",
            "--include",
            "--max-time",
            "10",
            "--cacert",
            str(self.root / "Resources" / "ca.pem"),
            f"https://localhost:{port}/",
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("tls4d is serving this root", result.stdout)
        self.assertIn(
            "strict-transport-security: max-age=63072000", result.stdout.lower()
        )

    def test_http_redirects(self) -> None:
        """Plain HTTP answers 301 to the HTTPS port."""
        result = _run(
            "curl",
            "--silent",
            "--include",
            "--max-time",
            "10",
            f"http://localhost:{self.server.port('HTTP web server')}/page?q=1",
        )
        https = self.server.port("HTTPS web server")
        self.assertIn("301 Moved Permanently", result.stdout)
        self.assertIn(
            f"location: https://localhost:{https}/page?q=1", result.stdout.lower()
        )

    def test_tls_versions(self) -> None:
        """openssl s_client gets TLS 1.2 and 1.3, and is refused with TLS 1.1."""
        port = self.server.port("HTTPS web server")
        ca = str(self.root / "Resources" / "ca.pem")
        for flag, version in (("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")):
            result = _s_client(port, flag, "-CAfile", ca, "-verify_return_error")
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
            self.assertRegex(result.stdout, rf"New, {version}, Cipher is")
            self.assertIn("Verify return code: 0 (ok)", result.stdout)
        old = _s_client(port, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
        self.assertNotEqual(old.returncode, 0)
        self.assertNotIn("New, TLSv1.1", old.stdout)
        self.server.wait_for(
            r"HTTPS web server: TLS handshake with 127\.0\.0\.1:\d+ failed, sent "
            r"alert protocol version: it offered only TLS versions this server refuses"
        )

    def test_no_non_forward_secret_suite(self) -> None:
        """openssl s_client offering only RSA key exchange is refused."""
        port = self.server.port("HTTPS web server")
        result = _s_client(
            port, "-tls1_2", "-cipher", "AES128-GCM-SHA256:AES256-GCM-SHA384"
        )
        self.assertNotEqual(result.returncode, 0)

    def test_app_whoami(self) -> None:
        """The tls4d app command's whoami shows alice's subject and fingerprint."""
        port = self.server.port("Application server")
        identity = self.folder / "alice"
        result = _tls4d(
            "app",
            "--identity",
            str(identity),
            "--host",
            "localhost",
            "--port",
            str(port),
            "whoami",
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        answer = json.loads(result.stdout)
        certificate = pki.load_certificates(identity / "cert.pem")[0]
        self.assertIn("CN=alice", json.dumps(answer))
        self.assertIn(
            pki.fingerprint_sha256(certificate).replace(":", "").lower(),
            json.dumps(answer).replace(":", "").lower(),
        )

    def test_app_ping_and_echo(self) -> None:
        """ping answers pong and echo returns its arguments."""
        port = str(self.server.port("Application server"))
        identity = str(self.folder / "alice")
        ping = _tls4d("app", "--identity", identity, "--port", port, "ping")
        self.assertEqual(ping.returncode, 0, ping.stderr)
        self.assertEqual(json.loads(ping.stdout), "pong")
        echo = _tls4d(
            "app", "--identity", identity, "--port", port, "echo", '{"a": [1, "b"]}'
        )
        self.assertEqual(echo.returncode, 0, echo.stderr)
        self.assertEqual(json.loads(echo.stdout), {"a": [1, "b"]})

    def test_app_refuses_no_certificate(self) -> None:
        """A client without a certificate is refused, and the log says why."""
        port = self.server.port("Application server")
        _s_client(port, "-CAfile", str(self.root / "Resources" / "ca.pem"))
        self.server.wait_for(
            r"application server: refused TLS handshake from 127\.0\.0\.1:\d+: "
            r"the client presented no certificate"
        )

    def test_app_refuses_foreign_certificate(self) -> None:
        """A client certified by another CA is refused, and the log says why."""
        other = support.temporary_folder("tls4d-e2e-other-")
        other_server = Server(other / "root", "--app")
        try:
            other_server.port("Application server")
            made = _tls4d(
                "client",
                "mallory",
                "--root",
                str(other / "root"),
                "--out",
                str(other / "mallory"),
            )
            self.assertEqual(made.returncode, 0, made.stderr)
        finally:
            other_server.stop()
        result = _tls4d(
            "app",
            "--key",
            str(other / "mallory" / "key.pem"),
            "--cert",
            str(other / "mallory" / "cert.pem"),
            "--ca",
            str(self.root / "Resources" / "ca.pem"),
            "--port",
            str(self.server.port("Application server")),
            "ping",
        )
        self.assertEqual(result.returncode, 1)
        self.assertEqual(len(result.stderr.strip().splitlines()), 1, result.stderr)
        self.server.wait_for(
            r"application server: refused TLS handshake from 127\.0\.0\.1:\d+: "
            r"its certificate was issued by a CA that Resources/ca\.pem does not hold"
        )

    def test_revoked_client_refused_after_reload(self) -> None:
        """After tls4d revoke and tls4d reload, the revoked client is refused."""
        port = str(self.server.port("Application server"))
        identity = str(self.folder / "alice")
        before = _tls4d("app", "--identity", identity, "--port", port, "ping")
        self.assertEqual(before.returncode, 0, before.stderr)
        revoked = _tls4d("revoke", "alice", "--root", str(self.root))
        self.assertEqual(revoked.returncode, 0, revoked.stdout + revoked.stderr)
        reloaded = _tls4d("reload", "--root", str(self.root))
        self.assertEqual(reloaded.returncode, 0, reloaded.stderr)
        self.server.wait_for("Reload done")
        after = _tls4d("app", "--identity", identity, "--port", port, "ping")
        self.assertEqual(after.returncode, 1)
        self.server.wait_for(
            r"application server: refused TLS handshake from 127\.0\.0\.1:\d+: "
            r"its certificate has been revoked"
        )

    def test_sql_session(self) -> None:
        """tls4d sql creates a table, inserts, selects, and reports an error."""
        port = str(self.server.port("SQL server"))
        identity = str(self.folder / "alice")

        def sql(*statements: str) -> subprocess.CompletedProcess[str]:
            arguments = []
            for statement in statements:
                arguments += ["--execute", statement]
            return _tls4d("sql", "--identity", identity, "--port", port, *arguments)

        made = sql(
            "CREATE TABLE fruit (id INTEGER PRIMARY KEY, name TEXT)",
            "INSERT INTO fruit (name) VALUES ('apple'), ('pear')",
        )
        self.assertEqual(made.returncode, 0, made.stdout + made.stderr)
        selected = sql("SELECT id, name FROM fruit ORDER BY id")
        self.assertEqual(selected.returncode, 0, selected.stderr)
        self.assertRegex(selected.stdout, r"id\s*\|\s*name")
        self.assertRegex(selected.stdout, r"1\s*\|\s*apple")
        self.assertRegex(selected.stdout, r"2\s*\|\s*pear")
        failed = sql("SELECT x FROM nowhere")
        self.assertEqual(failed.returncode, 1)
        self.assertIn("no such table: nowhere", failed.stdout + failed.stderr)
        self.assertTrue((self.root / "Data" / "tls4d.sqlite").exists())

    def test_sql_refuses_no_certificate(self) -> None:
        """The SQL server refuses a client without a certificate and logs why."""
        port = self.server.port("SQL server")
        _s_client(port, "-CAfile", str(self.root / "Resources" / "ca.pem"))
        self.server.wait_for(
            r"SQL server: refused TLS handshake from 127\.0\.0\.1:\d+: "
            r"the client presented no certificate"
        )


class StartTests(unittest.TestCase):
    """
    Starting and restarting twistd on a root.
    """

    def setUp(self) -> None:
        self.folder = support.temporary_folder("tls4d-e2e-start-")
        self.root = self.folder / "root"

    def start(self, *arguments: str) -> Server:
        server = Server(self.root, *arguments)
        self.addCleanup(server.stop)
        return server

    def test_second_start_regenerates_nothing(self) -> None:
        """A second start creates nothing and leaves every key and certificate as is."""
        first = self.start("--web")
        first.port("HTTPS web server")
        first.stop()
        files = [
            "key.pem",
            "cert.pem",
            "dhparams.pem",
            "Resources/ca.pem",
            "Resources/ca-key.pem",
            "Resources/key.pem",
            "Resources/cert.pem",
        ]
        before = {name: (self.root / name).read_bytes() for name in files}
        second = self.start("--web")
        second.port("HTTPS web server")
        self.assertNotIn("First start", second.log)
        self.assertEqual(
            {name: (self.root / name).read_bytes() for name in files}, before
        )

    def test_one_server_only(self) -> None:
        """--sql starts the SQL server and no other listener."""
        server = self.start("--sql")
        server.port("SQL server")
        server.wait_for(r"Main loop|starting up")
        self.assertNotIn("web server listening", server.log)
        self.assertNotIn("Application server listening", server.log)

    def test_mismatched_key_stops_start(self) -> None:
        """A certificate not matching its key stops the start with one clear line."""
        first = self.start("--web")
        first.port("HTTPS web server")
        first.stop()
        shutil.copy(self.root / "Resources" / "key.pem", self.root / "key.pem")
        result = _run(_twistd(), "-n", "--pidfile=", "tls4d", "--root", str(self.root))
        self.assertEqual(result.returncode, 1)
        self.assertIn(
            f"{self.root / 'cert.pem'} does not match {self.root / 'key.pem'}",
            result.stdout + result.stderr,
        )
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    def test_exposed_keys(self) -> None:
        """
        Key files open to others are named at start with the chmod that fixes
        them; with --strict the start is refused with one line naming them.
        """
        first = self.start("--web", "--no-http")
        first.port("HTTPS web server")
        first.stop()
        exposed = [self.root / "key.pem", self.root / "Resources" / "ca-key.pem"]
        exposed[0].chmod(0o644)
        exposed[1].chmod(0o640)
        warned = self.start("--web", "--no-http")
        warned.port("HTTPS web server")
        for path, who in zip(
            exposed, ("every user of this machine", "its group"), strict=True
        ):
            warned.wait_for(
                rf"{re.escape(str(path))} holds a private key and has mode 06[04][04]"
                rf": {who} has access to it; run chmod 600 {re.escape(str(path))}"
            )
        warned.stop()

        result = _run(
            _twistd(),
            "-n",
            "--pidfile=",
            "tls4d",
            "--root",
            str(self.root),
            "--web",
            "--no-http",
            "--interface",
            "127.0.0.1",
            "--https-port",
            "0",
            "--strict",
        )
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, output)
        self.assertNotIn("Traceback", output)
        [line] = [line for line in output.splitlines() if "cannot start" in line]
        self.assertIn("tls4d cannot start: --strict refuses private key files", line)
        for path in exposed:
            self.assertIn(f"run chmod 600 {path}", line)
        self.assertNotIn("listening", output)

    def test_port_in_use(self) -> None:
        """A port already taken stops the start with one line naming the option."""
        first = self.start("--web", "--no-http")
        port = first.port("HTTPS web server")
        result = _run(
            _twistd(),
            "-n",
            "--pidfile=",
            "tls4d",
            "--root",
            str(self.folder / "third"),
            "--web",
            "--no-http",
            "--interface",
            "127.0.0.1",
            "--https-port",
            str(port),
        )
        self.assertEqual(result.returncode, 1)
        self.assertRegex(
            result.stdout,
            rf"tls4d cannot start: The HTTPS web server cannot listen on port {port} "
            r"of 127\.0\.0\.1: .*Address already in use\. .* --https-port\.",
        )
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    def test_reload_command(self) -> None:
        """
        After a new certificate is installed, ``tls4d reload`` makes the
        running server serve it (broken files: `BrokenFilesTests`).
        """
        server = self.start("--web", "--no-http")
        port = server.port("HTTPS web server")
        run_entry = self.root / "Run" / str(server.process.pid)
        # The process lists itself as it starts, just after it binds.
        end = time.monotonic() + DEADLINE
        while not run_entry.exists() and time.monotonic() < end:
            time.sleep(0.05)
        self.assertTrue(run_entry.exists())

        ca = root.load_local_ca(root.RootLayout(self.root))
        key = pki.generate_private_key()
        renewed = pki.issue_certificate(
            ca, key.public_key(), "renewed", server_names=["localhost"]
        )
        pki.write_private_key(self.root / "key.pem", key)
        pki.write_certificates(self.root / "cert.pem", [renewed])
        result = _tls4d("reload", "--root", str(self.root))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(str(server.process.pid), result.stdout)
        server.wait_for("Reload done")
        served = _s_client(port, "-CAfile", str(self.root / "Resources" / "ca.pem"))
        self.assertIn("subject=CN = renewed", served.stdout)
        server.stop()
        self.assertFalse(run_entry.exists())

    def test_sql_password_login(self) -> None:
        """
        With --sql-client-certificate optional, a user logs in with a password
        and no certificate; a wrong password is refused and logged.
        """
        server = self.start("--sql", "--sql-client-certificate", "optional")
        port = str(server.port("SQL server"))
        added = _run(
            sys.executable,
            "-m",
            "twisted_tls4d.cli",
            "users",
            "add",
            "bob",
            "--access",
            "read-only",
            "--root",
            str(self.root),
            input="s3cret pw\n",
        )
        self.assertEqual(added.returncode, 0, added.stdout + added.stderr)
        ca = str(self.root / "Resources" / "ca.pem")

        def sql(password: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "twisted_tls4d.cli",
                    "sql",
                    "--ca",
                    ca,
                    "--user",
                    "bob",
                    "--port",
                    port,
                    "-e",
                    "SELECT 6 * 7 AS answer",
                ],
                capture_output=True,
                text=True,
                timeout=DEADLINE,
                stdin=subprocess.DEVNULL,
                env={**_environment(), "TLS4D_SQL_PASSWORD": password},
            )

        good = sql("s3cret pw")
        self.assertEqual(good.returncode, 0, good.stdout + good.stderr)
        self.assertRegex(good.stdout, r"answer[\s\S]*42")
        bad = sql("Zq9-not-the-password")
        self.assertEqual(bad.returncode, 1)
        self.assertEqual(len(bad.stderr.strip().splitlines()), 1, bad.stderr)
        self.assertNotIn("Zq9-not-the-password", server.log)
        self.assertNotIn("s3cret", server.log)

    def test_min_tls_13(self) -> None:
        """With --min-tls 1.3, a TLS 1.2 client is refused and a TLS 1.3 one served."""
        if shutil.which("openssl") is None:
            raise unittest.SkipTest("openssl is not installed")
        server = self.start("--web", "--min-tls", "1.3")
        port = server.port("HTTPS web server")
        self.assertNotEqual(_s_client(port, "-tls1_2").returncode, 0)
        modern = _s_client(port, "-tls1_3")
        self.assertIn("New, TLSv1.3, Cipher is", modern.stdout)


def _https_served(port: int, ca: Path) -> bytes:
    """
    Get ``/`` over HTTPS from 127.0.0.1, trusting ``ca``.

    Returns:
        The served leaf certificate, DER-encoded.

    Raises:
        AssertionError: The answer is not ``200 OK``.
    """
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as connection,
    ):
        connection.sendall(
            b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        status = connection.makefile("rb").readline()
        assert status.startswith(b"HTTP/1.1 200 "), status
        served = connection.getpeercert(binary_form=True)
    assert served is not None
    return served


def _app_ping(port: int, client: Path) -> bool:
    """
    Send one ``ping`` frame to the application server at 127.0.0.1 as the
    client whose ``tls4d client`` folder is ``client``.

    Returns:
        Whether the server answered ``pong``; False if it refused the client
        (during or just after the handshake).
    """
    context = ssl.create_default_context(cafile=str(client / "ca.pem"))
    context.load_cert_chain(str(client / "cert.pem"), str(client / "key.pem"))
    payload = json.dumps({"id": 1, "op": "ping", "args": {}}).encode()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as connection,
        ):
            connection.sendall(len(payload).to_bytes(4, "big") + payload)
            reader = connection.makefile("rb")
            size = int.from_bytes(reader.read(4), "big")
            answer = json.loads(reader.read(size))
    except (OSError, ValueError):
        return False
    return bool(answer.get("result") == "pong")


class BrokenFilesTests(unittest.TestCase):
    """
    Key, certificate, CA, revocation-list and DH files removed or damaged
    under a running twistd: the servers go on serving with what they loaded,
    a reload names the file and what is wrong and keeps the configuration,
    and once the file is back a reload takes it.
    """

    def setUp(self) -> None:
        self.folder = support.temporary_folder("tls4d-e2e-files-")
        self.layout = root.RootLayout(self.folder / "root")
        root.bootstrap(self.layout)
        self.alice = self.folder / "alice"
        identity.issue_client_identity(self.layout, "alice", self.alice)
        self.mallory = self.folder / "mallory"
        mallory = identity.issue_client_identity(self.layout, "mallory", self.mallory)
        revoked = pki.load_certificates(mallory.cert)[0].serial_number
        revocation.revoke(self.layout, [revoked])
        self.server = Server(self.layout.path, "--web", "--no-http", "--app", "--sql")
        self.addCleanup(self.server.stop)
        self.ports = {
            name: self.server.port(label)
            for name, label in (
                ("https", "HTTPS web server"),
                ("app", "Application server"),
                ("sql", "SQL server"),
            )
        }
        self.https_certificate = pki.load_certificates(self.layout.cert)[0]

    def assert_serving(self) -> None:
        """
        New connections to each server complete their handshake and are
        answered, HTTPS with the certificate loaded at start, and the revoked
        client is still refused.
        """
        served = _https_served(self.ports["https"], self.alice / "ca.pem")
        self.assertEqual(
            served, self.https_certificate.public_bytes(serialization.Encoding.DER)
        )
        self.assertTrue(_app_ping(self.ports["app"], self.alice))
        self.assertFalse(_app_ping(self.ports["app"], self.mallory))
        with closing(
            dbapi.connect("127.0.0.1", self.ports["sql"], identity=self.alice)
        ) as connection:
            cursor = connection.cursor()
            cursor.execute("SELECT 6 * 7")
            self.assertEqual(cursor.fetchall(), [(42,)])

    def reload(self, command: bool) -> str:
        """
        Ask the server to reload, by ``tls4d reload`` or SIGHUP.

        Returns:
            The log line that ends the reload ("Reload done" or "Reload
            failed...").
        """
        ends = re.compile(r"^.*Reload (?:done|failed).*$", re.MULTILINE)
        before = len(ends.findall(self.server.log))
        if command:
            result = _tls4d("reload", "--root", str(self.layout.path))
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        else:
            self.server.process.send_signal(signal.SIGHUP)
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            found = ends.findall(self.server.log)
            if len(found) > before:
                return found[before]
            time.sleep(0.05)
        self.fail(f"No reload ended within {DEADLINE} s:\n{self.server.log}")

    def check_fault(
        self, path: Path, damage: Callable[[Path], None], problem: str, command: bool
    ) -> None:
        """
        Damage ``path`` while the servers run, then check that they serve,
        that a reload fails naming the file and ``problem``, that they still
        serve as before, and that a reload takes the restored file.
        """
        content, mode = path.read_bytes(), path.stat().st_mode & 0o777
        damage(path)
        self.assert_serving()
        failed = self.reload(command)
        self.assertIn(
            "Reload failed, the servers keep the configuration they had: ", failed
        )
        self.assertIn(f"{path}{problem}", failed)
        self.assertIn("Reload again once that is fixed.", failed)
        self.assert_serving()

        path.unlink(missing_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(descriptor, "wb") as restored:
            restored.write(content)
        self.assertIn("Reload done", self.reload(command))
        self.assert_serving()
        self.assertNotIn("PRIVATE KEY", self.server.log)

    def test_key_removed(self) -> None:
        """key.pem removed: the reload says it cannot read it."""
        self.check_fault(
            self.layout.key,
            Path.unlink,
            ": No such file or directory",
            command=True,
        )

    def test_certificate_truncated(self) -> None:
        """cert.pem cut in half: the reload says it is malformed."""
        self.check_fault(
            self.layout.cert,
            lambda path: path.write_bytes(
                path.read_bytes()[: path.stat().st_size // 2]
            ),
            " holds a malformed certificate",
            command=False,
        )

    def test_ca_garbage(self) -> None:
        """Resources/ca.pem overwritten with junk: the reload says it holds none."""
        self.check_fault(
            self.layout.ca,
            lambda path: path.write_bytes(os.urandom(600)),
            " holds no PEM certificate",
            command=False,
        )

    def test_crl_corrupted(self) -> None:
        """
        Resources/crl.pem with its body damaged: the reload says it is
        malformed, and the revoked client stays refused.
        """

        def corrupt(path: Path) -> None:
            lines = path.read_bytes().splitlines(keepends=True)
            path.write_bytes(b"".join([lines[0], lines[1][::-1], *lines[2:]]))

        self.check_fault(
            revocation.crl_path(self.layout),
            corrupt,
            " holds a malformed revocation list",
            command=True,
        )

    def test_dhparams_removed(self) -> None:
        """dhparams.pem removed: the reload says it is missing and how to fix it."""
        self.check_fault(
            self.layout.dhparams,
            Path.unlink,
            ": No such file or directory; restore it, or write the RFC 7919 "
            "ffdhe2048 group there with 'tls4d dhparams",
            command=False,
        )


class PluginTests(unittest.TestCase):
    """
    twistd finds the tls4d plugin of the installed package.
    """

    def test_listed_from_installed_package(self) -> None:
        """
        Outside the repository and without PYTHONPATH, ``twistd --help`` lists
        tls4d, and ``twisted_tls4d`` is imported from the installation.
        """
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        where = subprocess.run(
            [
                sys.executable,
                "-c",
                "import twisted_tls4d; print(twisted_tls4d.__file__)",
            ],
            capture_output=True,
            text=True,
            cwd=tempfile.gettempdir(),
            env=env,
        )
        source = REPOSITORY / "twisted_tls4d"
        if where.returncode != 0 or Path(where.stdout.strip()).parent == source:
            raise unittest.SkipTest(
                "twisted_tls4d is not installed (non-editable) here"
            )
        result = subprocess.run(
            [_twistd(), "--help"],
            capture_output=True,
            text=True,
            cwd=tempfile.gettempdir(),
            env=env,
            timeout=DEADLINE,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(
            result.stdout, r"\n\s+tls4d\s+The web, application and SQL servers"
        )

    def test_listed_from_source(self) -> None:
        """From the source tree, ``twistd tls4d --help`` explains the options."""
        result = _run(_twistd(), "tls4d", "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        for option in (
            "--web",
            "--app",
            "--sql",
            "--root",
            "--interface",
            "--min-tls",
            "--ciphers",
            "--hsts",
            "--https-port",
        ):
            self.assertIn(option, result.stdout)
