"""
``twistd tls4d``: the command-line options of the servers and the
``makeService`` the twistd plugin calls.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from twisted_tls4d import settings as settings_module
from twisted_tls4d import tls
from twisted_tls4d.errors import Tls4dError

_DEFAULTS = settings_module.Settings()

#: Flags: True when given; when not given, the settings file or the default.
_FLAGS = (
    "no_http",
    "strict",
    "hsts",
    "hsts_include_subdomains",
    "hsts_preload",
    "directory_listing",
    "app_no_sql",
)


def _port(value: str) -> int:
    return int(value)


_port.coerceDoc = "A TCP port; 0 takes a free one"  # type: ignore[attr-defined]


class Options(usage.Options):
    """
    Options of ``twistd tls4d``. An option not given falls back to the
    root's ``Settings/tls4d.toml``, then to the default shown.
    """

    synopsis = "[--web] [--app] [--sql] [--root DIR] [options]"
    longdesc = (
        "Runs the web (HTTPS), application and SQL servers of a server root, "
        "all over TLS. Each of --web, --app, --sql starts one server; with "
        "none of them, all three start. On first start the root gets a local "
        "CA, server keys and certificates, DH parameters and a start page; "
        "curl --cacert ROOT/Resources/ca.pem https://localhost:8443/ then "
        "answers. Options not given are read from ROOT/Settings/tls4d.toml "
        "(keys named like the options, e.g. https-port = 443)."
    )

    optFlags = [
        ["web", None, "Start the web server (HTTPS, and plain HTTP unless --no-http)."],
        ["app", None, "Start the application server (mutual TLS)."],
        ["sql", None, "Start the SQL server (mutual TLS)."],
        ["no-http", None, "Serve no plain HTTP beside HTTPS."],
        [
            "strict",
            None,
            "Refuse to start (or reload) while a private key file (key.pem, "
            "Resources/key.pem, Resources/ca-key.pem) is open to its group or "
            "to every user [default: warn, naming the chmod that fixes it].",
        ],
        [
            "hsts",
            None,
            "Send Strict-Transport-Security on HTTPS and redirect plain HTTP to HTTPS.",
        ],
        [
            "hsts-include-subdomains",
            None,
            "Add includeSubDomains to HSTS: every subdomain is HTTPS-only too.",
        ],
        [
            "hsts-preload",
            None,
            "Add preload to HSTS (needs --hsts-include-subdomains and a max-age "
            "of a year or more).",
        ],
        [
            "directory-listing",
            None,
            "List WebFolder folders that have no index.html [default: 404].",
        ],
        [
            "app-no-sql",
            None,
            "Refuse the application server's sql op to clients (handlers may "
            "still use the database).",
        ],
    ]

    optParameters: list[list[Any]] = [
        ["root", None, None, f"The server root folder [default: {_DEFAULTS.root}]."],
        [
            "interface",
            None,
            None,
            "The address every listener binds to [default: all addresses].",
        ],
        [
            "https-port",
            None,
            None,
            f"HTTPS port [default: {_DEFAULTS.https_port}].",
            _port,
        ],
        [
            "http-port",
            None,
            None,
            f"Plain HTTP port [default: {_DEFAULTS.http_port}].",
            _port,
        ],
        [
            "app-port",
            None,
            None,
            f"Application server port [default: {_DEFAULTS.app_port}].",
            _port,
        ],
        [
            "sql-port",
            None,
            None,
            f"SQL server port [default: {_DEFAULTS.sql_port}].",
            _port,
        ],
        [
            "min-tls",
            None,
            None,
            f"Lowest TLS version accepted, 1.2 or 1.3 [default: {_DEFAULTS.min_tls}].",
        ],
        [
            "ciphers",
            None,
            None,
            "OpenSSL cipher string for TLS 1.2 [default: Mozilla's intermediate "
            "list of forward-secret AEAD suites]. Refused if it selects "
            "nothing; suites without forward secrecy are named in a warning.",
        ],
        [
            "hsts-max-age",
            None,
            None,
            f"HSTS max-age in seconds [default: {_DEFAULTS.hsts_max_age}].",
            int,
        ],
        [
            "max-frame-size",
            None,
            None,
            "Largest application frame in bytes "
            f"[default: {_DEFAULTS.max_frame_size}].",
            int,
        ],
        [
            "max-line-length",
            None,
            None,
            f"Longest SQL line in bytes [default: {_DEFAULTS.max_line_length}].",
            int,
        ],
        [
            "handshake-timeout",
            None,
            None,
            "Seconds a client of any TLS listener has to complete its TLS "
            f"handshake [default: {_DEFAULTS.handshake_timeout:g}].",
            float,
        ],
        [
            "idle-timeout",
            None,
            None,
            "Seconds an application or SQL connection may stay idle "
            f"[default: {_DEFAULTS.idle_timeout:g}].",
            float,
        ],
        [
            "max-connections",
            None,
            None,
            "Most connections each listener (HTTPS, HTTP, application, SQL) "
            "holds open in each process (see --workers); more are closed as "
            "soon as they are accepted "
            f"[default: {_DEFAULTS.max_connections}].",
            int,
        ],
        [
            "max-connections-per-peer",
            None,
            None,
            "Most connections each listener holds open from one client address "
            f"[default: {_DEFAULTS.max_connections_per_peer}].",
            int,
        ],
        [
            "max-unsent",
            None,
            None,
            "Bytes that may wait for a client that does not read its answers, "
            "past the system's buffers, before it is cut off "
            f"[default: {_DEFAULTS.max_unsent}].",
            int,
        ],
        [
            "server-name",
            None,
            None,
            "With --hsts, the host plain HTTP redirects to [default: the "
            "request's Host, if the HTTPS certificate covers it].",
        ],
        [
            "wsgi",
            None,
            None,
            "Serve this WSGI application (a dotted name, e.g. "
            "myproject.wsgi.application) for paths no WebFolder file covers.",
        ],
        [
            "max-request-size",
            None,
            None,
            "Largest web request body in bytes; larger ones get 413 "
            f"[default: {_DEFAULTS.max_request_size}].",
            int,
        ],
        [
            "web-idle-timeout",
            None,
            None,
            "Seconds a web connection may stay silent, handshake included "
            f"[default: {_DEFAULTS.web_idle_timeout:g}].",
            float,
        ],
        [
            "request-timeout",
            None,
            None,
            "Seconds a client has to send a whole request once it started it "
            "(a web request, which gets 408 if slower; an application frame; an "
            f"SQL line) [default: {_DEFAULTS.request_timeout:g}].",
            float,
        ],
        [
            "sql-certificate-access",
            None,
            None,
            "SQL access level of a client certificate whose name is not an SQL "
            "user: read-only, read-write or full "
            f"[default: {_DEFAULTS.sql_certificate_access}].",
        ],
        [
            "sql-client-certificate",
            None,
            None,
            "required, or optional to let SQL clients without a certificate "
            "log in with a password (see 'tls4d users') "
            f"[default: {_DEFAULTS.sql_client_certificate}].",
        ],
        [
            "sql-database",
            None,
            None,
            "A postgresql:// URL: serve that PostgreSQL database (psycopg 3, "
            "the 'postgresql' extra) instead of the root's SQLite; full SQL "
            "users connect as its role (see docs/sql-protocol.md).",
        ],
        [
            "sql-database-read-write",
            None,
            None,
            "The postgresql:// URL of the role read-write SQL users connect as.",
        ],
        [
            "sql-database-read-only",
            None,
            None,
            "The postgresql:// URL of the role read-only SQL users connect as.",
        ],
        [
            "app-max-outstanding",
            None,
            None,
            "Most requests of one application client in progress at once; past "
            "it the server reads no more from that client until some are "
            f"answered [default: {_DEFAULTS.app_max_outstanding}].",
            int,
        ],
        [
            "app-handlers",
            None,
            None,
            "MODULE:ATTRIBUTE of an application's handlers (a "
            "twisted_tls4d.app.Registry) served beside the built-in ops.",
        ],
        [
            "app-allow",
            None,
            None,
            "Comma-separated certificate names the application server admits "
            "[default: every client its CA certified].",
        ],
        [
            "workers",
            None,
            None,
            "Processes that serve: this one and N-1 worker processes sharing "
            "its listening sockets, so that every CPU serves; limits such as "
            "--max-connections hold in each process [default: one per CPU, "
            f"{settings_module.default_workers()} here].",
            int,
        ],
        [
            "app-name",
            None,
            None,
            "The application server's name in its hello answer [default: the "
            "machine's host name].",
        ],
    ]

    def opt_add_header(self, header: str) -> None:
        """
        Add "Name: value" to every web answer (repeatable).
        """
        self.setdefault("add-header", []).append(header)

    settings: settings_module.Settings

    def postOptions(self) -> None:  # noqa: N802 (Twisted's name)
        """
        Combine the options with the settings file and check them.

        Raises:
            SystemExit: A value is invalid; one line on standard error says
                which and why.
        """
        given: dict[str, Any] = {}
        for key, value in self.items():
            name = key.replace("-", "_")
            if name in settings_module.SERVERS or name in _FLAGS:
                given[name] = True if value else None
            elif name != "root":
                given[name] = value
        root = Path(self["root"]) if self["root"] else settings_module.DEFAULT_ROOT
        try:
            self.settings = settings_module.resolve(given, root)
            tls.min_version_number(self.settings.min_tls)
            if self.settings.ciphers is not None:
                tls.tls12_suites(self.settings.ciphers)
        except Tls4dError as e:
            # A bad value, on the command line or in the settings file: one
            # line, not twistd's whole usage text.
            print(f"tls4d cannot start: {e}", file=sys.stderr)
            raise SystemExit(1) from e


def makeService(options: Options) -> IService:  # noqa: N802 (Twisted's name)
    """
    Build the servers from parsed options.

    Args:
        options: Parsed `Options`.

    Returns:
        The service twistd runs.

    Raises:
        SystemExit: The root cannot be created, or its keys, certificates or
            DH parameters cannot be used; one line on standard error names
            the file and the fix.
    """
    from twisted_tls4d.service import build_service

    try:
        service = build_service(options.settings)
    except Tls4dError as e:
        print(f"tls4d cannot start: {e}", file=sys.stderr)
        raise SystemExit(1) from e
    except OSError as e:
        print(f"tls4d cannot start: {e.filename or ''}: {e.strerror}.", file=sys.stderr)
        raise SystemExit(1) from e
    service.under_twistd = True
    if options.settings.processes > 1:
        from twisted_tls4d.workers import WorkerPool

        WorkerPool(service, options.settings.processes - 1).setServiceParent(service)
    return service
