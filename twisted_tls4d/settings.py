"""
The settings of a tls4d server: their defaults, the optional settings file
``Settings/tls4d.toml`` of the root, and the command line, which wins over the
file.
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.abstract import isIPAddress, isIPv6Address

from twisted_tls4d.errors import ConfigurationError

#: Where a root lives when ``--root`` is not given.
DEFAULT_ROOT = Path("tls4d-root")


def add_root_option(parser: argparse.ArgumentParser) -> None:
    """
    Add ``--root DIR`` (default `DEFAULT_ROOT`) to a ``tls4d`` subcommand.
    """
    parser.add_argument(
        "--root",
        type=Path,
        default=DEFAULT_ROOT,
        help="the server root (default: %(default)s)",
    )


#: The servers tls4d runs; with none chosen, all of them.
SERVERS = ("web", "app", "sql")

#: The most server processes ``workers`` may ask for.
MAX_WORKERS = 256


def default_workers() -> int:
    """
    Returns:
        How many server processes run when ``workers`` is not set: one for
        each CPU this process may run on (its affinity mask where the system
        tells it, else the machine's CPUs), at least one.
    """
    if os.name != "posix":
        return 1
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is not None:
        try:
            return max(1, len(affinity(0)))
        except OSError:
            pass
    return max(1, os.cpu_count() or 1)


def _redacted(url: str | None) -> str:
    """
    Returns:
        The repr of a PostgreSQL URL without its password.
    """
    if url is None:
        return "None"
    from twisted_tls4d.sql.postgres import redact_url

    return repr(redact_url(url))


def _names(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...] | None:
    """
    Returns:
        The names of ``app-allow``, from a comma-separated string or a list,
        stripped of spaces; None if not given.
    """
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    return tuple(part.strip() if isinstance(part, str) else part for part in parts)


@attrs.frozen(kw_only=True)
class Settings:
    """
    Everything a tls4d server is configured with.

    Attributes:
        root: The server root folder.
        web: Run the web server.
        app: Run the application server.
        sql: Run the SQL server.
        interface: The address every listener binds to; all addresses if
            None.
        https_port: The web server's HTTPS port (0 takes a free port).
        http_port: The web server's plain HTTP port.
        no_http: Serve no plain HTTP at all.
        app_port: The application server's port.
        sql_port: The SQL server's port.
        min_tls: The lowest TLS version accepted, "1.2" or "1.3".
        ciphers: An OpenSSL cipher string for TLS 1.2; Mozilla's intermediate
            list if None.
        strict: Refuse to start (or reload) while a private key file is open
            to its group or to every user, instead of warning.
        hsts: Send Strict-Transport-Security and redirect plain HTTP to HTTPS.
        hsts_max_age: The HSTS max-age, in seconds.
        max_frame_size: The largest application-server frame, in bytes.
        max_line_length: The longest SQL-server line, in bytes.
        handshake_timeout: Seconds a client of any TLS listener has to
            complete its TLS handshake.
        idle_timeout: Seconds an application or SQL connection may stay idle.
        server_name: The host name plain HTTP redirects to (with HSTS); the
            request's own host, if the certificate covers it, when None.
        hsts_include_subdomains: Add ``includeSubDomains`` to HSTS.
        hsts_preload: Add ``preload`` to HSTS.
        directory_listing: List WebFolder folders without ``index.html``.
        wsgi: The dotted name of a WSGI application served beside WebFolder.
        add_header: ``Name: value`` headers added to every web answer.
        max_request_size: The largest web request body, in bytes.
        max_connections: The most connections each listener holds open.
        max_connections_per_peer: The most connections each listener holds
            open from one peer address.
        max_unsent: The most bytes queued for a peer that does not read,
            past the transport's own buffer, before it is cut off.
        web_idle_timeout: Seconds a web connection may stay silent.
        request_timeout: Seconds a client has to send a whole request once it
            started it: a web request, an application frame, an SQL line.
        sql_certificate_access: The SQL access level (``read-only``,
            ``read-write``, ``full``) of a client certificate whose name is
            not an SQL user.
        sql_client_certificate: ``required``: every SQL client presents a
            certificate; ``optional``: clients without one may connect and
            log in with a password.
        sql_database: A ``postgresql://`` URL: the SQL server serves that
            database, its ``full`` sessions connecting as the URL's role,
            instead of the root's SQLite database.
        sql_database_read_write: The URL ``read-write`` sessions connect
            with to that database; without it they are refused.
        sql_database_read_only: The URL ``read-only`` sessions connect with;
            without it they are refused.
        app_max_outstanding: The most requests of one application client in
            progress at once; past it the server reads no more from it.
        app_handlers: ``module:attribute`` naming an application's handlers
            (a `twisted_tls4d.app.Registry`), served beside the built-in ops.
        app_allow: The certificate names (common names) the application
            server admits; every name its CA certified if None.
        app_name: The application server's name in its hello answer; the
            machine's host name if None.
        app_no_sql: Refuse the application server's ``sql`` op to clients.
        workers: How many processes share the listening sockets (the twistd
            process and ``workers - 1`` worker processes it starts); one for
            each CPU (`default_workers`) if None.
    """

    root: Path = DEFAULT_ROOT
    web: bool = True
    app: bool = True
    sql: bool = True
    interface: str | None = None
    https_port: int = 8443
    http_port: int = 8080
    no_http: bool = False
    app_port: int = 19813
    sql_port: int = 19812
    min_tls: str = "1.2"
    ciphers: str | None = None
    strict: bool = False
    hsts: bool = False
    hsts_max_age: int = 63072000
    max_frame_size: int = 1024 * 1024
    max_line_length: int = 1024 * 1024
    handshake_timeout: float = 10.0
    idle_timeout: float = 600.0
    server_name: str | None = None
    hsts_include_subdomains: bool = False
    hsts_preload: bool = False
    directory_listing: bool = False
    wsgi: str | None = None
    add_header: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    max_request_size: int = 2_000_000
    max_connections: int = 100
    max_connections_per_peer: int = 32
    max_unsent: int = 4 * 1024 * 1024
    web_idle_timeout: float = 15.0
    request_timeout: float = 30.0
    sql_certificate_access: str = "full"
    sql_client_certificate: str = "required"
    sql_database: str | None = attrs.field(default=None, repr=_redacted)
    sql_database_read_write: str | None = attrs.field(default=None, repr=_redacted)
    sql_database_read_only: str | None = attrs.field(default=None, repr=_redacted)
    app_max_outstanding: int = 32
    app_handlers: str | None = None
    app_allow: tuple[str, ...] | None = attrs.field(default=None, converter=_names)
    app_name: str | None = None
    app_no_sql: bool = False
    workers: int | None = None

    @property
    def processes(self) -> int:
        """
        How many processes serve: ``workers``, or `default_workers` if unset.
        """
        return self.workers if self.workers is not None else default_workers()


_TYPES: dict[str, tuple[type, ...]] = {
    "root": (str,),
    "web": (bool,),
    "app": (bool,),
    "sql": (bool,),
    "interface": (str,),
    "https_port": (int,),
    "http_port": (int,),
    "no_http": (bool,),
    "app_port": (int,),
    "sql_port": (int,),
    "min_tls": (str, float),
    "ciphers": (str,),
    "strict": (bool,),
    "hsts": (bool,),
    "hsts_max_age": (int,),
    "max_frame_size": (int,),
    "max_line_length": (int,),
    "handshake_timeout": (int, float),
    "idle_timeout": (int, float),
    "server_name": (str,),
    "hsts_include_subdomains": (bool,),
    "hsts_preload": (bool,),
    "directory_listing": (bool,),
    "wsgi": (str,),
    "add_header": (list,),
    "max_request_size": (int,),
    "max_connections": (int,),
    "max_connections_per_peer": (int,),
    "max_unsent": (int,),
    "web_idle_timeout": (int, float),
    "request_timeout": (int, float),
    "sql_certificate_access": (str,),
    "sql_client_certificate": (str,),
    "sql_database": (str,),
    "sql_database_read_write": (str,),
    "sql_database_read_only": (str,),
    "app_max_outstanding": (int,),
    "app_handlers": (str,),
    "app_allow": (str, list),
    "app_name": (str,),
    "app_no_sql": (bool,),
    "workers": (int,),
}


_TYPE_WORDS = {
    str: "a string",
    int: "a whole number",
    float: "a number",
    bool: "true or false",
    list: "a list of strings",
}


def read_settings_file(path: Path) -> dict[str, Any]:
    """
    Read a settings file. Its keys are the long option names, with hyphens or
    underscores (``https-port = 443``, ``hsts = true``); ``root`` cannot be set
    there, since the file lives in the root.

    Args:
        path: The TOML file.

    Returns:
        The values it sets, keyed by `Settings` attribute name.

    Raises:
        ConfigurationError: The file is not valid TOML, names an unknown
            setting, or gives one a value of the wrong type.
    """
    try:
        with path.open("rb") as f:
            document = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        msg = f"{path} is not valid TOML (UTF-8 text): {e}."
        raise ConfigurationError(msg) from e
    except OSError as e:
        msg = f"Cannot read {path}: {e.strerror}."
        raise ConfigurationError(msg) from e

    values: dict[str, Any] = {}
    for key, value in document.items():
        name = key.replace("-", "_")
        if name not in _TYPES or name == "root":
            known = ", ".join(
                sorted(k.replace("_", "-") for k in _TYPES if k != "root")
            )
            msg = f"{path} sets unknown setting {key!r}; known settings: {known}."
            raise ConfigurationError(msg)
        allowed = _TYPES[name]
        if not isinstance(value, allowed) or (
            isinstance(value, bool) and bool not in allowed
        ):
            wanted = " or ".join(_TYPE_WORDS[t] for t in allowed)
            msg = f"{path}: {key} must be {wanted}, not {value!r}."
            raise ConfigurationError(msg)
        values[name] = str(value) if name == "min_tls" else value
    return values


def resolve(command_line: Mapping[str, Any], root: Path = DEFAULT_ROOT) -> Settings:
    """
    Combine defaults, the root's settings file and the command line.

    Args:
        command_line: Values given on the command line, keyed by `Settings`
            attribute name; None (or absence) means "not given". Server flags
            (``web``, ``app``, ``sql``) are True when given.
        root: The server root, whose ``Settings/tls4d.toml`` is read if it
            exists.

    Returns:
        The checked settings. Servers named on the command line run alone;
        else those the file turns on (``web = true``) run alone; else all
        but those the file turns off (``sql = false``).

    Raises:
        ConfigurationError: A value is out of range, or the file is invalid.
    """
    settings_file = root / "Settings" / "tls4d.toml"
    file_values = read_settings_file(settings_file) if settings_file.exists() else {}
    given = {k: v for k, v in command_line.items() if v is not None}

    chosen = {s for s in SERVERS if given.pop(s, False)}
    if not chosen:
        chosen = {s for s in SERVERS if file_values.get(s)}
    if not chosen:
        chosen = {s for s in SERVERS if file_values.get(s, True)}
    for server in SERVERS:
        file_values.pop(server, None)
    if not chosen:
        msg = f"{settings_file} turns every server off; leave one on."
        raise ConfigurationError(msg)

    values = {**file_values, **given}
    settings = Settings(root=root, **values, **{s: s in chosen for s in SERVERS})
    check(settings)
    return settings


def check(settings: Settings) -> None:
    """
    Check the values of settings that do not depend on the TLS library.

    Args:
        settings: The settings.

    Raises:
        ConfigurationError: A port, size, age, timeout or the number of
            workers is out of range, or the same port is used twice.
    """
    ports = {
        "https-port": settings.https_port,
        "http-port": settings.http_port,
        "app-port": settings.app_port,
        "sql-port": settings.sql_port,
    }
    for name, port in ports.items():
        if not 0 <= port <= 65535:
            msg = f"{name} {port} is not a TCP port; use 0 to 65535 (0: any free port)."
            raise ConfigurationError(msg)
    interface = settings.interface
    if interface is not None and not (
        isIPAddress(interface) or isIPv6Address(interface)
    ):
        msg = (
            f"interface {interface!r} is not an IPv4 or IPv6 address; give one "
            "of this machine's addresses (127.0.0.1, ::1, ...) or leave it unset "
            "for all of them."
        )
        raise ConfigurationError(msg)
    in_use = [p for p in _listened_ports(settings) if p != 0]
    duplicates = sorted({p for p in in_use if in_use.count(p) > 1})
    if duplicates:
        msg = f"Port {duplicates[0]} is given to two listeners; give each its own port."
        raise ConfigurationError(msg)
    if settings.hsts_max_age < 0:
        msg = f"hsts-max-age must be 0 or more seconds; got {settings.hsts_max_age}."
        raise ConfigurationError(msg)
    positives = {
        "max-frame-size": settings.max_frame_size,
        "max-line-length": settings.max_line_length,
        "handshake-timeout": settings.handshake_timeout,
        "idle-timeout": settings.idle_timeout,
        "max-connections": settings.max_connections,
        "max-connections-per-peer": settings.max_connections_per_peer,
        "max-unsent": settings.max_unsent,
        "request-timeout": settings.request_timeout,
    }
    for name, value in positives.items():
        if value <= 0:
            msg = f"{name} must be positive; got {value}."
            raise ConfigurationError(msg)
    if settings.sql_certificate_access not in ("read-only", "read-write", "full"):
        msg = (
            f"sql-certificate-access {settings.sql_certificate_access!r} is not "
            "an access level; use read-only, read-write or full."
        )
        raise ConfigurationError(msg)
    _check_sql_database(settings)
    if settings.sql_client_certificate not in ("required", "optional"):
        msg = (
            f"sql-client-certificate {settings.sql_client_certificate!r} is "
            "neither required nor optional."
        )
        raise ConfigurationError(msg)
    _check_app(settings)
    _check_web(settings)
    _check_workers(settings)


def _check_workers(settings: Settings) -> None:
    """
    Raises:
        ConfigurationError: ``workers`` is out of range, or over 1 where
            processes cannot inherit sockets (not POSIX).
    """
    workers = settings.workers
    if workers is None:
        return
    if not 1 <= workers <= MAX_WORKERS:
        msg = (
            f"workers must be 1 to {MAX_WORKERS} processes; got {workers} "
            f"(leave it unset for one per CPU, {default_workers()} here)."
        )
        raise ConfigurationError(msg)
    if workers > 1 and os.name != "posix":
        msg = (
            f"workers {workers} needs a POSIX system, where worker processes "
            "can inherit the listening sockets; use workers = 1 here."
        )
        raise ConfigurationError(msg)


#: The shortest HSTS max-age browsers' preload lists accept (one year).
HSTS_PRELOAD_MIN_AGE = 31536000

_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)

_DOTTED_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def _check_web(settings: Settings) -> None:
    """
    Check the web server's settings.

    Raises:
        ConfigurationError: An HSTS option is given without ``hsts`` or
            breaks the preload rules, a limit is not positive, or a header,
            the server name or the WSGI name is malformed.
    """
    for name, value in (
        ("max-request-size", settings.max_request_size),
        ("web-idle-timeout", settings.web_idle_timeout),
    ):
        if value <= 0:
            msg = f"{name} must be positive; got {value}."
            raise ConfigurationError(msg)
    for name, given in (
        ("hsts-include-subdomains", settings.hsts_include_subdomains),
        ("hsts-preload", settings.hsts_preload),
        ("server-name", settings.server_name is not None),
    ):
        if given and not settings.hsts:
            msg = (
                f"{name} only applies with hsts (HSTS and the redirect from plain "
                "HTTP); add --hsts, or leave it out."
            )
            raise ConfigurationError(msg)
    if settings.hsts_preload and (
        not settings.hsts_include_subdomains
        or settings.hsts_max_age < HSTS_PRELOAD_MIN_AGE
    ):
        msg = (
            "hsts-preload needs hsts-include-subdomains and an hsts-max-age of at "
            f"least {HSTS_PRELOAD_MIN_AGE} (one year), as browsers' preload lists "
            f"require; got max-age {settings.hsts_max_age}, includeSubDomains "
            f"{'on' if settings.hsts_include_subdomains else 'off'}."
        )
        raise ConfigurationError(msg)
    server_name = settings.server_name
    if server_name is not None and not (
        isIPAddress(server_name)
        or isIPv6Address(server_name)
        or _HOST_NAME.match(server_name)
    ):
        msg = (
            f"server-name {server_name!r} is not a host name or IP address; give the "
            "name browsers use for this server, like www.example.com (no "
            "scheme, port or path)."
        )
        raise ConfigurationError(msg)
    for header in settings.add_header:
        if not isinstance(header, str):
            msg = f"add-header must be a list of strings; got {header!r}."
            raise ConfigurationError(msg)
        from twisted_tls4d.web import parse_header

        parse_header(header)
    if settings.wsgi is not None and not _DOTTED_NAME.match(settings.wsgi):
        msg = (
            f"wsgi {settings.wsgi!r} is not a dotted name; give the module and "
            "the application's name in it, like myproject.wsgi.application."
        )
        raise ConfigurationError(msg)


#: What ``app-handlers`` looks like: a dotted module name, a colon, and a
#: dotted attribute name.
_HANDLERS_SPEC = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
    r":[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
)


def _check_app(settings: Settings) -> None:
    """
    Check the application server's settings.

    Raises:
        ConfigurationError: ``app-max-outstanding`` is not positive,
            ``app-handlers`` is not ``module:attribute``, ``app-allow`` names
            nobody or holds an empty name, or ``app-name`` is empty.
    """
    if settings.app_max_outstanding < 1:
        msg = (
            "app-max-outstanding must be 1 or more; got "
            f"{settings.app_max_outstanding}."
        )
        raise ConfigurationError(msg)
    handlers = settings.app_handlers
    if handlers is not None and not _HANDLERS_SPEC.match(handlers):
        msg = (
            f"app-handlers {handlers!r} is not MODULE:ATTRIBUTE; name the module "
            "and the registry in it, like myapp.ops:registry."
        )
        raise ConfigurationError(msg)
    allowed = settings.app_allow
    if allowed is not None and (
        not allowed or not all(isinstance(n, str) and n for n in allowed)
    ):
        msg = (
            f"app-allow {','.join(map(str, allowed))!r} names no client or an "
            "empty name; give the certificate names to admit, separated by "
            "commas (alice,bob)."
        )
        raise ConfigurationError(msg)
    if settings.app_name is not None and not settings.app_name.strip():
        msg = "app-name is empty; give the name clients see, or leave it unset."
        raise ConfigurationError(msg)


def _listened_ports(settings: Settings) -> list[int]:
    ports = []
    if settings.web:
        ports.append(settings.https_port)
        if not settings.no_http:
            ports.append(settings.http_port)
    if settings.app:
        ports.append(settings.app_port)
    if settings.sql:
        ports.append(settings.sql_port)
    return ports


def _check_sql_database(settings: Settings) -> None:
    """
    Raises:
        ConfigurationError: A ``sql-database`` option is not a PostgreSQL
            URL, or a level's URL is given without ``sql-database``.
    """
    from twisted_tls4d.sql.postgres import check_url

    urls = {
        "sql-database": settings.sql_database,
        "sql-database-read-write": settings.sql_database_read_write,
        "sql-database-read-only": settings.sql_database_read_only,
    }
    for option, url in urls.items():
        if url is None:
            continue
        try:
            check_url(url, option)
        except ValueError as e:
            raise ConfigurationError(str(e)) from e
    if settings.sql_database is None and (
        settings.sql_database_read_write or settings.sql_database_read_only
    ):
        msg = (
            "sql-database-read-write and sql-database-read-only need "
            "sql-database, the PostgreSQL URL of full sessions; give it too."
        )
        raise ConfigurationError(msg)
