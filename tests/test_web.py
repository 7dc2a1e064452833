"""
Tests for the web server: HSTS, the redirect from plain HTTP, WebFolder, the
WSGI application, request and connection limits, the access log and HTTP/2,
in memory and on the real listeners driven by curl and raw TLS clients.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, threads, utils
from twisted.trial import unittest
from twisted.web import http
from twisted.web.test.requesthelper import DummyRequest

from tests import support
from twisted_tls4d import pki, service, settings, tap, web
from twisted_tls4d.errors import ConfigurationError

#: Seconds a raw test client waits for any one answer.
CLIENT_TIMEOUT = 10


def _request(path: bytes, host: bytes | None) -> DummyRequest:
    request = DummyRequest(path.lstrip(b"/").split(b"/"))
    request.uri = path
    if host is not None:
        request.requestHeaders.setRawHeaders(b"host", [host])
    return request


class RedirectTests(unittest.TestCase):
    """
    Plain HTTP redirects to HTTPS only for the host names the certificate
    covers, or to the configured server name.
    """

    def setUp(self) -> None:
        layout = support.make_root("www.example.test")
        certificate = pki.load_certificates(layout.cert)[0]
        self.redirect = web.RedirectToHTTPS(certificate, 8443)

    def render(self, path: bytes, host: bytes | None) -> tuple[int, bytes | None]:
        request = _request(path, host)
        self.redirect.render(request)
        location = request.responseHeaders.getRawHeaders(b"location", [None])[0]
        return request.responseCode, location

    def test_same_path_and_query(self) -> None:
        """A request for a covered host is sent to the same path and query on HTTPS."""
        self.assertEqual(
            self.render(b"/a/b?x=1&y=2", b"localhost:8080"),
            (301, b"https://localhost:8443/a/b?x=1&y=2"),
        )
        self.assertEqual(
            self.render(b"/", b"www.example.test"),
            (301, b"https://www.example.test:8443/"),
        )

    def test_ip_addresses(self) -> None:
        """IPv4 and bracketed IPv6 hosts keep their form in the redirect."""
        self.assertEqual(
            self.render(b"/", b"127.0.0.1:80"), (301, b"https://127.0.0.1:8443/")
        )
        self.assertEqual(
            self.render(b"/x", b"[::1]:8080"), (301, b"https://[::1]:8443/x")
        )

    def test_default_port_omitted(self) -> None:
        """With HTTPS on 443, the redirect names no port."""
        self.redirect.https_port = 443
        self.assertEqual(self.render(b"/", b"localhost"), (301, b"https://localhost/"))

    def test_foreign_or_malformed_host(self) -> None:
        """Hosts the certificate does not cover, and malformed ones, get 400."""
        for host in (
            b"evil.example",
            b"localhost.evil.example",
            b"localhost@evil.example",
            b"[::2]:80",
            b"[::1",
            b"localhost:80x",
            b"\xff",
            b"",
            None,
        ):
            self.assertEqual(self.render(b"/", host), (400, None), host)

    def test_server_name(self) -> None:
        """With a server name, every Host is redirected there, path and query kept."""
        self.redirect.server_name = "www.example.test"
        for host in (b"evil.example", b"localhost", None):
            self.assertEqual(
                self.render(b"/p?q=1", host),
                (301, b"https://www.example.test:8443/p?q=1"),
            )

    def test_not_a_path(self) -> None:
        """A request target that is not a path is never redirected."""
        for server_name in (None, "www.example.test"):
            self.redirect.server_name = server_name
            for uri in (b"@evil.example/", b"http://evil.example/", b"*"):
                self.assertEqual(self.render(uri, b"localhost"), (400, None), uri)


class HeaderTests(unittest.TestCase):
    """
    The HSTS header's directives and the operator's extra headers.
    """

    def test_hsts_directives(self) -> None:
        """includeSubDomains and preload are added when asked for."""
        self.assertEqual(web.hsts_header(600), "max-age=600")
        self.assertEqual(
            web.hsts_header(600, include_subdomains=True),
            "max-age=600; includeSubDomains",
        )
        self.assertEqual(
            web.hsts_header(31536000, include_subdomains=True, preload=True),
            "max-age=31536000; includeSubDomains; preload",
        )

    def test_parse_header(self) -> None:
        """'Name: value' is split and trimmed; the value may hold colons."""
        self.assertEqual(
            web.parse_header("X-Frame-Options:  DENY "), (b"X-Frame-Options", b"DENY")
        )
        self.assertEqual(
            web.parse_header("Link: <https://a.example/>; rel=preconnect"),
            (b"Link", b"<https://a.example/>; rel=preconnect"),
        )

    def test_bad_headers(self) -> None:
        """Malformed, reserved and multi-line headers are refused with the reason."""
        for text, words in (
            ("X-Frame-Options DENY", "is not 'Name: value'"),
            ("Bad Name: x", "is not 'Name: value'"),
            ("Strict-Transport-Security: max-age=1", "use --hsts"),
            ("Content-Length: 5", "the HTTP framing sets it"),
            ("X-A: one\r\nX-B: two", "must be one line"),
        ):
            with self.assertRaises(ConfigurationError) as caught:
                web.parse_header(text)
            self.assertIn(words, str(caught.exception))


class WebSettingsTests(unittest.TestCase):
    """
    The web server's settings: defaults, checks and command-line options.
    """

    def check(self, **values: Any) -> str:
        with self.assertRaises(ConfigurationError) as caught:
            settings.check(settings.Settings(**values))
        return str(caught.exception)

    def test_defaults(self) -> None:
        """The limits default to 4D's where it has them."""
        defaults = settings.Settings()
        self.assertEqual(defaults.max_request_size, 2_000_000)
        self.assertEqual(defaults.max_connections, 100)
        self.assertEqual(defaults.web_idle_timeout, 15)
        self.assertEqual(defaults.request_timeout, 30)
        self.assertFalse(defaults.directory_listing)
        self.assertIsNone(defaults.server_name)

    def test_hsts_options_need_hsts(self) -> None:
        """HSTS directives and the server name are refused without --hsts."""
        for values in (
            {"hsts_include_subdomains": True},
            {"hsts_preload": True, "hsts_include_subdomains": True},
            {"server_name": "www.example.test"},
        ):
            self.assertIn("only applies with hsts", self.check(**values))

    def test_preload_rules(self) -> None:
        """preload needs includeSubDomains and a max-age of a year or more."""
        self.assertIn(
            "needs hsts-include-subdomains",
            self.check(hsts=True, hsts_preload=True),
        )
        self.assertIn(
            "got max-age 600",
            self.check(
                hsts=True,
                hsts_preload=True,
                hsts_include_subdomains=True,
                hsts_max_age=600,
            ),
        )
        settings.check(
            settings.Settings(
                hsts=True, hsts_preload=True, hsts_include_subdomains=True
            )
        )

    def test_bad_values(self) -> None:
        """Bad server names, headers, WSGI names and limits are refused."""
        self.assertIn(
            "not a host name",
            self.check(hsts=True, server_name="https://www.example.test/"),
        )
        self.assertIn("is not 'Name: value'", self.check(add_header=["nothing"]))
        self.assertIn("not a dotted name", self.check(wsgi="app"))
        for name in (
            "max_request_size",
            "max_connections",
            "web_idle_timeout",
            "request_timeout",
        ):
            self.assertIn("must be positive", self.check(**{name: 0}))

    def test_settings_file(self) -> None:
        """The settings file sets the web options, add-header as a list."""
        folder = support.temporary_folder("tls4d-web-")
        (folder / "Settings").mkdir()
        (folder / "Settings" / "tls4d.toml").write_text(
            'hsts = true\nserver-name = "www.example.test"\n'
            'add-header = ["X-Frame-Options: DENY", "X-Test: 1"]\n'
            "directory-listing = true\nmax-request-size = 5000\n"
        )
        resolved = settings.resolve({}, folder)
        self.assertEqual(resolved.server_name, "www.example.test")
        self.assertEqual(resolved.add_header, ("X-Frame-Options: DENY", "X-Test: 1"))
        self.assertTrue(resolved.directory_listing)
        self.assertEqual(resolved.max_request_size, 5000)
        (folder / "Settings" / "tls4d.toml").write_text('add-header = "X-A: 1"\n')
        with self.assertRaises(ConfigurationError) as caught:
            settings.resolve({}, folder)
        self.assertIn("add-header must be a list of strings", str(caught.exception))

    def test_command_line(self) -> None:
        """twistd's options reach the settings; --add-header repeats."""
        options = tap.Options()
        options.parseOptions(
            [
                "--root",
                str(support.temporary_folder("tls4d-web-") / "root"),
                "--hsts",
                "--hsts-include-subdomains",
                "--hsts-preload",
                "--server-name",
                "www.example.test",
                "--directory-listing",
                "--wsgi",
                "tests.wsgi_app.application",
                "--add-header",
                "X-A: 1",
                "--add-header",
                "X-B: 2",
                "--max-request-size",
                "10",
                "--max-connections",
                "3",
                "--web-idle-timeout",
                "4",
                "--request-timeout",
                "5",
            ]
        )
        chosen = options.settings
        self.assertTrue(chosen.hsts_include_subdomains and chosen.hsts_preload)
        self.assertEqual(chosen.server_name, "www.example.test")
        self.assertTrue(chosen.directory_listing)
        self.assertEqual(chosen.wsgi, "tests.wsgi_app.application")
        self.assertEqual(chosen.add_header, ("X-A: 1", "X-B: 2"))
        self.assertEqual(
            (
                chosen.max_request_size,
                chosen.max_connections,
                chosen.web_idle_timeout,
                chosen.request_timeout,
            ),
            (10, 3, 4, 5),
        )


class WebFolderTests(unittest.TestCase):
    """
    WebFolder never lists a folder unless asked, and never serves what lies
    outside it.
    """

    def setUp(self) -> None:
        base = support.temporary_folder("tls4d-web-")
        self.folder = base / "www"
        self.folder.mkdir()
        (self.folder / "index.html").write_text("<p>start</p>")
        (self.folder / "sub").mkdir()
        (self.folder / "sub" / "file.txt").write_text("hello")
        (base / "secret.txt").write_text("secret")
        (self.folder / "out.txt").symlink_to(base / "secret.txt")
        (self.folder / "in.txt").symlink_to(self.folder / "sub" / "file.txt")

    def child(self, files: web.WebFolder, *segments: bytes) -> Any:
        resource = files
        for segment in segments:
            resource = resource.getChild(segment, _request(b"/", None))
        return resource

    def test_no_listing(self) -> None:
        """A folder without index.html is not listed by default."""
        files = web.WebFolder.serve(self.folder)
        self.assertIsInstance(self.child(files, b"sub", b""), web.resource.NoResource)

    def test_listing(self) -> None:
        """With listings on, a folder without index.html is listed."""
        files = web.WebFolder.serve(self.folder, listing=True)
        self.assertIsInstance(
            self.child(files, b"sub", b""), web.static.DirectoryLister
        )

    def test_symlinks(self) -> None:
        """A link inside the folder is served; one leading out is not, nor listed."""
        files = web.WebFolder.serve(self.folder, listing=True)
        self.assertIsInstance(self.child(files, b"in.txt"), web.WebFolder)
        self.assertIsInstance(self.child(files, b"out.txt"), web.resource.NoResource)
        self.assertNotIn("out.txt", files.listNames())
        self.assertIn("in.txt", files.listNames())

    def test_fallback(self) -> None:
        """With a fallback, paths no file covers go to it, files stay files."""
        fallback = web.resource.Resource()
        files = web.WebFolder.serve(self.folder, fallback=fallback)
        self.assertIs(self.child(files, b"missing"), fallback)
        self.assertIs(self.child(files, b"sub", b""), fallback)
        self.assertIs(self.child(files, b"out.txt"), fallback)
        self.assertIsInstance(self.child(files, b"sub", b"file.txt"), web.WebFolder)


def _curl(*args: str) -> defer.Deferred[tuple[bytes, bytes, int]]:
    curl = shutil.which("curl")
    assert curl is not None
    return utils.getProcessOutputAndValue(
        curl, ["--silent", "--show-error", "--max-time", "10", *args], env={}
    )


def _headers(out: bytes) -> dict[str, str]:
    """The last header block of curl --include output, names lower-cased."""
    text = out.decode("latin-1").replace("\r\n", "\n")
    blocks = [b for b in text.split("\n\n") if b.startswith("HTTP/")]
    head = blocks[-1].splitlines() if blocks else []
    found = {"status": head[0] if head else ""}
    for line in head[1:]:
        name, _, value = line.partition(":")
        found[name.strip().lower()] = value.strip()
    return found


def _tls_client(port: int, ca: Path) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(ca))
    raw = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
    return context.wrap_socket(raw, server_hostname="localhost")


def _read_all(connection: socket.socket) -> bytes:
    """Read until the server closes, or CLIENT_TIMEOUT passes."""
    data = b""
    end = time.monotonic() + CLIENT_TIMEOUT
    while time.monotonic() < end:
        try:
            chunk = connection.recv(65536)
        except (ssl.SSLError, OSError):
            break
        if not chunk:
            break
        data += chunk
    return data


class _ListenerCase(unittest.TestCase):
    """
    Starts the real web listeners of a new root on loopback.
    """

    def setUp(self) -> None:
        if shutil.which("curl") is None:
            raise unittest.SkipTest("curl is not installed")
        self.layout = support.make_root()
        self.ca = str(self.layout.ca)

    @defer.inlineCallbacks
    def start(self, **values: Any) -> Any:
        values = {
            "web": True,
            "interface": "127.0.0.1",
            "https_port": 0,
            "http_port": 0,
            **values,
        }
        top = service.build_service(settings.resolve(values, self.layout.path), reactor)
        top.startService()
        self.addCleanup(top.stopService)
        yield None
        ports = {
            child.name: child.port.getHost().port  # type: ignore[union-attr]
            for child in top
        }
        self.https = f"https://localhost:{ports['https']}"
        return ports

    def get(self, path: str, *args: str) -> defer.Deferred[tuple[bytes, bytes, int]]:
        return _curl("--include", "--cacert", self.ca, *args, self.https + path)


class ListenerTests(_ListenerCase):
    """
    The real web listeners on loopback, asked by curl.
    """

    @defer.inlineCallbacks
    def test_https_start_page_with_hsts(self) -> Any:
        """HTTPS serves the start page with HSTS; plain HTTP redirects there."""
        ports = yield self.start(hsts=True)
        out, err, code = yield self.get("/")
        self.assertEqual(code, 0, err)
        self.assertRegex(out, rb"HTTP/(1\.1|2) 200")
        self.assertIn(b"strict-transport-security: max-age=63072000", out.lower())
        self.assertIn(b"tls4d is serving this root", out)

        out, err, code = yield _curl(
            "--include", f"http://localhost:{ports['http']}/x?y=1"
        )
        self.assertIn(b"HTTP/1.1 301", out)
        self.assertIn(f"https://localhost:{ports['https']}/x?y=1".encode(), out)
        self.assertNotIn(b"strict-transport-security", out.lower())

        out, err, code = yield _curl(
            "--location", "--cacert", self.ca, f"http://127.0.0.1:{ports['http']}/"
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"tls4d is serving this root", out)

    @defer.inlineCallbacks
    def test_without_hsts(self) -> Any:
        """Without --hsts, plain HTTP serves the same files and no HSTS is sent."""
        ports = yield self.start()
        out, err, code = yield _curl("--include", f"http://localhost:{ports['http']}/")
        self.assertIn(b"HTTP/1.1 200", out)
        self.assertIn(b"tls4d is serving this root", out)
        out, err, code = yield self.get("/")
        self.assertRegex(out, rb"HTTP/(1\.1|2) 200")
        self.assertNotIn(b"strict-transport-security", out.lower())

    @defer.inlineCallbacks
    def test_no_http(self) -> Any:
        """--no-http leaves only the HTTPS listener."""
        ports = yield self.start(no_http=True)
        self.assertEqual(sorted(ports), ["https"])

    @defer.inlineCallbacks
    def test_untrusted_client_fails(self) -> Any:
        """curl without the root's CA refuses the generated certificate."""
        yield self.start()
        out, err, code = yield _curl(self.https + "/")
        self.assertNotEqual(code, 0)
        self.assertIn(b"certificate", err.lower())

    @defer.inlineCallbacks
    def test_ipv6_interface(self) -> Any:
        """--interface ::1 serves HTTPS on IPv6 loopback, covered by the certificate."""
        if not service._ipv6_available():
            raise unittest.SkipTest("this machine has no IPv6")
        ports = yield self.start(interface="::1", no_http=True)
        out, err, code = yield _curl(
            "--globoff", "--cacert", self.ca, f"https://[::1]:{ports['https']}/"
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"tls4d is serving this root", out)


class HSTSTests(_ListenerCase):
    """
    HSTS on every HTTPS answer, with the directives asked for, and never over
    plain HTTP; the redirect's target host.
    """

    @defer.inlineCallbacks
    def test_every_answer(self) -> Any:
        """Found, missing, moved, partial, cached and refused answers carry HSTS."""
        (self.layout.web_folder / "sub").mkdir()
        (self.layout.web_folder / "file.txt").write_text("0123456789")
        yield self.start(
            hsts=True,
            hsts_include_subdomains=True,
            hsts_preload=True,
            max_request_size=100,
        )
        expected = "max-age=63072000; includeSubDomains; preload"
        out, _, _ = yield self.get("/file.txt")
        last_modified = _headers(out)["last-modified"]
        for path, args, status in (
            ("/file.txt", (), "200"),
            ("/missing", (), "404"),
            ("/sub", (), "302"),
            ("/file.txt", ("--range", "0-3"), "206"),
            ("/file.txt", ("--header", f"If-Modified-Since: {last_modified}"), "304"),
            ("/file.txt", ("--data", "x"), "405"),
            ("/file.txt", ("--http1.1", "--data-binary", "x" * 101), "413"),
        ):
            out, err, _ = yield self.get(path, *args)
            headers = _headers(out)
            self.assertIn(status, headers["status"], (path, args, out, err))
            self.assertEqual(
                headers.get("strict-transport-security"), expected, (path, args)
            )

    @defer.inlineCallbacks
    def test_server_name(self) -> Any:
        """With --server-name, plain HTTP for any Host goes to that name on HTTPS."""
        ports = yield self.start(hsts=True, server_name="www.example.test")
        out, _, _ = yield _curl(
            "--include",
            "--header",
            "Host: evil.example",
            f"http://127.0.0.1:{ports['http']}/a/b?c=d",
        )
        headers = _headers(out)
        self.assertIn("301", headers["status"])
        self.assertEqual(
            headers["location"], f"https://www.example.test:{ports['https']}/a/b?c=d"
        )
        self.assertNotIn("strict-transport-security", headers)

    @defer.inlineCallbacks
    def test_forged_host(self) -> Any:
        """Without --server-name, a Host the certificate does not cover gets 400."""
        ports = yield self.start(hsts=True)
        out, _, _ = yield _curl(
            "--include",
            "--header",
            "Host: evil.example",
            f"http://127.0.0.1:{ports['http']}/",
        )
        headers = _headers(out)
        self.assertIn("400", headers["status"])
        self.assertNotIn("location", headers)


class StaticFileTests(_ListenerCase):
    """
    WebFolder's files over HTTPS: index page, types, validators, ranges,
    listings, and no way out of the folder.
    """

    def setUp(self) -> None:
        super().setUp()
        folder = self.layout.web_folder
        (folder / "style.css").write_text("body { color: black; }\n")
        (folder / "data.json").write_text('{"a": 1}\n')
        (folder / "notes.txt").write_text("0123456789abcdef")
        (folder / "sub").mkdir()
        (folder / "sub" / "inside.txt").write_text("inside\n")
        (self.layout.path / "outside.txt").write_text("outside the WebFolder\n")
        (folder / "escape.txt").symlink_to(self.layout.path / "outside.txt")
        (folder / "up").symlink_to(self.layout.path)
        (folder / "alias.txt").symlink_to(folder / "sub" / "inside.txt")

    @defer.inlineCallbacks
    def test_index_and_types(self) -> Any:
        """The index page answers /, and each file gets its content type."""
        yield self.start()
        out, _, _ = yield self.get("/")
        self.assertIn("text/html", _headers(out)["content-type"])
        self.assertIn(b"tls4d is serving this root", out)
        for path, kind in (
            ("/index.html", "text/html"),
            ("/style.css", "text/css"),
            ("/data.json", "application/json"),
            ("/notes.txt", "text/plain"),
        ):
            out, _, _ = yield self.get(path)
            headers = _headers(out)
            self.assertIn("200", headers["status"], path)
            self.assertTrue(headers["content-type"].startswith(kind), headers)
        out, _, _ = yield self.get("/missing.html")
        self.assertIn("404", _headers(out)["status"])

    @defer.inlineCallbacks
    def test_conditional_requests(self) -> Any:
        """Last-Modified and ETag validators are answered 304 when unchanged."""
        yield self.start()
        out, _, _ = yield self.get("/notes.txt")
        headers = _headers(out)
        etag, last_modified = headers["etag"], headers["last-modified"]
        for condition in (
            f"If-None-Match: {etag}",
            f"If-Modified-Since: {last_modified}",
        ):
            out, _, _ = yield self.get("/notes.txt", "--header", condition)
            self.assertIn("304", _headers(out)["status"], condition)
            self.assertNotIn(b"0123456789", out)
        out, _, _ = yield self.get("/notes.txt", "--header", 'If-None-Match: "other"')
        self.assertIn("200", _headers(out)["status"])

    @defer.inlineCallbacks
    def test_byte_ranges(self) -> Any:
        """One range is answered 206 with its bytes, several as multipart, none 416."""
        yield self.start()
        out, _, _ = yield self.get("/notes.txt", "--range", "2-5")
        headers = _headers(out)
        self.assertIn("206", headers["status"])
        self.assertEqual(headers["content-range"], "bytes 2-5/16")
        self.assertTrue(out.endswith(b"\r\n\r\n2345"), out)
        out, _, _ = yield self.get("/notes.txt", "--range", "0-1,4-5")
        headers = _headers(out)
        self.assertIn("206", headers["status"])
        self.assertIn("multipart/byteranges", headers["content-type"])
        out, _, _ = yield self.get("/notes.txt", "--range", "100-200")
        self.assertIn("416", _headers(out)["status"])

    @defer.inlineCallbacks
    def test_no_listing_by_default(self) -> Any:
        """A folder without index.html answers 404, not its content."""
        yield self.start()
        out, _, _ = yield self.get("/sub/")
        self.assertIn("404", _headers(out)["status"])
        self.assertNotIn(b"inside.txt", out)

    @defer.inlineCallbacks
    def test_listing_when_asked(self) -> Any:
        """With --directory-listing, the folder is listed, links out of it left out."""
        yield self.start(directory_listing=True)
        out, _, _ = yield self.get("/sub/")
        self.assertIn("200", _headers(out)["status"])
        self.assertIn(b"inside.txt", out)
        (self.layout.web_folder / "index.html").unlink()
        out, _, _ = yield self.get("/")
        self.assertIn(b"alias.txt", out)
        self.assertNotIn(b"escape.txt", out)

    @defer.inlineCallbacks
    def test_no_escape(self) -> Any:
        """No encoded '..', slash, backslash or NUL, nor a link, leaves WebFolder."""
        yield self.start()
        for path in (
            "/../key.pem",
            "/../outside.txt",
            "/%2e%2e/key.pem",
            "/%2E%2E/outside.txt",
            "/..%2fkey.pem",
            "/%2e%2e%2fkey.pem",
            "/sub/%2e%2e/%2e%2e/key.pem",
            "/%252e%252e/key.pem",
            "/%252e%252e%252fkey.pem",
            "/..\\key.pem",
            "/%5c..%5ckey.pem",
            "/..%5ckey.pem",
            "/%00",
            "/key.pem%00.txt",
            "/escape.txt",
            "/up/key.pem",
            "/up/outside.txt",
        ):
            out, err, _ = yield self.get(path, "--path-as-is")
            status = _headers(out)["status"]
            self.assertRegex(status, r" (400|404) ", (path, out, err))
            self.assertNotIn(b"PRIVATE KEY", out, path)
            self.assertNotIn(b"outside the WebFolder", out, path)
        out, _, _ = yield self.get("/alias.txt")
        self.assertIn(b"inside", out)


class WSGITests(_ListenerCase):
    """
    A WSGI application answers what WebFolder's files do not cover, with the
    operator's extra headers on every answer.
    """

    @defer.inlineCallbacks
    def test_files_then_application(self) -> Any:
        """Files are served as files; other paths, any method, reach the application."""
        yield self.start(
            hsts=True,
            wsgi="tests.wsgi_app.application",
            add_header=["X-Frame-Options: DENY", "X-Test: yes"],
        )
        out, _, _ = yield self.get("/")
        self.assertIn(b"tls4d is serving this root", out)
        out, _, _ = yield self.get("/api/items?id=7&q=x")
        headers = _headers(out)
        self.assertIn("200", headers["status"])
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(headers["strict-transport-security"], "max-age=63072000")
        self.assertEqual(headers["x-frame-options"], "DENY")
        self.assertIn(b'"path": "/api/items"', out)
        self.assertIn(b'"query": "id=7&q=x"', out)
        self.assertIn(b'"scheme": "https"', out)
        out, _, _ = yield self.get("/api/items", "--data-binary", "hello")
        self.assertIn(b'"method": "POST"', out)
        self.assertIn(b'"body_length": 5', out)
        (self.layout.web_folder / "index.html").unlink()
        out, _, _ = yield self.get("/")
        self.assertIn(b'"path": "/"', out)

    @defer.inlineCallbacks
    def test_headers_on_plain_http(self) -> Any:
        """--add-header headers are on plain HTTP answers too, HSTS is not."""
        ports = yield self.start(hsts=True, add_header=["X-Test: yes"])
        out, _, _ = yield _curl("--include", f"http://localhost:{ports['http']}/")
        headers = _headers(out)
        self.assertEqual(headers["x-test"], "yes")
        self.assertNotIn("strict-transport-security", headers)

    def test_unusable_application(self) -> None:
        """A name that does not import, or is not callable, stops the start."""
        for name, words in (
            ("tests.no_such_module.application", "names no importable object"),
            ("tests.wsgi_app.missing", "names no importable object"),
            ("tests.wsgi_app.not_callable", "not a WSGI application"),
        ):
            chosen = settings.resolve(
                {"web": True, "wsgi": name, "https_port": 0, "http_port": 0},
                self.layout.path,
            )
            with self.assertRaises(ConfigurationError) as caught:
                service.build_service(chosen, reactor)
            self.assertIn(words, str(caught.exception))


class LimitTests(_ListenerCase):
    """
    Request size and time, idle connections and the number of connections
    are bounded.
    """

    @defer.inlineCallbacks
    def test_request_size(self) -> Any:
        """A body over --max-request-size is answered 413, declared or chunked."""
        yield self.start(wsgi="tests.wsgi_app.application", max_request_size=1000)
        folder = support.temporary_folder("tls4d-web-")
        (folder / "ok").write_bytes(b"x" * 1000)
        (folder / "big").write_bytes(b"x" * 1001)
        (folder / "huge").write_bytes(b"x" * 300_000)
        out, _, _ = yield self.get(
            "/echo", "--http1.1", "--data-binary", f"@{folder / 'ok'}"
        )
        self.assertIn(b'"body_length": 1000', out)
        for args in (
            ("--http1.1", "--data-binary", f"@{folder / 'big'}"),
            (
                "--http1.1",
                "--header",
                "Expect:",
                "--data-binary",
                f"@{folder / 'huge'}",
            ),
            (
                "--http1.1",
                "--header",
                "Transfer-Encoding: chunked",
                "--data-binary",
                f"@{folder / 'huge'}",
            ),
        ):
            out, err, _ = yield self.get("/echo", *args)
            self.assertIn("413", _headers(out)["status"], (args, err))
        if http.H2_ENABLED:
            out, err, _ = yield self.get(
                "/echo", "--http2", "--data-binary", f"@{folder / 'huge'}"
            )
            self.assertIn("HTTP/2 413", _headers(out)["status"], err)

    @defer.inlineCallbacks
    def test_request_timeout(self) -> Any:
        """A request still arriving after --request-timeout is answered 408."""
        ports = yield self.start(request_timeout=1)

        def trickle() -> tuple[bytes, float]:
            with _tls_client(ports["https"], self.layout.ca) as connection:
                started = time.monotonic()
                connection.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n")
                for number in range(4):
                    time.sleep(0.4)
                    try:
                        connection.sendall(b"X-Slow: %d\r\n" % number)
                    except OSError:
                        break
                return _read_all(connection), time.monotonic() - started

        answer, elapsed = yield threads.deferToThread(trickle)
        self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer)
        self.assertLess(elapsed, CLIENT_TIMEOUT)

    @defer.inlineCallbacks
    def test_request_line_timeout(self) -> Any:
        """
        A request line sent a byte at a time, faster than the idle timeout,
        is answered 408 once --request-timeout passed, over HTTPS and HTTP.
        """
        ports = yield self.start(request_timeout=1, add_header=["X-Test: yes"])

        def trickle(connection: socket.socket) -> bytes:
            for byte in b"GET /index.html HTTP/1.1":
                time.sleep(0.2)
                try:
                    connection.sendall(bytes([byte]))
                except OSError:
                    break
            return _read_all(connection)

        def over_https() -> bytes:
            with _tls_client(ports["https"], self.layout.ca) as connection:
                return trickle(connection)

        def over_http() -> bytes:
            with socket.create_connection(
                ("127.0.0.1", ports["http"]), timeout=CLIENT_TIMEOUT
            ) as connection:
                return trickle(connection)

        for client in (over_https, over_http):
            answer = yield threads.deferToThread(client)
            self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer)
            self.assertIn(b"x-test: yes", answer.lower())

    @defer.inlineCallbacks
    def test_request_timed_from_first_byte(self) -> Any:
        """
        The time a request line took counts toward --request-timeout of the
        rest of the request.
        """
        ports = yield self.start(request_timeout=1.5)

        def slow_line_then_headers() -> bytes:
            with _tls_client(ports["https"], self.layout.ca) as connection:
                connection.sendall(b"GET / HTT")
                time.sleep(1)
                connection.sendall(b"P/1.1\r\n")
                time.sleep(1)
                try:
                    connection.sendall(b"Host: localhost\r\n\r\n")
                except OSError:
                    pass
                return _read_all(connection)

        answer = yield threads.deferToThread(slow_line_then_headers)
        self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer)

    @defer.inlineCallbacks
    def test_idle_timeout(self) -> Any:
        """A silent connection, handshaken or not, closes after --web-idle-timeout."""
        ports = yield self.start(web_idle_timeout=1)

        def wait_for_close(handshake: bool) -> float:
            started = time.monotonic()
            if handshake:
                with _tls_client(ports["https"], self.layout.ca) as connection:
                    _read_all(connection)
            else:
                with socket.create_connection(
                    ("127.0.0.1", ports["https"]), timeout=CLIENT_TIMEOUT
                ) as connection:
                    _read_all(connection)
            return time.monotonic() - started

        for handshake in (True, False):
            elapsed = yield threads.deferToThread(wait_for_close, handshake)
            self.assertGreater(elapsed, 0.5)
            self.assertLess(elapsed, 5)

    @defer.inlineCallbacks
    def test_max_connections(self) -> Any:
        """Connections over --max-connections are closed at once; room frees up."""
        ports = yield self.start(max_connections=2, no_http=True)

        def fill() -> tuple[str, bytes]:
            held = [_tls_client(ports["https"], self.layout.ca) for _ in range(2)]
            try:
                try:
                    extra = _tls_client(ports["https"], self.layout.ca)
                except (OSError, ssl.SSLError) as e:
                    refused = type(e).__name__
                else:
                    refused = "accepted: " + repr(_read_all(extra))
                    extra.close()
                last = held.pop()
                last.unwrap().close()
                time.sleep(0.5)
                with _tls_client(ports["https"], self.layout.ca) as connection:
                    connection.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    answer = connection.recv(100)
            finally:
                for connection in held:
                    connection.close()
            return refused, answer

        refused, answer = yield threads.deferToThread(fill)
        self.assertNotIn("accepted", refused)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer)


class AccessLogTests(_ListenerCase):
    """
    Each listener writes an access log in the combined format to ROOT/Logs,
    without query strings.
    """

    @defer.inlineCallbacks
    def test_combined_without_queries(self) -> Any:
        """Request lines and referrers are logged without their queries."""
        ports = yield self.start(hsts=True)
        yield self.get(
            "/index.html?token=s3cret",
            "--header",
            "Referer: https://localhost/from?session=s3cret",
            "--user-agent",
            "tls4d-test",
        )
        yield _curl("--include", f"http://localhost:{ports['http']}/x?token=s3cret")
        logs = self.layout.path / "Logs"
        self.assertEqual(os.stat(logs).st_mode & 0o777, 0o755)
        deadline = time.monotonic() + CLIENT_TIMEOUT
        https_log = logs / "https-access.log"
        http_log = logs / "http-access.log"
        # Lines reach the files within a second of their requests.
        for log_file in (https_log, http_log):
            while not log_file.exists() or not log_file.read_text():
                self.assertLess(time.monotonic(), deadline)
                yield _curl("--version")
        https_line = https_log.read_text()
        self.assertRegex(
            https_line,
            r'^"127\.0\.0\.1" - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] '
            r'"GET /index\.html HTTP/(1\.1|2)" 200 \d+ "https://localhost/from" '
            r'"tls4d-test"\n$',
        )
        http_line = http_log.read_text()
        self.assertIn('"GET /x HTTP/1.1" 301', http_line)
        for text in (https_line, http_line):
            self.assertNotIn("s3cret", text)
            self.assertNotIn("?", text)


class HTTP2Tests(_ListenerCase):
    """
    HTTP/2 is negotiated by ALPN when Twisted can speak it.
    """

    @defer.inlineCallbacks
    def test_http2(self) -> Any:
        """curl --http2 gets an HTTP/2 answer; --http1.1 still gets HTTP/1.1."""
        if not http.H2_ENABLED:
            raise unittest.SkipTest("h2 is not installed (the http2 extra)")
        out, _, _ = yield _curl("--version")
        if b"HTTP2" not in out:
            raise unittest.SkipTest("this curl cannot speak HTTP/2")
        yield self.start(hsts=True)
        out, err, code = yield self.get("/", "--http2")
        self.assertEqual(code, 0, err)
        headers = _headers(out)
        self.assertEqual(headers["status"].strip(), "HTTP/2 200")
        self.assertEqual(headers["strict-transport-security"], "max-age=63072000")
        out, _, _ = yield self.get("/", "--http1.1")
        self.assertIn("HTTP/1.1 200", _headers(out)["status"])

    def test_alpn_offer(self) -> None:
        """The HTTPS listener offers h2 only when Twisted can speak it."""
        protocols = web.https_protocols()
        self.assertEqual(protocols[-1], b"http/1.1")
        self.assertEqual(b"h2" in protocols, bool(http.H2_ENABLED))


class BrowserTests(unittest.TestCase):
    """
    A real browser trusts the root's CA, follows the redirect to HTTPS and
    shows the start page (``scripts/browser-check``).
    """

    def test_browser_check(self) -> None:
        """Headless Chromium gets the start page over HTTPS from a plain HTTP URL."""
        for tool, package in (("chromium", "chromium"), ("certutil", "libnss3-tools")):
            if shutil.which(tool) is None:
                raise unittest.SkipTest(f"{tool} is not installed ({package})")
        script = Path(__file__).resolve().parent.parent / "scripts" / "browser-check"
        out = support.temporary_folder("tls4d-browser-") / "page.png"
        result = subprocess.run(
            [sys.executable, str(script), "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("HTTPS answered the page: yes", result.stdout)
        self.assertEqual(out.read_bytes()[:8], b"\x89PNG\r\n\x1a\n")
