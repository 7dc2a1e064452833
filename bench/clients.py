"""
The suite's own load generators, for the protocols no stock tool speaks:
the application protocol (small requests, pipelined or one at a time, and
1 MiB frames), the SQL protocol's point selects, a holder of many idle TLS
connections and a probe timing a new client's HTTPS answer.

Each runs as its own process, pinned to the client cores by the harness:
``python -m bench.clients KIND [options]``. It prints one JSON object on
its last line. The timed ones connect first, then wait for their start and
count the work completed in the ``--duration`` seconds after it, so that
the harness reads the server's CPU time over exactly that window: with
``--start-at`` (a ``time.time()`` value) they start then; without it they
print ``ready`` and read the start time from their standard input, which
lets the harness start them together however long each took to connect.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import selectors
import socket
import ssl
import sys
import time
from pathlib import Path

#: The small request of the application figures (tls4d's ``echo`` op).
SMALL = b'{"id":%d,"op":"echo","args":{"text":"hello, tls4d"}}'

#: The application protocol's greeting.
HELLO = b'{"id":"hello","op":"hello","args":{"version":1,"agent":"tls4d-bench"}}'

#: A 1 MiB frame of the bulk figure: an ``echo`` whose payload, with its
#: JSON around it, is exactly 1,048,576 bytes (tls4d's default frame limit).
BULK_SIZE = 1024 * 1024

#: The point select of the SQL figures, as pgbench -S runs it.
SELECT = "SELECT abalance FROM pgbench_accounts WHERE aid = ?"

#: Rows of the SQL figures' table: pgbench's scale 1.
ACCOUNTS = 100_000


def frame(payload: bytes) -> bytes:
    """
    Returns:
        ``payload`` behind its 4-byte big-endian length.
    """
    return len(payload).to_bytes(4, "big") + payload


def bulk_payload(request_id: int) -> bytes:
    """
    Returns:
        An ``echo`` request of exactly `BULK_SIZE` bytes.
    """
    head = b'{"id":%d,"op":"echo","args":{"data":"' % request_id
    tail = b'"}}'
    return head + b"x" * (BULK_SIZE - len(head) - len(tail)) + tail


def count_frames(buffer: bytearray) -> tuple[int, int]:
    """
    Take the complete frames off the front of ``buffer``.

    Returns:
        How many complete frames there were, and their bytes with headers.
    """
    position, count = 0, 0
    while len(buffer) - position >= 4:
        size = int.from_bytes(buffer[position : position + 4], "big")
        if len(buffer) - position - 4 < size:
            break
        position += 4 + size
        count += 1
    del buffer[:position]
    return count, position


def context(identity: Path | None, ca: Path | None) -> ssl.SSLContext:
    """
    Returns:
        A client context presenting ``identity`` (a folder with ``key.pem``
        and ``cert.pem``) if given, verifying the server with ``ca`` if
        given, else verifying nothing.
    """
    made = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca is None:
        made.check_hostname = False
        made.verify_mode = ssl.CERT_NONE
    else:
        made.load_verify_locations(ca)
    if identity is not None:
        made.load_cert_chain(identity / "cert.pem", identity / "key.pem")
    return made


def connect(
    port: int, made: ssl.SSLContext, source: str | None = None
) -> ssl.SSLSocket:
    """
    Returns:
        A TLS connection to 127.0.0.1:``port``, handshake done.
    """
    raw = socket.create_connection(
        ("127.0.0.1", port), timeout=30, source_address=(source, 0) if source else None
    )
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return made.wrap_socket(raw, server_hostname="localhost")


def _wait_for_start(given: argparse.Namespace) -> bool:
    """
    Wait for the start: ``--start-at``, or else the time the harness writes
    on standard input after this client said ``ready``. Sets
    ``given.start_at``.

    Returns:
        False if the start had already passed.
    """
    if not given.start_at:
        print("ready", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            msg = "The harness closed standard input without a start time."
            raise RuntimeError(msg)
        given.start_at = float(line)
    late = time.time() - given.start_at
    if late > 0:
        return False
    time.sleep(-late)
    return True


def _read_frames(tls: ssl.SSLSocket, buffer: bytearray, wanted: int) -> int:
    """Read until ``wanted`` frames are complete; return their bytes."""
    total = 0
    while wanted > 0:
        data = tls.recv(1 << 20)
        if not data:
            msg = "The server closed the connection."
            raise ConnectionError(msg)
        buffer += data
        count, size = count_frames(buffer)
        wanted -= count
        total += size
    return total


def run_app(given: argparse.Namespace) -> dict[str, object]:
    """
    Drive the application protocol: ``small`` requests pipelined
    (``--window`` in flight) or one at a time (``--window 1``), or ``bulk``
    1 MiB frames.

    Returns:
        The requests answered and the bytes carried (both directions) in the
        timed window, and whether the client started late.
    """
    tls = connect(given.port, context(given.identity, given.ca))
    buffer = bytearray()
    tls.sendall(frame(HELLO))
    _read_frames(tls, buffer, 1)
    if given.kind == "bulk":
        frames = [frame(bulk_payload(i)) for i in range(given.window)]
    else:
        frames = [frame(SMALL % i) for i in range(1024)]
    request_size = sum(len(f) for f in frames) / len(frames)
    on_time = _wait_for_start(given)
    end = given.start_at + given.duration
    answered, carried = 0, 0.0
    window = given.window
    outgoing = bytearray(b"".join(frames[i % len(frames)] for i in range(window)))
    sent, outstanding = window, window
    # Non-blocking, so that a large frame being sent never stops the answers
    # from being read (and the server from going on).
    tls.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(tls, selectors.EVENT_READ)
    while outstanding:
        if outgoing:
            outgoing = _send_some(tls, outgoing)
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if outgoing else 0)
        selector.modify(tls, events)
        if not selector.select(timeout=60):
            msg = "The server sent nothing for 60 s."
            raise TimeoutError(msg)
        count, size = _receive_frames(tls, buffer)
        if not count:
            continue
        outstanding -= count
        if time.time() < end:
            answered += count
            carried += size + count * request_size
            outgoing += b"".join(frames[(sent + i) % len(frames)] for i in range(count))
            sent += count
            outstanding += count
    selector.close()
    tls.close()
    return {"requests": answered, "bytes": carried, "late": not on_time}


def _send_some(tls: ssl.SSLSocket, outgoing: bytearray) -> bytearray:
    """Send what the socket takes now of ``outgoing``; return the rest."""
    position = 0
    with memoryview(outgoing) as view:
        while position < len(view):
            try:
                position += tls.send(view[position : position + (1 << 18)])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                break
    del outgoing[:position]
    return outgoing


def _receive_frames(tls: ssl.SSLSocket, buffer: bytearray) -> tuple[int, int]:
    """
    Read all that is there now, TLS's buffer included.

    Returns:
        The complete frames taken off ``buffer`` and their bytes.
    """
    while True:
        try:
            data = tls.recv(1 << 20)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            break
        if not data:
            msg = "The server closed the connection."
            raise ConnectionError(msg)
        buffer += data
    return count_frames(buffer)


def _read_answer(tls: ssl.SSLSocket, buffer: bytearray) -> None:
    """Read lines until the status line that ends an SQL answer."""
    while True:
        line_end = buffer.find(b"\n")
        while line_end >= 0:
            line = bytes(buffer[:line_end])
            del buffer[: line_end + 1]
            if line.startswith(b"{") and b'"ok":' in line:
                if b'"ok":true' not in line:
                    msg = f"The SQL server answered {line[:300]!r}."
                    raise RuntimeError(msg)
                return
            line_end = buffer.find(b"\n")
        data = tls.recv(65536)
        if not data:
            msg = "The SQL server closed the connection."
            raise ConnectionError(msg)
        buffer += data


def _read_greeting(tls: ssl.SSLSocket, buffer: bytearray) -> None:
    while b"\n" not in buffer:
        data = tls.recv(65536)
        if not data:
            msg = "The SQL server closed the connection before its greeting."
            raise ConnectionError(msg)
        buffer += data
    del buffer[: buffer.find(b"\n") + 1]


def sql_statement(port: int, identity: Path, ca: Path, statements: list[str]) -> None:
    """
    Run ``statements`` one after the other on the SQL server, each to its end.

    Raises:
        RuntimeError: One failed.
    """
    tls = connect(port, context(identity, ca))
    buffer = bytearray()
    _read_greeting(tls, buffer)
    for statement in statements:
        tls.sendall(json.dumps({"sql": statement}).encode() + b"\n")
        _read_answer(tls, buffer)
    tls.close()


#: The table of the SQL figures, made like pgbench's at scale 1.
SQL_SETUP = [
    "CREATE TABLE pgbench_accounts (aid INTEGER PRIMARY KEY, bid INTEGER, "
    "abalance INTEGER, filler TEXT)",
    "INSERT INTO pgbench_accounts WITH RECURSIVE n(aid) AS (SELECT 1 UNION ALL "
    f"SELECT aid + 1 FROM n WHERE aid < {ACCOUNTS}) SELECT aid, 1, 0, "
    "printf('%84s', '') FROM n",
]


def run_sql(given: argparse.Namespace) -> dict[str, object]:
    """
    Point selects one at a time on one SQL connection, random accounts.

    Returns:
        The selects answered in the timed window.
    """
    tls = connect(given.port, context(given.identity, given.ca))
    buffer = bytearray()
    _read_greeting(tls, buffer)
    draw = random.Random(given.seed)
    request = b'{"sql":"' + SELECT.encode() + b'","params":[%d]}\n'
    on_time = _wait_for_start(given)
    end = given.start_at + given.duration
    answered = 0
    while time.time() < end:
        tls.sendall(request % draw.randint(1, ACCOUNTS))
        _read_answer(tls, buffer)
        answered += 1
    tls.close()
    return {"requests": answered, "late": not on_time}


async def _hold(given: argparse.Namespace) -> dict[str, object]:
    made = context(None, given.ca)
    limit = asyncio.Semaphore(given.concurrency)
    held: list[asyncio.StreamWriter] = []
    errors: list[str] = []

    async def one(index: int) -> None:
        source = f"127.0.0.{2 + index // given.per_source}"
        async with limit:
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        "127.0.0.1",
                        given.port,
                        ssl=made,
                        server_hostname="localhost",
                        local_addr=(source, 0),
                    ),
                    60,
                )
            except (TimeoutError, OSError, ssl.SSLError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                return
            held.append(writer)

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(given.count)))
    seconds = time.monotonic() - started
    report = {"held": len(held), "failed": len(errors), "seconds": seconds}
    if errors:
        report["first_error"] = errors[0]
    print(json.dumps(report), flush=True)
    # Hold them until the harness closes our standard input.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for writer in held:
        writer.transport.abort()
    return report


def run_probe(given: argparse.Namespace) -> dict[str, object]:
    """
    New clients one after the other: connect, handshake, GET the static file.

    Returns:
        Each answer's time in milliseconds, from connect to the whole answer.
    """
    made = context(None, given.ca)
    request = (
        f"GET {given.path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    ).encode()
    times = []
    for _ in range(given.count):
        started = time.perf_counter()
        tls = connect(given.port, made)
        tls.sendall(request)
        answer = b""
        while True:
            data = tls.recv(65536)
            if not data:
                break
            answer += data
        tls.close()
        if not answer.startswith(b"HTTP/1.1 200"):
            msg = f"The probe got {answer[:100]!r}."
            raise RuntimeError(msg)
        times.append((time.perf_counter() - started) * 1000)
        time.sleep(given.pause)
    return {"milliseconds": times}


def main(arguments: list[str]) -> None:
    """Run one load generator and print its report as JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.clients")
    kinds = parser.add_subparsers(dest="kind", required=True)
    for kind in ("small", "bulk"):
        app = kinds.add_parser(kind)
        app.add_argument("--window", type=int, default=1)
    for name, sub in kinds.choices.items():
        sub.set_defaults(run=run_app if name in ("small", "bulk") else None)
    sql = kinds.add_parser("sql")
    sql.add_argument("--seed", type=int, default=0)
    sql.set_defaults(run=run_sql)
    hold = kinds.add_parser("hold")
    hold.add_argument("--count", type=int, required=True)
    hold.add_argument("--concurrency", type=int, default=64)
    hold.add_argument("--per-source", type=int, default=5000)
    hold.set_defaults(run=lambda g: asyncio.run(_hold(g)))
    probe = kinds.add_parser("probe")
    probe.add_argument("--count", type=int, default=20)
    probe.add_argument("--path", default="/1k.bin")
    probe.add_argument("--pause", type=float, default=0.05)
    probe.set_defaults(run=run_probe)
    for sub in kinds.choices.values():
        sub.add_argument("--port", type=int, required=True)
        sub.add_argument("--identity", type=Path)
        sub.add_argument("--ca", type=Path)
        sub.add_argument("--start-at", type=float, default=0.0)
        sub.add_argument("--duration", type=float, default=5.0)
    given = parser.parse_args(arguments)
    print(json.dumps(given.run(given)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
