"""
The settings of a tls4d server: their defaults, the optional settings file
``Settings/tls4d.toml`` of the root, and the command line, which wins over the
file.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.abstract import isIPAddress, isIPv6Address

from twisted_tls4d.errors import ConfigurationError

#: Where a root lives when ``--root`` is not given.
DEFAULT_ROOT = Path("tls4d-root")

#: The servers tls4d runs; with none chosen, all of them.
SERVERS = ("web", "app", "sql")


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
        hsts: Send Strict-Transport-Security and redirect plain HTTP to HTTPS.
        hsts_max_age: The HSTS max-age, in seconds.
        max_frame_size: The largest application-server frame, in bytes.
        max_line_length: The longest SQL-server line, in bytes.
        handshake_timeout: Seconds a client has to complete its TLS handshake.
        idle_timeout: Seconds an application or SQL connection may stay idle.
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
    hsts: bool = False
    hsts_max_age: int = 63072000
    max_frame_size: int = 1024 * 1024
    max_line_length: int = 1024 * 1024
    handshake_timeout: float = 10.0
    idle_timeout: float = 600.0


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
    "hsts": (bool,),
    "hsts_max_age": (int,),
    "max_frame_size": (int,),
    "max_line_length": (int,),
    "handshake_timeout": (int, float),
    "idle_timeout": (int, float),
}


_TYPE_WORDS = {
    str: "a string",
    int: "a whole number",
    float: "a number",
    bool: "true or false",
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
        ConfigurationError: A port, size, age or timeout is out of range, or
            the same port is used twice.
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
    }
    for name, value in positives.items():
        if value <= 0:
            msg = f"{name} must be positive; got {value}."
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
