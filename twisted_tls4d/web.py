"""
The web server: the root's WebFolder over HTTPS, with HSTS, and plain HTTP
beside it that either serves the same site or, with HSTS on, redirects every
request to HTTPS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography import x509
from service_identity import VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.logger import Logger
from twisted.web import resource, server, static
from twisted.web.iweb import IRequest

_log = Logger()


class WebFolder(static.File):
    """
    Static files of a folder: an ``index.html`` for a folder that has one,
    and never a listing of a folder's content.
    """

    def directoryListing(self) -> resource.Resource:  # noqa: N802 (Twisted's name)
        """
        Returns:
            A 404 page instead of the folder's listing.
        """
        return resource.NoResource("No such page.")


class HSTSSite(server.Site):
    """
    A site that adds ``Strict-Transport-Security`` to every answer. Serve it
    over HTTPS only: browsers ignore the header over plain HTTP, and RFC 6797
    forbids sending it there.
    """

    def __init__(
        self, root: resource.Resource, header_value: str, **kwargs: Any
    ) -> None:
        super().__init__(root, **kwargs)
        self.hsts_value = header_value.encode("ascii")

    def getResourceFor(self, request: IRequest) -> Any:  # noqa: N802 (Twisted's name)
        """
        Set the HSTS header, then find the resource as usual.
        """
        request.setHeader(b"strict-transport-security", self.hsts_value)
        return super().getResourceFor(request)


def hsts_header(max_age: int) -> str:
    """
    Args:
        max_age: Seconds browsers should remember to use HTTPS only.

    Returns:
        The ``Strict-Transport-Security`` header's value.
    """
    return f"max-age={max_age}"


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


class RedirectToHTTPS(resource.Resource):
    """
    Answers every plain HTTP request with a 301 to the same path and query on
    the HTTPS port, for a host the server's certificate covers; any other
    ``Host`` is answered 400, so a forged header cannot make this server
    redirect a browser elsewhere.

    Attributes:
        certificate: The HTTPS certificate, whose names may be redirected to;
            replaced when a reload brings a new one.
        https_port: The port in the redirect; set once the HTTPS listener is
            bound (it may have asked for port 0).
    """

    isLeaf = True

    def __init__(self, certificate: x509.Certificate | None, https_port: int) -> None:
        super().__init__()
        self.certificate = certificate
        self.https_port = https_port

    def render(self, request: Any) -> bytes:
        """
        Returns:
            A short page; the status and ``Location`` say what to do.
        """
        host = _split_host(request.getHeader(b"host") or b"")
        certificate = self.certificate
        if (
            host is None
            or certificate is None
            or not certificate_covers(certificate, host)
        ):
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"This server answers plain HTTP only for its own host names.\n"
        authority = f"[{host}]" if ":" in host else host
        if self.https_port != 443:
            authority += f":{self.https_port}"
        location = f"https://{authority}".encode("ascii") + request.uri
        request.setResponseCode(301)
        request.setHeader(b"location", location)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"Moved permanently to " + location + b"\n"


def build_sites(
    web_folder: Path,
    *,
    hsts_max_age: int | None,
    https_port: int,
) -> tuple[server.Site, server.Site, RedirectToHTTPS | None]:
    """
    Build the HTTPS and plain HTTP sites of the web server.

    Args:
        web_folder: The folder of static files.
        hsts_max_age: With a value, HTTPS answers carry HSTS with that
            max-age and plain HTTP redirects to HTTPS; without, plain HTTP
            serves the same files.
        https_port: The HTTPS port to redirect to.

    Returns:
        The HTTPS site, the plain HTTP site, and the redirecting resource
        (None without HSTS), whose ``certificate`` the caller sets and whose
        ``https_port`` it updates once the HTTPS port is bound.
    """
    files = WebFolder(str(web_folder))
    if hsts_max_age is None:
        return server.Site(files), server.Site(files), None
    redirect = RedirectToHTTPS(None, https_port)
    return HSTSSite(files, hsts_header(hsts_max_age)), server.Site(redirect), redirect
