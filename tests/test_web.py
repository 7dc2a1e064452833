"""
Tests for the web server: HSTS, the redirect from plain HTTP, WebFolder, and
the real listeners driven by curl.
"""

from __future__ import annotations

import shutil
from typing import Any

from twisted.internet import defer, reactor, utils
from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from tests import support
from twisted_tls4d import pki, service, settings, web


def _request(path: bytes, host: bytes | None) -> DummyRequest:
    request = DummyRequest(path.lstrip(b"/").split(b"/"))
    request.uri = path
    if host is not None:
        request.requestHeaders.setRawHeaders(b"host", [host])
    return request


class RedirectTests(unittest.TestCase):
    """
    Plain HTTP redirects to HTTPS only for the host names the certificate covers.
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


class SiteTests(unittest.TestCase):
    """
    The HTTPS site adds HSTS to every answer and never lists a folder.
    """

    def setUp(self) -> None:
        self.folder = support.temporary_folder("tls4d-web-")
        (self.folder / "index.html").write_text("<p>start</p>")
        (self.folder / "sub").mkdir()
        (self.folder / "sub" / "file.txt").write_text("hello")

    def test_hsts_header(self) -> None:
        """The HSTS site sets the header before any resource renders."""
        site = web.HSTSSite(web.WebFolder(str(self.folder)), web.hsts_header(600))
        request = _request(b"/missing", b"localhost")
        site.getResourceFor(request)
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"strict-transport-security"),
            [b"max-age=600"],
        )

    def test_no_listing(self) -> None:
        """A folder without index.html is not listed."""
        child = web.WebFolder(str(self.folder)).getChild(
            b"sub", _request(b"/sub/", None)
        )
        listing = child.getChild(b"", _request(b"/sub/", None))
        self.assertIsInstance(listing, web.resource.NoResource)


def _curl(*args: str) -> defer.Deferred[tuple[bytes, bytes, int]]:
    curl = shutil.which("curl")
    assert curl is not None
    return utils.getProcessOutputAndValue(
        curl, ["--silent", "--show-error", "--max-time", "10", *args], env={}
    )


class ListenerTests(unittest.TestCase):
    """
    The real web listeners on loopback, asked by curl.
    """

    def setUp(self) -> None:
        if shutil.which("curl") is None:
            raise unittest.SkipTest("curl is not installed")
        self.layout = support.make_root()

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
        return ports

    @defer.inlineCallbacks
    def test_https_start_page_with_hsts(self) -> Any:
        """HTTPS serves the start page with HSTS; plain HTTP redirects there."""
        ports = yield self.start(hsts=True)
        ca = str(self.layout.ca)
        out, err, code = yield _curl(
            "--include", "--cacert", ca, f"https://localhost:{ports['https']}/"
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"HTTP/1.1 200", out)
        self.assertIn(b"strict-transport-security: max-age=63072000", out.lower())
        self.assertIn(b"tls4d is serving this root", out)

        out, err, code = yield _curl(
            "--include", f"http://localhost:{ports['http']}/x?y=1"
        )
        self.assertIn(b"HTTP/1.1 301", out)
        self.assertIn(f"https://localhost:{ports['https']}/x?y=1".encode(), out)
        self.assertNotIn(b"strict-transport-security", out.lower())

        out, err, code = yield _curl(
            "--location", "--cacert", ca, f"http://127.0.0.1:{ports['http']}/"
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
        out, err, code = yield _curl(
            "--include",
            "--cacert",
            str(self.layout.ca),
            f"https://localhost:{ports['https']}/",
        )
        self.assertIn(b"HTTP/1.1 200", out)
        self.assertNotIn(b"strict-transport-security", out.lower())

    @defer.inlineCallbacks
    def test_no_http(self) -> Any:
        """--no-http leaves only the HTTPS listener."""
        ports = yield self.start(no_http=True)
        self.assertEqual(sorted(ports), ["https"])

    @defer.inlineCallbacks
    def test_untrusted_client_fails(self) -> Any:
        """curl without the root's CA refuses the generated certificate."""
        ports = yield self.start()
        out, err, code = yield _curl(f"https://localhost:{ports['https']}/")
        self.assertNotEqual(code, 0)
        self.assertIn(b"certificate", err.lower())

    @defer.inlineCallbacks
    def test_ipv6_interface(self) -> Any:
        """--interface ::1 serves HTTPS on IPv6 loopback, covered by the certificate."""
        if not service._ipv6_available():
            raise unittest.SkipTest("this machine has no IPv6")
        ports = yield self.start(interface="::1", no_http=True)
        out, err, code = yield _curl(
            "--globoff",
            "--cacert",
            str(self.layout.ca),
            f"https://[::1]:{ports['https']}/",
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"tls4d is serving this root", out)
