"""
The servers a run compares: tls4d (the real ``twistd -n tls4d`` of this
repository) and its references (nginx, ``openssl s_server``, stock ``twistd
web``, a bare Twisted echo, PostgreSQL), each on loopback, pinned to the
server cores, in a folder of the run's own.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from bench import procstat

REPOSITORY = Path(__file__).resolve().parent.parent

#: How long a server may take to start or stop, in seconds.
DEADLINE = 60

#: The static file of the web figures: 1 KiB.
STATIC_NAME = "1k.bin"
STATIC_SIZE = 1024

#: The TLS 1.2 suites and groups tls4d uses, given to the references too.
CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"
)
GROUPS = "X25519:P-256:P-384"


def environment() -> dict[str, str]:
    """
    Returns:
        The environment of the processes started here: this repository first
        on the Python path.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPOSITORY), *filter(None, [env.get("PYTHONPATH")])]
    )
    return env


def twistd() -> str:
    """
    Returns:
        The ``twistd`` beside this Python, or the one on the path.

    Raises:
        RuntimeError: There is none.
    """
    beside = Path(sys.executable).parent / "twistd"
    found = str(beside) if beside.exists() else shutil.which("twistd")
    if found is None:
        msg = f"No twistd beside {sys.executable} or on PATH; install Twisted."
        raise RuntimeError(msg)
    return found


def free_port() -> int:
    """
    Returns:
        A TCP port on 127.0.0.1 that was free a moment ago.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[str] | None = None) -> None:
    """
    Wait until something accepts TCP connections on 127.0.0.1:``port``.

    Raises:
        RuntimeError: Nothing did within `DEADLINE`, or ``process`` ended.
    """
    end = time.monotonic() + DEADLINE
    while time.monotonic() < end:
        if process is not None and process.poll() is not None:
            msg = f"The server meant for port {port} ended ({process.returncode})."
            raise RuntimeError(msg)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    msg = f"Nothing listens on 127.0.0.1:{port} after {DEADLINE} s."
    raise RuntimeError(msg)


def pinned(cpus: str) -> list[str]:
    """
    Returns:
        The command prefix that runs a program on ``cpus`` only (``"0"``,
        ``"0,1"``), or nothing if ``cpus`` is empty.
    """
    return ["taskset", "-c", cpus] if cpus else []


class Process:
    """
    A server process started here, whose output is read (and kept) as it
    runs, so that it never blocks on a full pipe.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        keep_output: bool = True,
    ) -> None:
        self.name = name
        self.command = list(command)
        # A server that reads its standard input (s_server) gets a pipe that
        # stays open and silent; one whose output is data (s_server again)
        # writes it to /dev/null.
        self.popen = subprocess.Popen(
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE if keep_output else subprocess.DEVNULL,
            stderr=subprocess.STDOUT if keep_output else subprocess.DEVNULL,
            cwd=cwd,
            env=env if env is not None else environment(),
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        if self.popen.stdout is None:
            return
        for line in self.popen.stdout:
            if len(self.lines) < 100_000:
                self.lines.append(line)

    @property
    def pid(self) -> int:
        """The pid at the top of the server's process tree."""
        return self.popen.pid

    @property
    def log(self) -> str:
        """Everything the server printed so far."""
        return "".join(self.lines)

    def wait_for(self, pattern: str) -> re.Match[str]:
        """
        Returns:
            The first match of ``pattern`` in the output, waiting for it.

        Raises:
            RuntimeError: It did not appear in time, or the process ended.
        """
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end:
            found = re.search(pattern, self.log)
            if found:
                return found
            if self.popen.poll() is not None:
                self._reader.join(5)
                found = re.search(pattern, self.log)
                if found:
                    return found
                msg = (
                    f"{self.name} ended ({self.popen.returncode}):\n{self.log[-3000:]}"
                )
                raise RuntimeError(msg)
            time.sleep(0.01)
        msg = f"{self.name}: {pattern!r} not printed within {DEADLINE} s."
        raise RuntimeError(msg)

    def cpu_seconds(self) -> float:
        """The CPU seconds used so far by the process and its descendants."""
        return procstat.tree_cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        """The resident memory of the process and its descendants, in bytes."""
        return procstat.tree_rss_bytes(self.pid)

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL) and wait for it to end."""
        if self.popen.stdin is not None:
            self.popen.stdin.close()
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(DEADLINE)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self._reader.join(5)


class Tls4d(Process):
    """
    ``twistd -n tls4d`` on 127.0.0.1 with every port 0, serving ``root``
    (created on first start), with its ports read from its log.
    """

    LABELS = {
        "https": "HTTPS web server",
        "app": "Application server",
        "sql": "SQL server",
    }

    def __init__(self, root: Path, cpus: str, *arguments: str) -> None:
        command = [
            *pinned(cpus),
            twistd(),
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
            # Every load comes from loopback addresses, the idle figure with
            # 10,000 connections: the connection limits would refuse them.
            "--max-connections",
            "30000",
            "--max-connections-per-peer",
            "30000",
            *arguments,
        ]
        super().__init__("tls4d", command, cwd=root.parent)
        self.root = root

    def port(self, which: str) -> int:
        """
        Returns:
            The port of the listener ``which`` (``https``, ``app``, ``sql``).
        """
        label = re.escape(self.LABELS[which])
        found = self.wait_for(label + r" listening on 127\.0\.0\.1:(\d+)")
        return int(found.group(1))


def issue_client(root: Path, name: str, out: Path) -> Path:
    """
    Issue a client identity of ``root``'s CA with ``tls4d client``.

    Returns:
        The folder holding its ``key.pem``, ``cert.pem`` and ``ca.pem``.

    Raises:
        RuntimeError: The command failed.
    """
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "twisted_tls4d.cli",
            "client",
            name,
            "--root",
            str(root),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=environment(),
        timeout=DEADLINE,
    )
    if result.returncode != 0:
        msg = f"tls4d client {name} failed: {result.stderr.strip()}"
        raise RuntimeError(msg)
    return out


def write_static(folder: Path) -> Path:
    """
    Returns:
        ``folder/1k.bin``, written with 1 KiB of data (the folder is made).
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / STATIC_NAME
    path.write_bytes(bytes(range(256)) * (STATIC_SIZE // 256))
    return path


class OpenSSLServer(Process):
    """
    ``openssl s_server`` on 127.0.0.1, with tls4d's key, chain, suites and
    groups; ``-WWW`` serves files from ``web`` (one connection at a time, as
    s_server does), else it writes what it receives to /dev/null (bulk).
    """

    def __init__(
        self, key: Path, chain: Path, cpus: str, web: Path | None, tickets: bool = True
    ) -> None:
        self.port = free_port()
        command = [
            *pinned(cpus),
            "openssl",
            "s_server",
            "-accept",
            f"127.0.0.1:{self.port}",
            "-key",
            str(key),
            "-cert",
            str(chain),
            "-cert_chain",
            str(chain),
            "-cipher",
            CIPHERS,
            "-groups",
            GROUPS,
            "-quiet",
        ]
        if not tickets:
            command.append("-no_ticket")
        if web is not None:
            command.append("-WWW")
        # Without -WWW, s_server writes what it receives to standard output.
        super().__init__("openssl s_server", command, cwd=web, keep_output=False)
        wait_for_port(self.port, self.popen)


NGINX_CONF = """\
worker_processes {workers};
worker_rlimit_nofile 65536;
user root;
daemon off;
master_process on;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 40000; multi_accept on; }}
http {{
    access_log {folder}/access.log;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 1000000;
    keepalive_timeout 3600s;
    client_header_timeout 3600s;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        root {web};
        ssl_certificate {chain};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_ciphers {ciphers};
        ssl_ecdh_curve {groups};
        ssl_session_tickets {tickets};
        ssl_session_cache {cache};
    }}
}}
"""


class Nginx(Process):
    """
    nginx with one worker (``workers``), on 127.0.0.1, with tls4d's key,
    chain, suites and groups, serving ``web``; with ``resumption`` it issues
    session tickets and keeps a session cache, else neither.
    """

    def __init__(
        self,
        folder: Path,
        key: Path,
        chain: Path,
        web: Path,
        cpus: str,
        resumption: bool = True,
        workers: int = 1,
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = folder / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                workers=workers,
                folder=folder,
                port=self.port,
                web=web,
                chain=chain,
                key=key,
                ciphers=CIPHERS,
                groups=GROUPS.replace("P-256", "prime256v1").replace(
                    "P-384", "secp384r1"
                ),
                tickets="on" if resumption else "off",
                cache="shared:SSL:10m" if resumption else "off",
            )
        )
        command = [*pinned(cpus), "nginx", "-c", str(conf), "-p", str(folder)]
        super().__init__("nginx", command, cwd=folder)
        wait_for_port(self.port, self.popen)


class TwistdWeb(Process):
    """
    Stock ``twistd -n web --listen ssl:...`` serving ``web`` with tls4d's key
    and chain, as a Twisted user would run it.
    """

    def __init__(
        self, folder: Path, key: Path, chain: Path, web: Path, cpus: str
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        listen = f"ssl:{self.port}:interface=127.0.0.1:privateKey={key}:certKey={chain}"
        command = [
            *pinned(cpus),
            twistd(),
            "-n",
            "--pidfile=",
            "web",
            "--listen",
            listen,
            "--path",
            str(web),
        ]
        super().__init__("twistd web", command, cwd=folder)
        wait_for_port(self.port, self.popen)


class EchoServer(Process):
    """
    The bare Twisted ``Int32StringReceiver`` echo of `bench.echo_server` over
    mutual TLS with tls4d's application-server key, chain and client CA.
    """

    def __init__(self, key: Path, chain: Path, ca: Path, cpus: str) -> None:
        command = [
            *pinned(cpus),
            sys.executable,
            "-m",
            "bench.echo_server",
            "--key",
            str(key),
            "--chain",
            str(chain),
            "--ca",
            str(ca),
        ]
        super().__init__("Twisted echo", command)
        self.port = int(self.wait_for(r"echo listening on 127\.0\.0\.1:(\d+)").group(1))


def postgres_binaries() -> Path | None:
    """
    Returns:
        The folder of the newest installed PostgreSQL's programs, or None.
    """
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: (
            int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0
        ),
    )
    return found[-1].parent if found else None


class Postgres:
    """
    A throwaway PostgreSQL cluster on 127.0.0.1 with SSL on (tls4d's key and
    chain), run as the ``postgres`` user when the suite runs as root, with
    pgbench's tables at scale 1 (100,000 accounts) in the ``postgres``
    database.
    """

    def __init__(self, folder: Path, key: Path, chain: Path, cpus: str) -> None:
        binaries = postgres_binaries()
        if binaries is None:
            msg = "PostgreSQL is not installed (apt-get install postgresql)."
            raise RuntimeError(msg)
        self.binaries = binaries
        self.name = "PostgreSQL"
        self.folder = folder
        self.data = folder / "data"
        self.port = free_port()
        self.prefix: list[str] = []
        folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            self.prefix = ["runuser", "-u", "postgres", "--"]
        shutil.copy(key, folder / "server.key")
        shutil.copy(chain, folder / "server.crt")
        os.chmod(folder / "server.key", 0o600)
        if os.geteuid() == 0:
            for path in (folder, folder / "server.key", folder / "server.crt"):
                shutil.chown(path, "postgres")
            # The run's folder is root's (0700): let the postgres user through.
            os.chmod(folder.parent, 0o755)
        self._run(
            str(binaries / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {folder} "
            f"-c ssl=on -c ssl_cert_file={folder}/server.crt "
            f"-c ssl_key_file={folder}/server.key -c max_connections=40"
        )
        self._run(
            *pinned(cpus),
            str(binaries / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(folder / "log"),
            "-w",
            "-t",
            str(DEADLINE),
            "start",
        )
        self.started = True
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        self.pgbench(["-i", "-s", "1", "-q"], "")

    def _run(self, *command: str) -> None:
        result = subprocess.run(
            [*self.prefix, *command],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
            cwd=self.folder,
        )
        if result.returncode != 0:
            msg = f"{' '.join(command[:2])} failed: {result.stderr.strip()[-2000:]}"
            raise RuntimeError(msg)

    def dsn(self) -> str:
        """
        Returns:
            The libpq connection string: TCP to 127.0.0.1, TLS required.
        """
        return (
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres "
            "sslmode=require"
        )

    def pgbench(self, arguments: Sequence[str], cpus: str) -> str:
        """
        Run ``pgbench`` against the cluster.

        Returns:
            Its standard output.

        Raises:
            RuntimeError: It failed.
        """
        result = subprocess.run(
            [*pinned(cpus), str(self.binaries / "pgbench"), *arguments, self.dsn()],
            capture_output=True,
            text=True,
            timeout=DEADLINE * 10,
        )
        if result.returncode != 0:
            msg = (
                f"pgbench {' '.join(arguments)} failed: {result.stderr.strip()[-2000:]}"
            )
            raise RuntimeError(msg)
        return result.stdout

    def cpu_seconds(self) -> float:
        """The CPU seconds used so far by the postmaster and its backends."""
        return procstat.tree_cpu_seconds(self.pid)

    def stop(self) -> None:
        """Stop the cluster at once."""
        if self.started:
            self.started = False
            self._run(
                str(self.binaries / "pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "immediate",
                "-w",
                "stop",
            )


def client_context(identity: Path | None, ca: Path | None) -> ssl.SSLContext:
    """
    Args:
        identity: A folder with ``key.pem`` and ``cert.pem`` to present, or None.
        ca: The CA to verify the server with, or None to verify nothing.

    Returns:
        A client context for the suite's own clients.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is None:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context.load_verify_locations(ca)
    if identity is not None:
        context.load_cert_chain(identity / "cert.pem", identity / "key.pem")
    return context
