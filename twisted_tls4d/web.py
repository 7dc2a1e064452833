"""
The web server: the root's WebFolder (and, if configured, a WSGI application)
over HTTPS, with HSTS, and plain HTTP beside it that either serves the same
site or, with HSTS on, redirects every request to HTTPS.

Requests are bounded in size and time, and each listener writes an access
log in the combined format, without query strings; the number of connections
is bounded by the guard of every listener (`twisted_tls4d.guard`).
"""

from __future__ import annotations

import fcntl
import os
import re
import stat as stat_module
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from service_identity import VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.logger import Logger
from twisted.python import reflect
from twisted.web import http, resource, server, static
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest

from twisted_tls4d.errors import ConfigurationError

_log = Logger()

#: The size at which an access log is rotated, in bytes, and how many rotated
#: files are kept beside it.
ACCESS_LOG_ROTATE_LENGTH = 10 * 1000 * 1000
ACCESS_LOG_KEPT = 10

#: Files up to this size are answered from memory in one write, without a
#: producer; larger ones, and every byte-range request, stream from disk.
SMALL_FILE_LIMIT = 64 * 1024

#: The most request paths the web server remembers the file of.
KNOWN_PATHS = 4096

#: The most bytes of small files kept in memory at once.
SMALL_FILE_CACHE_BYTES = 16 * 1024 * 1024

#: How often, in seconds, an access log checks whether it is due for
#: rotation or another process rotated it.
ACCESS_LOG_CHECK_INTERVAL = 1.0

#: Header names an operator may not set with ``--add-header``: HSTS has its
#: own options (and must never go over plain HTTP), and the others belong to
#: the HTTP framing.
_RESERVED_HEADERS = frozenset(
    {
        "strict-transport-security",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
    }
)

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def parse_header(text: str) -> tuple[bytes, bytes]:
    """
    Parse an ``--add-header`` value.

    Args:
        text: ``"Name: value"``.

    Returns:
        The header's name and value.

    Raises:
        ConfigurationError: The text has no colon, the name is not an HTTP
            token or is reserved, or the value holds a line break.
    """
    name, colon, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not colon or not _TOKEN.match(name):
        msg = (
            f"add-header {text!r} is not 'Name: value' with a header name made "
            "of letters, digits and -; write it like 'X-Frame-Options: DENY'."
        )
        raise ConfigurationError(msg)
    if name.lower() in _RESERVED_HEADERS:
        msg = f"add-header cannot set {name}: " + (
            "use --hsts (with --hsts-max-age, --hsts-include-subdomains and "
            "--hsts-preload), which never sends it over plain HTTP."
            if name.lower() == "strict-transport-security"
            else "the HTTP framing sets it."
        )
        raise ConfigurationError(msg)
    if any(c in value for c in "\r\n\x00"):
        msg = f"add-header {name}: the value must be one line; got {value!r}."
        raise ConfigurationError(msg)
    try:
        return name.encode("ascii"), value.encode("latin-1")
    except UnicodeEncodeError as e:
        msg = (
            f"add-header {name}: the value {value!r} has characters HTTP headers "
            "cannot carry; use ASCII."
        )
        raise ConfigurationError(msg) from e


def hsts_header(
    max_age: int, *, include_subdomains: bool = False, preload: bool = False
) -> str:
    """
    Args:
        max_age: Seconds browsers should remember to use HTTPS only.
        include_subdomains: Whether the rule covers every subdomain too.
        preload: Whether to ask to be listed in browsers' preload lists.

    Returns:
        The ``Strict-Transport-Security`` header's value.
    """
    value = f"max-age={max_age}"
    if include_subdomains:
        value += "; includeSubDomains"
    if preload:
        value += "; preload"
    return value


def _inside(path: str, top: str) -> bool:
    real = os.path.realpath(path)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


class AppFallback(resource.Resource):
    """
    Hands a request that no file of the WebFolder answers to a WSGI
    application, with the whole request path as its ``PATH_INFO``.
    """

    isLeaf = True

    def __init__(self, app: Any) -> None:
        super().__init__()
        self.app = app

    def render(self, request: Any) -> Any:
        """
        Returns:
            What the application renders.
        """
        request.postpath = request.prepath + request.postpath
        request.prepath = []
        return self.app.render(request)


def _signature(status: os.stat_result) -> tuple[int, ...]:
    """
    Returns:
        What tells a file apart from its earlier self: its device and inode,
        size, and the times of its last change of content and of metadata
        (a ``chmod`` moves the latter).
    """
    return (
        status.st_dev,
        status.st_ino,
        status.st_size,
        status.st_mtime_ns,
        status.st_ctime_ns,
    )


class SmallFileCache:
    """
    The bytes of recently served small files, each kept with the identity,
    size and modification time it was read with, so that a file changed on
    disk is read again; the least recently used files leave first once the
    cache holds more than its byte limit.

    Attributes:
        limit: The most bytes held.
        held: The bytes held now.
    """

    def __init__(self, limit: int = SMALL_FILE_CACHE_BYTES) -> None:
        self.limit = limit
        self.held = 0
        self._files: OrderedDict[str, tuple[tuple[int, ...], bytes]] = OrderedDict()

    def read(self, path: str, status: os.stat_result) -> bytes | None:
        """
        Args:
            path: A regular file of at most `SMALL_FILE_LIMIT` bytes.
            status: What ``os.stat`` says of it now.

        Returns:
            Its bytes: the kept ones if it is unchanged, else read now; None
            if it has grown past `SMALL_FILE_LIMIT` meanwhile.

        Raises:
            OSError: It cannot be read.
        """
        signature = _signature(status)
        kept = self._files.get(path)
        if kept is not None and kept[0] == signature:
            self._files.move_to_end(path)
            return kept[1]
        with open(path, "rb") as handle:
            signature = _signature(os.fstat(handle.fileno()))
            data = handle.read(SMALL_FILE_LIMIT + 1)
        if kept is not None:
            self.held -= len(kept[1])
            del self._files[path]
        if len(data) > SMALL_FILE_LIMIT:
            return None
        if signature[2] == len(data):
            self._files[path] = (signature, data)
            self.held += len(data)
            while self.held > self.limit:
                _, (_, dropped) = self._files.popitem(last=False)
                self.held -= len(dropped)
        return data


class WebFolder(static.File):
    """
    The static files of a folder: ``index.html`` for a folder that has one,
    byte ranges, ``Last-Modified`` and ``ETag`` validators; a folder's listing
    only when asked for; never a file whose real path (symbolic links
    resolved) lies outside the folder.

    Attributes:
        top: The real path of the served folder.
        listing: Whether a folder without ``index.html`` is listed.
        fallback: What answers a path no file covers (a WSGI application), or
            None for 404.
    """

    top: str
    listing: bool = False
    fallback: resource.Resource | None = None
    small_files: SmallFileCache

    @classmethod
    def serve(
        cls,
        folder: Path,
        *,
        listing: bool = False,
        fallback: resource.Resource | None = None,
    ) -> WebFolder:
        """
        Args:
            folder: The folder to serve.
            listing: List folders without ``index.html``.
            fallback: What answers paths no file covers; 404 if None.

        Returns:
            The resource of the folder.
        """
        files = cls(str(folder))
        files.top = os.path.realpath(folder)
        files.listing = listing
        files.fallback = fallback
        files.small_files = SmallFileCache()
        not_found: Any = fallback
        if not_found is None:
            not_found = resource.NoResource("No such page.")
        files.childNotFound = not_found
        return files

    def createSimilarFile(self, path: str) -> WebFolder:  # noqa: N802 (Twisted's name)
        """
        Returns:
            The resource of a file or folder below this one, with the same
            settings.
        """
        similar = super().createSimilarFile(path)
        similar.top = self.top
        similar.listing = self.listing
        similar.fallback = self.fallback
        similar.small_files = self.small_files
        return similar  # type: ignore[no-any-return]

    def getChild(self, path: bytes, request: Any) -> Any:  # noqa: N802 (Twisted's name)
        """
        Find a file or folder as `static.File` does, refusing one whose real
        path leaves the served folder (a symbolic link pointing outside).

        Returns:
            Its resource, or the not-found resource.
        """
        if b"\x00" in path:
            return self.childNotFound
        child = super().getChild(path, request)
        if isinstance(child, static.File) and not _inside(child.path, self.top):
            _log.warn(
                "Refused to serve {path}: it resolves to {real}, outside the "
                "WebFolder {top}",
                path=child.path,
                real=os.path.realpath(child.path),
                top=self.top,
            )
            return self.childNotFound
        return child

    def listNames(self) -> list[str]:  # noqa: N802 (Twisted's name)
        """
        Returns:
            The names a listing shows: those whose real path stays inside
            the served folder.
        """
        return [
            name
            for name in super().listNames()
            if _inside(os.path.join(self.path, name), self.top)
        ]

    def directoryListing(self) -> resource.Resource:  # noqa: N802 (Twisted's name)
        """
        Returns:
            The folder's listing if listings are on; else the fallback, or a
            404 page.
        """
        if self.listing:
            return super().directoryListing()  # type: ignore[no-any-return,no-untyped-call]
        return self.childNotFound

    def render_GET(self, request: Any) -> Any:  # noqa: N802 (Twisted's name)
        """
        Serve the file as `static.File` does, with an ``ETag`` of its size
        and modification time, answering ``If-None-Match`` with 304; a small
        file (`SMALL_FILE_LIMIT`) asked for whole is answered from memory in
        one write.

        Returns:
            The body, or NOT_DONE_YET while a producer sends it.
        """
        try:
            status = os.stat(self.path)
        except OSError:
            return super().render_GET(request)
        if not stat_module.S_ISREG(status.st_mode):
            return super().render_GET(request)
        etag = f'"{status.st_mtime_ns:x}-{status.st_size:x}"'.encode("ascii")
        if request.setETag(etag) is http.CACHED:
            return b""
        if status.st_size > SMALL_FILE_LIMIT or request.getHeader(b"range"):
            return super().render_GET(request)
        try:
            data = self.small_files.read(self.path, status)
        except OSError:
            data = None
        if data is None:
            return super().render_GET(request)
        if request.getHeader(b"if-none-match") is not None or (
            request.getHeader(b"if-modified-since") is None
        ):
            request.setHeader(b"last-modified", self._last_modified(status))
        elif request.setLastModified(int(status.st_mtime)) is http.CACHED:
            return b""
        if self.type is None:
            self.type, self.encoding = static.getTypeAndEncoding(
                self.basename(),
                self.contentTypes,
                self.contentEncodings,
                self.defaultType,
            )
        request.setHeader(b"accept-ranges", b"bytes")
        self._setContentHeaders(request, len(data))
        if request.method == b"HEAD":
            return b""
        return data

    render_HEAD = render_GET

    def _last_modified(self, status: os.stat_result) -> bytes:
        """
        Returns:
            The ``Last-Modified`` value of a file, formatted once for each
            modification time.
        """
        kept = getattr(self, "_last_modified_kept", None)
        if kept is None or kept[0] != status.st_mtime_ns:
            kept = (status.st_mtime_ns, http.datetimeToString(int(status.st_mtime)))
            self._last_modified_kept = kept
        return kept[1]  # type: ignore[no-any-return]


class RedirectToHTTPS(resource.Resource):
    """
    Answers every plain HTTP request with a 301 to the same path and query on
    the HTTPS port. The target host is ``server_name`` if set; otherwise the
    request's ``Host``, if the server's certificate covers it. Any other
    ``Host`` is answered 400, so a forged header cannot make this server
    redirect a browser elsewhere.

    Attributes:
        certificate: The HTTPS certificate, whose names may be redirected to;
            replaced when a reload brings a new one.
        https_port: The port in the redirect; set once the HTTPS listener is
            bound (it may have asked for port 0).
        server_name: The one host name redirects go to, or None.
    """

    isLeaf = True

    def __init__(
        self,
        certificate: x509.Certificate | None,
        https_port: int,
        server_name: str | None = None,
    ) -> None:
        super().__init__()
        self.certificate = certificate
        self.https_port = https_port
        self.server_name = server_name

    def render(self, request: Any) -> bytes:
        """
        Returns:
            A short page; the status and ``Location`` say what to do.
        """
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if not request.uri.startswith(b"/"):
            request.setResponseCode(400)
            return b"This server answers only requests for a path ('GET /...').\n"
        host = self.server_name
        if host is None:
            host = _split_host(request.getHeader(b"host") or b"")
            certificate = self.certificate
            if (
                host is None
                or certificate is None
                or not certificate_covers(certificate, host)
            ):
                request.setResponseCode(400)
                return b"This server answers plain HTTP only for its own host names.\n"
        authority = f"[{host}]" if ":" in host else host
        if self.https_port != 443:
            authority += f":{self.https_port}"
        location = f"https://{authority}".encode("ascii") + bytes(request.uri)
        request.setResponseCode(301)
        request.setHeader(b"location", location)
        return b"Moved permanently to " + location + b"\n"


def _split_host(host_header: bytes) -> str | None:
    """
    The host name or address of a ``Host`` header, without its port; None if
    the header is malformed.
    """
    try:
        host = host_header.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    if host.startswith("["):
        end = host.find("]")
        if end < 0 or not isIPv6Address(host[1:end]):
            return None
        return host[1:end]
    name, _, port = host.partition(":")
    if port and not port.isdigit():
        return None
    if not name or any(c in name for c in "/\\?#@ "):
        return None
    return name.lower()


def certificate_covers(certificate: x509.Certificate, host: str) -> bool:
    """
    Args:
        certificate: A server certificate.
        host: A host name or IP address.

    Returns:
        Whether a client dialling ``host`` would accept ``certificate``'s
        names (service-identity's rules, wildcards included).
    """
    try:
        if isIPAddress(host) or isIPv6Address(host):
            verify_certificate_ip_address(certificate, host)
        else:
            verify_certificate_hostname(certificate, host)
    except (VerificationError, ValueError):
        return False
    return True


@attrs.frozen
class Limits:
    """
    What one request may take.

    Attributes:
        max_request_size: The largest request body, in bytes; a larger one
            is answered 413.
        request_timeout: Seconds from a request's first byte (HTTP/1.1) or
            its headers (HTTP/2) to its last byte; a slower request is
            answered 408 (HTTP/1.1) or reset (HTTP/2).
    """

    max_request_size: int = 2_000_000
    request_timeout: float = 30.0


class LimitedRequest(server.Request):
    """
    A request bounded by its site's `Limits`. Over HTTP/1.1 an oversized or
    late request is answered at once and its connection closed, so its body
    is never read; over HTTP/2 an oversized body is dropped as it arrives
    and answered 413 when the stream ends, and a late stream is reset.
    """

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        self._received = 0
        self._refused = False
        self._too_large = False
        site = getattr(channel, "site", None)
        self._limits: Limits = getattr(site, "limits", None) or Limits()
        reactor = getattr(site, "reactor", None)
        self._deadline: Any = None
        if reactor is not None:
            spent = 0.0
            if isinstance(channel, WebChannel):
                began = channel.request_began()
                if began is not None:
                    spent = reactor.seconds() - began
            self._deadline = reactor.callLater(
                max(self._limits.request_timeout - spent, 0), self._too_slow
            )

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _peer(self) -> str:
        address = self.getClientAddress()
        host, port = getattr(address, "host", "?"), getattr(address, "port", "?")
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _answer_now(self, code: int, phrase: bytes, body: bytes) -> None:
        """
        Answer an HTTP/1.1 request before it is fully received, and close
        its connection.
        """
        self._refused = True
        self._cancel_deadline()
        headers = Headers()
        headers.setRawHeaders(b"content-type", [b"text/plain; charset=utf-8"])
        headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
        headers.setRawHeaders(b"connection", [b"close"])
        for name, value in getattr(
            getattr(self.channel, "site", None), "extra_headers", ()
        ):
            headers.addRawHeader(name, value)
        self.channel.writeHeaders(b"HTTP/1.1", b"%d" % code, phrase, headers)
        self.channel.write(body)
        self.channel.loseConnection()

    def _over_limit(self) -> None:
        _log.warn(
            "Refused a request body over {limit} bytes from {peer} (413); "
            "--max-request-size sets the limit",
            limit=self._limits.max_request_size,
            peer=self._peer(),
        )
        if isinstance(self.channel, http.HTTPChannel):
            self._answer_now(
                413,
                b"Content Too Large",
                b"The request body is larger than this server accepts.\n",
            )
        else:
            self._too_large = True

    def _too_slow(self) -> None:
        self._deadline = None
        _log.warn(
            "{peer} did not send its whole request within {timeout} s; closed "
            "(--request-timeout sets the limit)",
            peer=self._peer(),
            timeout=self._limits.request_timeout,
        )
        if isinstance(self.channel, http.HTTPChannel):
            self._answer_now(
                408,
                b"Request Timeout",
                b"The request did not arrive in time.\n",
            )
        else:
            self._refused = True
            self.channel.abortConnection()

    def gotLength(self, length: int | None) -> None:  # noqa: N802 (Twisted's name)
        """
        Refuse a declared body length over the limit; else prepare for the
        body as usual.
        """
        if length is not None and length > self._limits.max_request_size:
            # No "100 Continue" for a body that is refused.
            self.requestHeaders.removeHeader(b"expect")
            super().gotLength(0)
            self._over_limit()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        """
        Keep a chunk of the body while the body stays within the limit.
        """
        if self._refused or self._too_large:
            return
        self._received += len(data)
        if self._received > self._limits.max_request_size:
            self._over_limit()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:  # noqa: N802 (Twisted's name)
        """
        Process the complete request, unless it was answered already.
        """
        self._cancel_deadline()
        if self._refused:
            return
        super().requestReceived(command, path, version)

    def process(self) -> None:
        """
        Answer 413 for an HTTP/2 request whose body was too large; else find
        and render the resource as usual.
        """
        if self._too_large:
            for name, value in getattr(
                getattr(self.channel, "site", None), "extra_headers", ()
            ):
                self.responseHeaders.addRawHeader(name, value)
            self.setResponseCode(413)
            self.setHeader(b"content-type", b"text/plain; charset=utf-8")
            self.write(b"The request body is larger than this server accepts.\n")
            self.finish()
            return
        super().process()

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 (Twisted's name)
        """
        Stop the request's clock, then end it as usual.
        """
        self._cancel_deadline()
        super().connectionLost(reason)


class WebChannel(http.HTTPChannel):
    """
    An HTTP/1.1 connection whose requests are timed from their first byte:
    Twisted makes a request only once its first line is complete, so a
    client sending that line a byte at a time would otherwise be bounded
    only by the idle timeout between bytes. A request line not complete
    within the site's ``request_timeout`` is answered 408 and the connection
    closed; once it is, `LimitedRequest` times the rest with what is left.
    """

    _began: float | None = None
    _line_deadline: Any = None

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted's name)
        """
        Start the request's clock at the first byte received while no
        request is in progress, then read as usual.
        """
        site = getattr(self, "site", None)
        limits = getattr(site, "limits", None)
        reactor = getattr(site, "reactor", None)
        if (
            data
            and not self.requests
            and self._line_deadline is None
            and limits is not None
            and reactor is not None
        ):
            self._began = reactor.seconds()
            self._line_deadline = reactor.callLater(
                limits.request_timeout, self._line_too_slow
            )
        super().dataReceived(data)

    def request_began(self) -> float | None:
        """
        Stop timing the request line: a request was made of it.

        Returns:
            When the request's first byte arrived (reactor seconds), or None
            if that was not timed.
        """
        began, self._began = self._began, None
        self._cancel_line_deadline()
        return began

    def _cancel_line_deadline(self) -> None:
        deadline, self._line_deadline = self._line_deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def _line_too_slow(self) -> None:
        self._line_deadline = None
        site = getattr(self, "site", None)
        limits: Limits = site.limits  # type: ignore[union-attr]
        address = self.transport.getPeer()  # type: ignore[union-attr]
        host = getattr(address, "host", "?")
        port = getattr(address, "port", "?")
        _log.warn(
            "{peer} did not send its whole request within {timeout} s; closed "
            "(--request-timeout sets the limit)",
            peer=f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
            timeout=limits.request_timeout,
        )
        body = b"The request did not arrive in time.\n"
        headers = Headers()
        headers.setRawHeaders(b"content-type", [b"text/plain; charset=utf-8"])
        headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
        headers.setRawHeaders(b"connection", [b"close"])
        for name, value in getattr(site, "extra_headers", ()):
            headers.addRawHeader(name, value)
        self.writeHeaders(b"HTTP/1.1", b"408", b"Request Timeout", headers)
        self.write(body)
        self.loseConnection()

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 (Twisted's name)
        """
        Stop the request line's clock, then end as usual.
        """
        self._cancel_line_deadline()
        super().connectionLost(reason)


def _web_channel(factory: Any) -> Any:
    """
    Returns:
        What Twisted's own channel factory returns (a protocol that switches
        to HTTP/2 when ALPN chose it), around a `WebChannel`. Twisted offers
        no public way to change the HTTP/1.1 channel and keep that switch,
        so this names its private proxy class; tests of the request timeout
        fail if a Twisted release changes it.
    """
    return http._GenericHTTPChannelProtocol(WebChannel())


def _log_field(value: bytes) -> str:
    """
    Returns:
        ``value`` as the combined log format quotes it: printable ASCII as
        is, other bytes as ``\\xNN``, double quotes and backslashes escaped.
    """
    text = value.decode("ascii", "backslashreplace")
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text
    escaped = repr(value)[2:-1]
    if repr(value)[1] == "'":
        escaped = escaped.replace("\\'", "'").replace('"', '\\"')
    return escaped


def access_log_line(timestamp: str, request: IRequest) -> str:
    """
    Format a request for the access log: the combined log format, with the
    query string left out of the request line and of the referrer.

    Args:
        timestamp: The time, as the access log writes it.
        request: The answered request.

    Returns:
        One line, without its line break.
    """
    client = request.getClientAddress()
    host = getattr(client, "host", None)
    ip = _log_field(host.encode("ascii")) if isinstance(host, str) else "-"
    referrer = request.getHeader(b"referer")
    if referrer is not None:
        referrer = referrer.split(b"?", 1)[0].split(b"#", 1)[0]
    agent = request.getHeader(b"user-agent")
    uri = request.uri.split(b"?", 1)[0]  # type: ignore[attr-defined]
    length = request.sentLength or "-"  # type: ignore[attr-defined]
    return (
        f'"{ip}" - - {timestamp} "{_log_field(request.method)} {_log_field(uri)} '
        f'{_log_field(request.clientproto)}" {request.code} {length} '  # type: ignore[attr-defined]
        f'"{_log_field(referrer or b"-")}" "{_log_field(agent or b"-")}"'
    )


class WebSite(server.Site):
    """
    A site that adds fixed headers to every answer (HSTS over HTTPS, the
    operator's ``--add-header``), bounds each request by `Limits`, and
    writes its access log to a rotated file.

    Attributes:
        extra_headers: Headers added to every answer.
        limits: What one request may take.
    """

    requestFactory = LimitedRequest
    protocol = _web_channel

    def __init__(
        self,
        root: resource.Resource,
        *,
        extra_headers: Sequence[tuple[bytes, bytes]] = (),
        limits: Limits | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, logFormatter=access_log_line, **kwargs)
        self.extra_headers = list(extra_headers)
        self.limits = limits or Limits()
        self._files_by_path: OrderedDict[bytes, tuple[WebFolder, tuple[int, ...]]] = (
            OrderedDict()
        )

    def getResourceFor(self, request: IRequest) -> Any:  # noqa: N802 (Twisted's name)
        """
        Set the extra headers, then find the resource: for a GET or HEAD of a
        path that led to a file before, that file's resource while the file
        is the same one (device, inode, size and modification time), without
        walking the folders again; else as usual.
        """
        for name, value in self.extra_headers:
            request.responseHeaders.addRawHeader(name, value)
        if request.method not in (b"GET", b"HEAD"):
            return super().getResourceFor(request)
        path = request.path  # type: ignore[attr-defined]
        known = self._files_by_path.get(path)
        if known is not None:
            found, signature = known
            try:
                unchanged = _signature(os.stat(found.path)) == signature
            except OSError:
                unchanged = False
            if unchanged:
                self._files_by_path.move_to_end(path)
                # Where walking the folders would have left the request.
                request.site = self  # type: ignore[attr-defined]
                request.sitepath = list(request.prepath)  # type: ignore[attr-defined]
                request.prepath += request.postpath  # type: ignore[attr-defined]
                request.postpath = []  # type: ignore[attr-defined]
                return found
            del self._files_by_path[path]
        found = super().getResourceFor(request)
        if isinstance(found, WebFolder):
            try:
                status = os.stat(found.path)
            except OSError:
                return found
            if stat_module.S_ISREG(status.st_mode):
                self._files_by_path[path] = (found, _signature(status))
                if len(self._files_by_path) > KNOWN_PATHS:
                    self._files_by_path.popitem(last=False)
        return found

    def _openLogFile(self, path: str | bytes) -> Any:  # noqa: N802 (Twisted's name)
        """
        Returns:
            The access log, written at most a second after each request,
            rotated at `ACCESS_LOG_ROTATE_LENGTH` bytes with `ACCESS_LOG_KEPT`
            old files kept (``access.log.1`` the newest).
        """
        return BufferedLogFile(Path(os.fsdecode(path)), scheduler=self.reactor)


class AccessLogFile:
    """
    An access log that several processes append to at once: the twistd
    process and its workers (``--workers``). Each line is one append, so
    lines of different processes never mix; the process that finds the file
    at `ACCESS_LOG_ROTATE_LENGTH` bytes or more rotates it (``name.1`` the
    newest, `ACCESS_LOG_KEPT` kept) while holding a lock on it, and every
    process follows to the new file within `ACCESS_LOG_CHECK_INTERVAL`
    seconds, as after an outside rotation (logrotate).

    Attributes:
        path: The log file.
    """

    def __init__(
        self,
        path: Path,
        rotate_length: int = ACCESS_LOG_ROTATE_LENGTH,
        kept: int = ACCESS_LOG_KEPT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """
        Args:
            path: The log file; created (mode 0640) if missing.
            rotate_length: The size in bytes at which it is rotated.
            kept: How many rotated files are kept.
            clock: Seconds, for the checks' interval.

        Raises:
            OSError: The file cannot be opened for appending.
        """
        self.path = path
        self._rotate_length = rotate_length
        self._kept = kept
        self._clock = clock
        self._fd = self._open()
        self._checked = clock()

    def _open(self) -> int:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o640)
        except FileExistsError:
            return os.open(self.path, flags)
        os.fchmod(fd, 0o640)
        return fd

    def write(self, data: bytes | str) -> None:
        """
        Append ``data`` (one or more whole lines) to the log.
        """
        if isinstance(data, str):
            data = data.encode("utf-8")
        now = self._clock()
        if now - self._checked >= ACCESS_LOG_CHECK_INTERVAL:
            self._checked = now
            self._follow()
        os.write(self._fd, data)

    def _follow(self) -> None:
        """
        Rotate the file if it is due, or reopen it if another process (or an
        outside tool) moved it away.
        """
        if os.fstat(self._fd).st_size >= self._rotate_length:
            self._rotate()
            return
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            self._reopen()
            return
        mine = os.fstat(self._fd)
        if (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
            self._reopen()

    def _rotate(self) -> None:
        """
        Under an exclusive lock on the file, shift the rotated files by one
        and move the file to ``name.1``, unless another process already did;
        then write to the file now at `path`.
        """
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(self._fd)
            if current is not None and (current.st_dev, current.st_ino) == (
                mine.st_dev,
                mine.st_ino,
            ):
                for number in range(self._kept - 1, 0, -1):
                    older = self.path.with_name(f"{self.path.name}.{number}")
                    if older.exists():
                        older.rename(older.with_name(f"{self.path.name}.{number + 1}"))
                self.path.rename(self.path.with_name(f"{self.path.name}.1"))
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._reopen()

    def _reopen(self) -> None:
        fd = self._open()
        os.close(self._fd)
        self._fd = fd

    def flush(self) -> None:
        """
        Nothing to do: every write reaches the file at once.
        """

    def close(self) -> None:
        """
        Close the file.
        """
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class BufferedLogFile(AccessLogFile):
    """
    An `AccessLogFile` that gathers lines in memory and appends them at most
    `flush_delay` seconds later, or at once past `flush_size` bytes, in one
    write of whole lines, instead of one write per line; closing it writes
    what it holds.

    Attributes:
        scheduler: Schedules the delayed write (the reactor).
        flush_delay: Seconds a line may wait.
        flush_size: Bytes that are written at once.
    """

    flush_delay = 1.0
    flush_size = 64 * 1024

    def __init__(self, path: Path, *, scheduler: Any, **kwargs: Any) -> None:
        """
        Args:
            path: The log file, as for `AccessLogFile`.
            scheduler: An `IReactorTime` for the delayed write.
            kwargs: The other arguments of `AccessLogFile`.

        Raises:
            OSError: The file cannot be opened for appending.
        """
        self.scheduler = scheduler
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._delayed: Any = None
        super().__init__(path, **kwargs)

    def write(self, data: bytes | str) -> None:
        """
        Keep ``data`` (whole lines) for the next write to the file.
        """
        if isinstance(data, str):
            data = data.encode("utf-8")
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= self.flush_size:
            self.write_pending()
        elif self._delayed is None:
            self._delayed = self.scheduler.callLater(
                self.flush_delay, self.write_pending
            )

    def write_pending(self) -> None:
        """
        Append the lines held in memory to the file.
        """
        if self._delayed is not None:
            if self._delayed.active():
                self._delayed.cancel()
            self._delayed = None
        if self._pending:
            data = b"".join(self._pending)
            self._pending = []
            self._pending_size = 0
            super().write(data)

    def flush(self) -> None:
        """
        Write what is held.
        """
        self.write_pending()

    def close(self) -> None:
        """
        Write what is held, then close the file.
        """
        self.write_pending()
        super().close()


def load_wsgi_application(name: str) -> Callable[..., Any]:
    """
    Import a WSGI application by its dotted name.

    Args:
        name: ``package.module.attribute``.

    Returns:
        The application.

    Raises:
        ConfigurationError: The name cannot be imported or is not callable.
    """
    try:
        application = reflect.namedAny(name)
    except (
        reflect.ModuleNotFound,
        reflect.ObjectNotFound,
        AttributeError,
        ValueError,
    ) as e:
        msg = (
            f"--wsgi {name!r} names no importable object ({e}); give the full "
            "dotted name of the application, like myproject.wsgi.application, "
            "with its package on PYTHONPATH."
        )
        raise ConfigurationError(msg) from e
    except Exception as e:
        msg = f"--wsgi {name!r}: importing it failed: {e!r}."
        raise ConfigurationError(msg) from e
    if not callable(application):
        msg = (
            f"--wsgi {name!r} is a {type(application).__name__}, not a WSGI "
            "application (a callable taking environ and start_response)."
        )
        raise ConfigurationError(msg)
    return application  # type: ignore[no-any-return]


@attrs.frozen
class WebOptions:
    """
    How the web server serves.

    Attributes:
        hsts_max_age: With a value, HTTPS answers carry HSTS with that
            max-age and plain HTTP redirects to HTTPS; without, plain HTTP
            serves the same site.
        hsts_include_subdomains: Add ``includeSubDomains`` to HSTS.
        hsts_preload: Add ``preload`` to HSTS.
        server_name: The host plain HTTP redirects to; the request's own host
            (if the certificate covers it) when None.
        directory_listing: List folders without ``index.html``.
        wsgi: The dotted name of a WSGI application serving the paths no file
            covers, or None.
        extra_headers: ``Name: value`` headers added to every answer.
        limits: What one request may take.
        idle_timeout: Seconds a connection may stay silent (also bounds an
            unfinished TLS handshake).
        log_folder: Where the access logs go (``https-access.log``,
            ``http-access.log``); no access log if None.
    """

    hsts_max_age: int | None = None
    hsts_include_subdomains: bool = False
    hsts_preload: bool = False
    server_name: str | None = None
    directory_listing: bool = False
    wsgi: str | None = None
    extra_headers: Sequence[str] = ()
    limits: Limits = Limits()
    idle_timeout: float = 15.0
    log_folder: Path | None = None


def make_log_folder(folder: Path) -> None:
    """
    Create the access logs' folder (mode 0755) if it is missing.

    Args:
        folder: ``ROOT/Logs``.

    Raises:
        ConfigurationError: It cannot be created.
    """
    try:
        folder.mkdir(mode=0o755, exist_ok=True)
    except OSError as e:
        msg = (
            f"Cannot create the access log folder {folder}: {e.strerror}; make "
            "the root writable, or create the folder yourself."
        )
        raise ConfigurationError(msg) from e


def build_sites(
    web_folder: Path,
    options: WebOptions,
    *,
    https_port: int,
    reactor: Any,
) -> tuple[WebSite, WebSite, RedirectToHTTPS | None]:
    """
    Build the HTTPS and plain HTTP sites of the web server.

    Args:
        web_folder: The folder of static files.
        options: How to serve.
        https_port: The HTTPS port to redirect to.
        reactor: The reactor, for timeouts and the WSGI thread pool.

    Returns:
        The HTTPS site, the plain HTTP site, and the redirecting resource
        (None without HSTS), whose ``certificate`` the caller sets and whose
        ``https_port`` it updates once the HTTPS port is bound.

    Raises:
        ConfigurationError: A header, the WSGI application or the log folder
            cannot be used.
    """
    headers = [parse_header(text) for text in options.extra_headers]
    fallback = None
    if options.wsgi is not None:
        from twisted.web.wsgi import WSGIResource

        application = load_wsgi_application(options.wsgi)
        fallback = AppFallback(
            WSGIResource(reactor, reactor.getThreadPool(), application)
        )
    files = WebFolder.serve(
        web_folder, listing=options.directory_listing, fallback=fallback
    )
    if options.log_folder is not None:
        make_log_folder(options.log_folder)

    def site(
        root: resource.Resource, log_name: str, hsts: str | None = None
    ) -> WebSite:
        extra = list(headers)
        if hsts is not None:
            extra.insert(0, (b"strict-transport-security", hsts.encode("ascii")))
        log_path = (
            str(options.log_folder / log_name)
            if options.log_folder is not None
            else None
        )
        return WebSite(
            root,
            extra_headers=extra,
            limits=options.limits,
            logPath=log_path,
            timeout=options.idle_timeout,
            reactor=reactor,
        )

    if options.hsts_max_age is None:
        return (
            site(files, "https-access.log"),
            site(files, "http-access.log"),
            None,
        )
    hsts = hsts_header(
        options.hsts_max_age,
        include_subdomains=options.hsts_include_subdomains,
        preload=options.hsts_preload,
    )
    redirect = RedirectToHTTPS(None, https_port, options.server_name)
    return (
        site(files, "https-access.log", hsts),
        site(redirect, "http-access.log"),
        redirect,
    )


def https_protocols() -> list[bytes]:
    """
    Returns:
        The protocols the HTTPS listener offers by ALPN: HTTP/2 first when
        Twisted can speak it (the ``h2`` and ``priority`` packages, the
        ``http2`` extra), then HTTP/1.1.
    """
    return [b"h2", b"http/1.1"] if http.H2_ENABLED else [b"http/1.1"]


def options_from(settings: Any, log_folder: Path | None) -> WebOptions:
    """
    Args:
        settings: The server's `Settings`.
        log_folder: Where the access logs go, or None for none.

    Returns:
        The web server's part of the settings.
    """
    return WebOptions(
        hsts_max_age=settings.hsts_max_age if settings.hsts else None,
        hsts_include_subdomains=settings.hsts_include_subdomains,
        hsts_preload=settings.hsts_preload,
        server_name=settings.server_name,
        directory_listing=settings.directory_listing,
        wsgi=settings.wsgi,
        extra_headers=tuple(settings.add_header),
        limits=Limits(
            max_request_size=settings.max_request_size,
            request_timeout=settings.request_timeout,
        ),
        idle_timeout=settings.web_idle_timeout,
        log_folder=log_folder,
    )


def check_server_name(redirect: RedirectToHTTPS) -> None:
    """
    Warn if the redirect's ``server_name`` is not covered by the HTTPS
    certificate: browsers sent there would refuse the connection.

    Args:
        redirect: The plain HTTP redirect, with its certificate set.
    """
    name, certificate = redirect.server_name, redirect.certificate
    if name is None or certificate is None or certificate_covers(certificate, name):
        return
    _log.warn(
        "--server-name {name} is not among the names of the HTTPS certificate; "
        "browsers redirected there will refuse it: install a certificate for "
        "{name}, or change --server-name",
        name=name,
    )


def log_options(options: WebOptions) -> None:
    """
    Log how the web server serves: HSTS, the WSGI application, the access
    logs and the limits.

    Args:
        options: The web server's options.
    """
    if options.hsts_max_age is not None:
        _log.info(
            "HSTS on: HTTPS answers carry {header}; plain HTTP redirects to {target}",
            header=hsts_header(
                options.hsts_max_age,
                include_subdomains=options.hsts_include_subdomains,
                preload=options.hsts_preload,
            ),
            target=options.server_name
            or "the request's host, if the certificate covers it",
        )
    if options.wsgi is not None:
        _log.info(
            "WSGI application {name} answers what no WebFolder file covers",
            name=options.wsgi,
        )
    if options.log_folder is not None:
        _log.info(
            "Access logs (combined format, without query strings): {folder}",
            folder=str(options.log_folder),
        )
    _log.info(
        "Web limits: request bodies up to {size} bytes, requests within "
        "{request_timeout} s, idle connections closed after {idle_timeout} s; "
        "HTTP/2 {h2}",
        size=options.limits.max_request_size,
        request_timeout=options.limits.request_timeout,
        idle_timeout=options.idle_timeout,
        h2="on" if http.H2_ENABLED else "off (install the http2 extra)",
    )
