"""
Tests for DH parameters: RFC 7919's groups, reading a parameters file,
generation in a child process (bounded in time, with progress), and the
``tls4d dhparams`` command's atomic swap.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import multiprocessing
import shutil
import subprocess
import warnings
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from twisted.trial import unittest

from tests import support
from twisted_tls4d import cli, dhparams, pki
from twisted_tls4d.errors import PEMError


def _args(layout_root: Path, **values: object) -> argparse.Namespace:
    """The parsed arguments of ``tls4d dhparams`` with ``values`` set."""
    defaults: dict[str, object] = {
        "root": layout_root,
        "group": None,
        "bits": None,
        "timeout": 60.0,
    }
    return argparse.Namespace(**{**defaults, **values})


def _probably_prime(n: int) -> bool:
    """A Fermat test: enough to pick a prime for a test."""
    return all(pow(base, n - 1, n) == 1 for base in (2, 3, 5, 7, 11, 13))


def _der_integer(n: int) -> bytes:
    body = n.to_bytes(n.bit_length() // 8 + 1, "big")
    return b"\x02" + _der_length(len(body)) + body


def _der_length(n: int) -> bytes:
    if n < 128:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _pem_of(p: int, g: int) -> bytes:
    """PKCS#3 PEM DH parameters for any prime and generator, checked or not."""
    body = _der_integer(p) + _der_integer(g)
    text = base64.b64encode(b"\x30" + _der_length(len(body)) + body)
    lines = b"".join(text[i : i + 64] + b"\n" for i in range(0, len(text), 64))
    return b"-----BEGIN DH PARAMETERS-----\n" + lines + b"-----END DH PARAMETERS-----\n"


class GroupTests(unittest.TestCase):
    """
    The built-in groups are RFC 7919's, and a parameters file is recognised
    for what it holds.
    """

    def test_same_as_openssl(self) -> None:
        """Each built-in group is byte for byte what openssl writes for it."""
        if shutil.which("openssl") is None:
            raise unittest.SkipTest("the openssl command is not installed")
        for name, pem in dhparams.KNOWN_GROUPS.items():
            result = subprocess.run(
                [
                    "openssl",
                    "genpkey",
                    "-genparam",
                    "-algorithm",
                    "DH",
                    "-pkeyopt",
                    f"group:{name}",
                ],
                capture_output=True,
                check=True,
            )
            self.assertEqual(result.stdout, pem, name)

    def test_inspect_known(self) -> None:
        """A file holding a group is named as that group, with its size."""
        folder = support.temporary_folder("tls4d-dh-")
        for name, pem in dhparams.KNOWN_GROUPS.items():
            path = folder / f"{name}.pem"
            path.write_bytes(pem.replace(b"\n", b"\r\n"))
            info = dhparams.inspect_parameters(path)
            self.assertEqual(info, dhparams.DHInfo(int(name[5:]), 2, name))

    def test_inspect_not_safe(self) -> None:
        """A prime p whose (p - 1) / 2 is not prime is refused as unusable."""
        p = 2**511 + 1
        while not _probably_prime(p) or _probably_prime((p - 1) // 2):
            p += 2
        path = support.temporary_folder("tls4d-dh-") / "dhparams.pem"
        path.write_bytes(_pem_of(p, 2))
        e = self.assertRaises(PEMError, dhparams.inspect_parameters, path)
        self.assertIn("no usable DH parameters", str(e))

    def test_pem_helper(self) -> None:
        """The test's own PEM encoder writes ffdhe2048 as openssl does."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = serialization.load_pem_parameters(pki.FFDHE2048_PEM)
            numbers = loaded.parameter_numbers()
        self.assertEqual(_pem_of(numbers.p, numbers.g), pki.FFDHE2048_PEM)

    def test_inspect_junk(self) -> None:
        """A file without DH parameters is refused, naming it and the fix."""
        path = support.temporary_folder("tls4d-dh-") / "dhparams.pem"
        path.write_bytes(b"junk\n")
        e = self.assertRaises(PEMError, dhparams.inspect_parameters, path)
        self.assertIn(str(path), str(e))
        self.assertIn("tls4d dhparams --group", str(e))


class InstallTests(unittest.TestCase):
    """
    New parameters replace the old file atomically, which is kept as a backup.
    """

    def test_backup(self) -> None:
        """The old file becomes dhparams.pem.bak and the new one is mode 0644."""
        layout = support.make_root()
        old = layout.dhparams.read_bytes()
        backup = dhparams.install(layout.dhparams, dhparams.FFDHE4096_PEM)
        self.assertEqual(backup, dhparams.backup_path(layout.dhparams))
        assert backup is not None
        self.assertEqual(backup.read_bytes(), old)
        self.assertEqual(layout.dhparams.read_bytes(), dhparams.FFDHE4096_PEM)
        self.assertEqual(layout.dhparams.stat().st_mode & 0o777, 0o644)

    def test_refuses_junk(self) -> None:
        """Unusable parameters are never written; the old file stays."""
        layout = support.make_root()
        old = layout.dhparams.read_bytes()
        self.assertRaises(PEMError, dhparams.install, layout.dhparams, b"junk\n")
        self.assertEqual(layout.dhparams.read_bytes(), old)
        self.assertFalse(dhparams.backup_path(layout.dhparams).exists())


class GenerationTests(unittest.TestCase):
    """
    Custom parameters come from a child process that is killed when it runs
    out of time.
    """

    def test_small(self) -> None:
        """512-bit parameters (tests only) load (a safe prime) with generator 2."""
        pem, notes = dhparams.generate_parameters(512, timeout=60)
        path = support.temporary_folder("tls4d-dh-") / "dhparams.pem"
        path.write_bytes(pem)
        self.assertEqual(
            dhparams.inspect_parameters(path), dhparams.DHInfo(512, 2, None)
        )
        self.assertEqual(notes, [])

    def test_timeout(self) -> None:
        """Generation past the timeout fails, shows progress, and leaves no child."""
        out = io.StringIO()
        progress = dhparams.Progress(out, "gen", terminal=False, interval=0.2)
        e = self.assertRaises(
            dhparams.GenerationError,
            dhparams.generate_parameters,
            4096,
            timeout=1.0,
            progress=progress,
        )
        self.assertIn("--timeout", str(e))
        self.assertEqual(multiprocessing.active_children(), [])
        self.assertGreaterEqual(out.getvalue().count("s elapsed\n"), 2)

    def test_child_failure(self) -> None:
        """A size cryptography refuses fails with cryptography's reason."""
        e = self.assertRaises(
            dhparams.GenerationError, dhparams.generate_parameters, 64, timeout=60
        )
        self.assertIn("512", str(e))


class ProgressTests(unittest.TestCase):
    """
    Progress is a spinner on a terminal and periodic plain lines elsewhere.
    """

    def test_plain_lines(self) -> None:
        """Off a terminal, one line is written each interval, none in between."""
        out = io.StringIO()
        progress = dhparams.Progress(out, "gen", terminal=False, interval=10)
        for elapsed in (0.5, 9.9, 10.2, 12, 35):
            progress.update(elapsed)
        progress.finish("gen: done.")
        self.assertEqual(
            out.getvalue(), "gen: 10 s elapsed\ngen: 35 s elapsed\ngen: done.\n"
        )

    def test_terminal_spinner(self) -> None:
        """On a terminal, one line is rewritten with a turning spinner, then cleared."""
        out = io.StringIO()
        progress = dhparams.Progress(out, "gen", terminal=True)
        progress.update(1)
        progress.update(2)
        progress.finish("gen: done.")
        self.assertEqual(
            out.getvalue(),
            "\r| gen: 1 s elapsed\r/ gen: 2 s elapsed\r\033[Kgen: done.\n",
        )


class CommandTests(unittest.TestCase):
    """
    ``tls4d dhparams`` writes a group at once, or generated parameters once
    they are complete, and never leaves a broken or half-written file.
    """

    def setUp(self) -> None:
        self.layout = support.make_root()
        self.old = self.layout.dhparams.read_bytes()
        self.out = io.StringIO()

    def test_group(self) -> None:
        """--group ffdhe3072 writes that group and keeps the old file as backup."""
        args = _args(self.layout.path, group="ffdhe3072")
        self.assertEqual(dhparams._run(args, self.out), 0)
        self.assertEqual(self.layout.dhparams.read_bytes(), dhparams.FFDHE3072_PEM)
        backup = dhparams.backup_path(self.layout.dhparams)
        self.assertEqual(backup.read_bytes(), self.old)
        self.assertIn(str(backup), self.out.getvalue())

    def test_same_group(self) -> None:
        """Asking for the group already there changes nothing and makes no backup."""
        with contextlib.redirect_stdout(self.out):
            status = cli.main(
                ["dhparams", "--group", "ffdhe2048", "--root", str(self.layout.path)]
            )
        self.assertEqual(status, 0)
        self.assertIn("nothing changed", self.out.getvalue())
        self.assertFalse(dhparams.backup_path(self.layout.dhparams).exists())

    def test_generated(self) -> None:
        """Generated parameters are swapped in, with progress and a deprecation note."""
        args = _args(self.layout.path, bits=512)
        self.assertEqual(dhparams._run(args, self.out, interval=0.01), 0)
        info = dhparams.inspect_parameters(self.layout.dhparams)
        self.assertEqual((info.bits, info.group), (512, None))
        self.assertEqual(
            dhparams.backup_path(self.layout.dhparams).read_bytes(), self.old
        )
        text = self.out.getvalue()
        self.assertIn("deprecated", text)
        self.assertIn("Generating 512-bit DH parameters: done in", text)

    def test_timeout_keeps_file(self) -> None:
        """A generation that times out leaves dhparams.pem as it was, no backup."""
        args = _args(self.layout.path, bits=4096, timeout=0.5)
        e = self.assertRaises(dhparams.GenerationError, dhparams._run, args, self.out)
        self.assertIn("left as it was", str(e))
        self.assertEqual(self.layout.dhparams.read_bytes(), self.old)
        self.assertFalse(dhparams.backup_path(self.layout.dhparams).exists())
        self.assertIn("stopped", self.out.getvalue())

    def test_small_bits_refused(self) -> None:
        """The command refuses fewer than 2048 bits (exit status 2)."""
        with contextlib.redirect_stderr(io.StringIO()):
            e = self.assertRaises(
                SystemExit,
                cli.build_parser().parse_args,
                ["dhparams", "--bits", "1024", "--root", str(self.layout.path)],
            )
        self.assertEqual(e.code, 2)

    def test_help_mentions_deprecation(self) -> None:
        """--help says that cryptography deprecates DH parameter generation."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertRaises(
                SystemExit, cli.build_parser().parse_args, ["dhparams", "--help"]
            )
        self.assertIn("deprecated", " ".join(out.getvalue().split()))

    def test_pki_group_unchanged(self) -> None:
        """The first-start group is the module's ffdhe2048."""
        self.assertIs(dhparams.KNOWN_GROUPS["ffdhe2048"], pki.FFDHE2048_PEM)
