"""
The web server's fast path for small files: the file a request path led to
is remembered, small files are answered from memory, and the access log is
written in batches; none of it may serve a stale or escaped file.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, task
from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from tests import support
from tests.test_web import _ListenerCase
from twisted_tls4d import web


def _body(answer: bytes) -> bytes:
    return answer.split(b"\r\n\r\n", 1)[1]


class SmallFileCacheTests(unittest.TestCase):
    """
    `web.SmallFileCache` returns a file's current bytes and holds no more than
    its limit.
    """

    def setUp(self) -> None:
        self.folder = support.temporary_folder("web-cache-")

    def test_changed_file_is_read_again(self) -> None:
        """A file rewritten with the same size is read again, not served stale."""
        path = self.folder / "a.txt"
        path.write_bytes(b"first")
        cache = web.SmallFileCache()
        self.assertEqual(cache.read(str(path), os.stat(path)), b"first")
        path.write_bytes(b"other")
        os.utime(path, ns=(1, 1))
        self.assertEqual(cache.read(str(path), os.stat(path)), b"other")

    def test_unchanged_file_is_not_read_again(self) -> None:
        """An unchanged file's bytes come from memory (its stat still matches)."""
        path = self.folder / "a.txt"
        path.write_bytes(b"kept")
        cache = web.SmallFileCache()
        status = os.stat(path)
        cache.read(str(path), status)
        os.chmod(path, 0)
        self.addCleanup(os.chmod, path, 0o644)
        self.assertEqual(cache.read(str(path), status), b"kept")

    def test_limit(self) -> None:
        """Past its byte limit the least recently used files are dropped."""
        cache = web.SmallFileCache(limit=10)
        for name in "abc":
            path = self.folder / name
            path.write_bytes(b"12345")
            cache.read(str(path), os.stat(path))
        self.assertEqual(cache.held, 10)

    def test_grown_file(self) -> None:
        """A file that grew past the small-file limit is not served from memory."""
        path = self.folder / "big"
        path.write_bytes(b"x" * (web.SMALL_FILE_LIMIT + 1))
        self.assertIsNone(web.SmallFileCache().read(str(path), os.stat(path)))


class BufferedLogFileTests(unittest.TestCase):
    """
    `web.BufferedLogFile` writes its lines within a second, at once past its
    batch size, and on close.
    """

    def setUp(self) -> None:
        self.folder = support.temporary_folder("web-cache-")
        self.clock = task.Clock()
        self.log = web.BufferedLogFile(self.folder / "a.log", scheduler=self.clock)
        self.path = self.folder / "a.log"

    def test_within_a_second(self) -> None:
        """A line reaches the file once a second has passed, not before."""
        self.log.write("one\n")
        self.assertEqual(self.path.read_bytes(), b"")
        self.clock.advance(1)
        self.assertEqual(self.path.read_bytes(), b"one\n")

    def test_batch_size(self) -> None:
        """Lines past the batch size are written at once."""
        line = "x" * 1023 + "\n"
        for _ in range(web.BufferedLogFile.flush_size // len(line)):
            self.log.write(line)
        self.assertEqual(len(self.path.read_bytes()), web.BufferedLogFile.flush_size)

    def test_close(self) -> None:
        """Closing writes what is held, and no write is left scheduled."""
        self.log.write("last\n")
        self.log.close()
        self.assertEqual(self.path.read_bytes(), b"last\n")
        self.assertEqual(self.clock.getDelayedCalls(), [])


class AccessLogLineTests(unittest.TestCase):
    """
    `web.access_log_line` quotes fields as the combined log format does.
    """

    def test_escapes(self) -> None:
        """Quotes, backslashes and bytes outside ASCII are escaped."""
        request = DummyRequest([b""])
        request.uri = b'/a"b\\c\xff?secret=1'
        request.clientproto = b"HTTP/1.1"
        request.code = 200
        request.sentLength = 12
        request.requestHeaders.setRawHeaders(b"user-agent", [b"ag'ent\""])
        request.requestHeaders.setRawHeaders(b"referer", [b"https://r/?q=2"])
        line = web.access_log_line("[t]", request)
        self.assertIn('"GET /a\\"b\\\\c\\xff HTTP/1.1"', line)
        self.assertIn('"https://r/" "ag\'ent\\""', line)
        self.assertNotIn("secret", line)


class FastPathTests(_ListenerCase):
    """
    Over real connections, a remembered path never serves a changed or
    escaped file.
    """

    @defer.inlineCallbacks
    def test_changed_file(self) -> Any:
        """A file changed after it was served is served anew."""
        yield self.start()
        path = self.layout.web_folder / "page.txt"
        path.write_bytes(b"before")
        out, _, _ = yield self.get("/page.txt")
        self.assertEqual(_body(out), b"before")
        path.write_bytes(b"after!")
        os.utime(path, ns=(10**9, 10**9))
        out, _, _ = yield self.get("/page.txt")
        self.assertEqual(_body(out), b"after!")

    @defer.inlineCallbacks
    def test_replaced_by_symlink_outside(self) -> Any:
        """A served file replaced by a link leaving the WebFolder is refused."""
        yield self.start()
        outside = self.layout.path / "secret.txt"
        outside.write_bytes(b"secret")
        path = self.layout.web_folder / "page.txt"
        path.write_bytes(b"public")
        out, _, _ = yield self.get("/page.txt")
        self.assertEqual(_body(out), b"public")
        path.unlink()
        path.symlink_to(outside)
        out, _, _ = yield self.get("/page.txt")
        self.assertIn(b" 404 ", out.split(b"\r\n", 1)[0])
        self.assertNotIn(b"secret", out)

    @defer.inlineCallbacks
    def test_removed_file(self) -> Any:
        """A served file that is removed is answered 404."""
        yield self.start()
        path = self.layout.web_folder / "page.txt"
        path.write_bytes(b"public")
        yield self.get("/page.txt")
        path.unlink()
        out, _, _ = yield self.get("/page.txt")
        self.assertIn(b" 404 ", out.split(b"\r\n", 1)[0])

    @defer.inlineCallbacks
    def test_head_and_conditional(self) -> Any:
        """HEAD and If-None-Match answers of a remembered file carry no body."""
        yield self.start()
        path = self.layout.web_folder / "page.txt"
        path.write_bytes(b"public")
        out, _, _ = yield self.get("/page.txt")
        etag = [
            line.split(b":", 1)[1].strip()
            for line in out.split(b"\r\n")
            if line.lower().startswith(b"etag:")
        ][0]
        out, _, _ = yield self.get("/page.txt", "--head")
        self.assertIn(b"content-length: 6", out.lower())
        self.assertEqual(_body(out), b"")
        out, _, _ = yield self.get(
            "/page.txt", "--header", "If-None-Match: " + etag.decode()
        )
        self.assertIn(b" 304 ", out.split(b"\r\n", 1)[0])
        self.assertEqual(_body(out), b"")
