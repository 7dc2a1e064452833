"""
Diffie-Hellman parameters for the DHE suites: RFC 7919's standard groups,
what a parameters file holds, custom generation in a child process, and the
``tls4d dhparams`` command that swaps a new file in atomically.

RFC 7919's groups are the recommended choice: they are public, audited safe
primes that clients can recognise, and writing one takes no time. Custom
parameters are generated with cryptography, which marks finite-field DH
parameter generation (and loading) as deprecated; this module silences that
warning where it uses the calls on purpose, and says so to the operator.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import sys
import time
import warnings
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TextIO

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dh
from cryptography.utils import CryptographyDeprecationWarning

from twisted_tls4d import pki, root
from twisted_tls4d.errors import ConfigurationError, PEMError, Tls4dError
from twisted_tls4d.settings import add_root_option

#: RFC 7919's ffdhe3072 group, as ``openssl genpkey -genparam -algorithm DH
#: -pkeyopt group:ffdhe3072`` writes it.
FFDHE3072_PEM = b"""\
-----BEGIN DH PARAMETERS-----
MIIBiAKCAYEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEfz9zeNVs7ZRkDW7w09N75nAI4YbRvydbmyQd62R0mkff3
7lmMsPrBhtkcrv4TCYUTknC0EwyTvEN5RPT9RFLi103TZPLiHnH1S/9croKrnJ32
nuhtK8UiNjoNq8Uhl5sN6todv5pC1cRITgq80Gv6U93vPBsg7j/VnXwl5B0rZsYu
N///////////AgEC
-----END DH PARAMETERS-----
"""

#: RFC 7919's ffdhe4096 group, as ``openssl genpkey -genparam -algorithm DH
#: -pkeyopt group:ffdhe4096`` writes it.
FFDHE4096_PEM = b"""\
-----BEGIN DH PARAMETERS-----
MIICCAKCAgEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEfz9zeNVs7ZRkDW7w09N75nAI4YbRvydbmyQd62R0mkff3
7lmMsPrBhtkcrv4TCYUTknC0EwyTvEN5RPT9RFLi103TZPLiHnH1S/9croKrnJ32
nuhtK8UiNjoNq8Uhl5sN6todv5pC1cRITgq80Gv6U93vPBsg7j/VnXwl5B0rZp4e
8W5vUsMWTfT7eTDp5OWIV7asfV9C1p9tGHdjzx1VA0AEh/VbpX4xzHpxNciG77Qx
iu1qHgEtnmgyqQdgCpGBMMRtx3j5ca0AOAkpmaMzy4t6Gh25PXFAADwqTs6p+Y0K
zAqCkc3OyX3Pjsm1Wn+IpGtNtahR9EGC4caKAH5eZV9q//////////8CAQI=
-----END DH PARAMETERS-----
"""

#: RFC 7919's groups by name.
KNOWN_GROUPS = {
    "ffdhe2048": pki.FFDHE2048_PEM,
    "ffdhe3072": FFDHE3072_PEM,
    "ffdhe4096": FFDHE4096_PEM,
}

#: The sizes ``tls4d dhparams --bits`` generates; smaller ones fail audits.
GENERATED_BITS = (2048, 3072, 4096)

#: Seconds ``tls4d dhparams --bits`` lets generation run by default.
DEFAULT_TIMEOUT = 1800.0

#: What the operator is told before custom parameters are generated.
DEPRECATION_NOTE = (
    "cryptography marks finite-field DH parameter generation as deprecated "
    "(a warning today, removal announced); an RFC 7919 group (--group) needs "
    "no generation and is the recommended choice."
)


class GenerationError(Tls4dError):
    """
    Generating DH parameters failed or took longer than allowed.
    """


@attrs.frozen
class DHInfo:
    """
    What a DH parameters file holds.

    Attributes:
        bits: The size of the prime modulus p.
        generator: The generator g.
        group: The RFC 7919 group's name if the parameters are one, else None.
    """

    bits: int
    generator: int
    group: str | None


def _parameter_numbers(pem: bytes) -> dh.DHParameterNumbers:
    """The p and g of PEM DH parameters, with cryptography's warning silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        parameters = serialization.load_pem_parameters(pem)
        if not isinstance(parameters, dh.DHParameters):
            msg = f"these are {type(parameters).__name__}, not DH parameters"
            raise ValueError(msg)
        return parameters.parameter_numbers()


@functools.cache
def _known_numbers() -> dict[tuple[int, int], str]:
    """The (p, g) of each RFC 7919 group, to its name."""
    known = {}
    for name, pem in KNOWN_GROUPS.items():
        numbers = _parameter_numbers(pem)
        known[(numbers.p, numbers.g)] = name
    return known


def inspect_parameters(path: Path) -> DHInfo:
    """
    Read a DH parameters file and say what it holds.

    Args:
        path: A PEM file of DH parameters (``dhparams.pem``).

    Returns:
        Its size, generator and RFC 7919 group if any.

    Raises:
        PEMError: The file cannot be read or holds no usable DH parameters
            (OpenSSL's check, which cryptography runs on loading, refuses a
            prime that is not a safe prime, among others).
    """
    text = pki.read_pem(path)
    try:
        numbers = _parameter_numbers(text.data)
    except ValueError as e:
        msg = (
            f"{path} holds no usable DH parameters ({e}); write a standard group "
            "with 'tls4d dhparams --group ffdhe2048'."
        )
        raise PEMError(msg) from e
    p, g = numbers.p, numbers.g
    return DHInfo(p.bit_length(), g, _known_numbers().get((p, g)))


def _generate_in_child(bits: int, connection: Connection) -> None:
    """
    The child process: generate parameters and send back ``("ok", pem,
    warnings)`` or ``("error", reason, warnings)``.
    """
    status: str
    value: bytes | str
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CryptographyDeprecationWarning)
        try:
            parameters = dh.generate_parameters(generator=2, key_size=bits)
            value = parameters.parameter_bytes(
                serialization.Encoding.PEM, serialization.ParameterFormat.PKCS3
            )
            status = "ok"
        except Exception as e:
            # Whatever went wrong reaches the parent as words.
            status, value = "error", str(e)
    # The deprecation of finite-field DH is expected and announced to the
    # operator before generation starts; anything else is passed on.
    notes = [
        str(w.message)
        for w in caught
        if not issubclass(w.category, CryptographyDeprecationWarning)
    ]
    connection.send((status, value, notes))
    connection.close()


class Progress:
    """
    Shows that generation is running: a spinner and the elapsed seconds on
    one rewritten line on a terminal, else a plain line every ``interval``
    seconds (for logs and pipelines).
    """

    _SPINNER = "|/-\\"

    def __init__(
        self, out: TextIO, label: str, *, terminal: bool, interval: float = 10.0
    ) -> None:
        self.out = out
        self.label = label
        self.terminal = terminal
        self.interval = interval
        self._turns = 0
        self._next_line = interval

    def update(self, elapsed: float) -> None:
        """
        Show the time spent so far.

        Args:
            elapsed: Seconds since generation started.
        """
        if self.terminal:
            spinner = self._SPINNER[self._turns % len(self._SPINNER)]
            self._turns += 1
            self.out.write(f"\r{spinner} {self.label}: {elapsed:.0f} s elapsed")
            self.out.flush()
        elif elapsed >= self._next_line:
            self.out.write(f"{self.label}: {elapsed:.0f} s elapsed\n")
            self.out.flush()
            while self._next_line <= elapsed:
                self._next_line += self.interval

    def finish(self, message: str) -> None:
        """
        End the progress display with a line.

        Args:
            message: What happened.
        """
        if self.terminal:
            self.out.write("\r\033[K")
        self.out.write(message + "\n")
        self.out.flush()


def generate_parameters(
    bits: int,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    progress: Progress | None = None,
    tick: float = 0.1,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[bytes, list[str]]:
    """
    Generate DH parameters (a safe prime of ``bits`` bits, generator 2) in a
    child process, which is killed if it takes longer than ``timeout``.

    Args:
        bits: The size of the prime; the command allows only `GENERATED_BITS`,
            tests use smaller ones.
        timeout: Seconds generation may take.
        progress: Where to show that it is running, or None.
        tick: Seconds between two looks at the child.
        clock: The time source.

    Returns:
        The PEM parameters, and any warning issued while generating them
        other than cryptography's deprecation of finite-field DH (which
        `DEPRECATION_NOTE` announces).

    Raises:
        GenerationError: The child failed, died, or ran out of time.
    """
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(
        target=_generate_in_child, args=(bits, sender), name="tls4d-dhparams"
    )
    start = clock()
    child.start()
    sender.close()
    try:
        while not receiver.poll(tick):
            elapsed = clock() - start
            if not child.is_alive() and not receiver.poll():
                msg = (
                    f"Generating {bits}-bit DH parameters failed: the generating "
                    f"process ended with status {child.exitcode} and no result."
                )
                raise GenerationError(msg)
            if elapsed >= timeout:
                msg = (
                    f"Generating {bits}-bit DH parameters took longer than "
                    f"{timeout:g} s and was stopped; allow more time with "
                    "--timeout, or use an RFC 7919 group (--group)."
                )
                raise GenerationError(msg)
            if progress is not None:
                progress.update(elapsed)
        try:
            status, value, notes = receiver.recv()
        except EOFError as e:
            msg = (
                f"Generating {bits}-bit DH parameters failed: the generating "
                "process ended without a result."
            )
            raise GenerationError(msg) from e
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receiver.close()
    if status != "ok":
        msg = f"Generating {bits}-bit DH parameters failed: {value}."
        raise GenerationError(msg)
    assert isinstance(value, bytes)
    return value, list(notes)


def backup_path(path: Path) -> Path:
    """
    Returns:
        Where `install` keeps the file that ``path`` held before
        (``dhparams.pem.bak``).
    """
    return path.with_name(path.name + ".bak")


def install(path: Path, pem: bytes) -> Path | None:
    """
    Swap new DH parameters in atomically (mode 0644), keeping the old file as
    `backup_path`. Readers see the old file or the new one, never a part.

    Args:
        path: The parameters file (``dhparams.pem``).
        pem: The new parameters.

    Returns:
        The backup's path, or None if there was no old file.

    Raises:
        PEMError: ``pem`` holds no usable DH parameters.
        OSError: A file cannot be written.
    """
    try:
        _parameter_numbers(pem)
    except ValueError as e:
        msg = f"Refusing to write unusable DH parameters to {path}: {e}."
        raise PEMError(msg) from e
    try:
        old = path.read_bytes()
    except FileNotFoundError:
        old = None
    backup = None
    if old is not None:
        backup = backup_path(path)
        pki.write_public_file(backup, old)
    pki.write_public_file(path, pem)
    return backup


_DESCRIPTION = f"""\
Write new Diffie-Hellman parameters to ROOT/dhparams.pem, which the DHE
cipher suites (DHE-RSA, for RSA server keys) use. The old file is kept as
dhparams.pem.bak; the new one is swapped in atomically, so a server starting
meanwhile reads one or the other, never a part. The servers use it from their
next start, or on 'tls4d reload'.

--group writes an RFC 7919 group at once: public, audited safe primes that
clients recognise, and the recommended choice. --bits generates custom
parameters in a child process, showing the time spent; a 4096-bit prime may
take many minutes, and generation is stopped after --timeout seconds
(default {DEFAULT_TIMEOUT:g}), leaving dhparams.pem as it was.

Note: {DEPRECATION_NOTE}
"""

_EPILOG = """\
examples:
  tls4d dhparams --group ffdhe3072 --root tls4d-root
  tls4d dhparams --bits 3072 --timeout 600 --root tls4d-root

exit status: 0 when the file was written (or already held those
parameters); 1 with one line on standard error when generation fails or
times out, or the file cannot be written; 2 on misuse.
"""


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _timeout(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        msg = f"{value!r} is not a positive number of seconds"
        raise argparse.ArgumentTypeError(msg)
    return seconds


def add_parser(commands: Any) -> None:
    """
    Add the ``dhparams`` subcommand to the ``tls4d`` command.
    """
    parser: argparse.ArgumentParser = commands.add_parser(
        "dhparams",
        help="write DH parameters: an RFC 7919 group, or generate custom ones",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument(
        "--group",
        choices=sorted(KNOWN_GROUPS),
        help="write this RFC 7919 group at once (recommended)",
    )
    choice.add_argument(
        "--bits",
        type=int,
        choices=GENERATED_BITS,
        help="generate custom parameters of this size (slow; deprecated by "
        "cryptography)",
    )
    add_root_option(parser)
    parser.add_argument(
        "--timeout",
        type=_timeout,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="stop generating after this long (default: %(default)g)",
    )
    parser.set_defaults(run=_run)


def _run(
    args: argparse.Namespace,
    out: TextIO | None = None,
    *,
    interval: float = 10.0,
) -> int:
    out = out or sys.stdout
    layout = root.RootLayout(args.root)
    layout.require_existing()
    path = layout.dhparams
    if args.group is not None:
        pem = KNOWN_GROUPS[args.group]
        what = f"the RFC 7919 group {args.group}"
    else:
        label = f"Generating {args.bits}-bit DH parameters"
        print(f"Note: {DEPRECATION_NOTE}", file=out)
        terminal = bool(getattr(out, "isatty", lambda: False)())
        progress = Progress(out, label, terminal=terminal, interval=interval)
        started = time.monotonic()
        try:
            pem, notes = generate_parameters(
                args.bits, timeout=args.timeout, progress=progress
            )
        except GenerationError as e:
            progress.finish(f"{label}: stopped.")
            msg = f"{e} {path} was left as it was."
            raise GenerationError(msg) from e
        progress.finish(f"{label}: done in {time.monotonic() - started:.0f} s.")
        for note in dict.fromkeys(notes):
            print(f"Note: {note}", file=out)
        what = f"new {args.bits}-bit DH parameters"
    if args.group is not None and _read_or_none(path) == pem:
        print(f"{path} already holds {what}; nothing changed.", file=out)
        return 0
    try:
        backup = install(path, pem)
    except OSError as e:
        msg = f"Cannot write {path}: {e.strerror}; {path} was left as it was."
        raise ConfigurationError(msg) from e
    kept = f"; the old file is {backup}" if backup is not None else ""
    print(
        f"Wrote {what} to {path}{kept}. The servers use it from their next start "
        "(or on 'tls4d reload').",
        file=out,
    )
    return 0
