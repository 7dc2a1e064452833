"""
Tests for twisted_tls4d.settings and the twistd options: defaults, the
settings file, and the command line winning over it.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from twisted.trial import unittest

from tests import support
from twisted_tls4d import settings, tap
from twisted_tls4d.errors import ConfigurationError


def _root_with(toml: str | None) -> Path:
    root = support.temporary_folder("tls4d-settings-") / "root"
    if toml is not None:
        (root / "Settings").mkdir(parents=True)
        (root / "Settings" / "tls4d.toml").write_text(toml)
    return root


class ResolveTests(unittest.TestCase):
    """
    Settings come from defaults, then the file, then the command line.
    """

    def test_defaults(self) -> None:
        """Without file or options, all three servers run on 4D's default ports."""
        s = settings.resolve({}, _root_with(None))
        self.assertEqual((s.web, s.app, s.sql), (True, True, True))
        self.assertEqual(
            (s.https_port, s.http_port, s.app_port, s.sql_port),
            (8443, 8080, 19813, 19812),
        )
        self.assertEqual((s.min_tls, s.hsts, s.hsts_max_age), ("1.2", False, 63072000))

    def test_file_then_command_line(self) -> None:
        """The file's values apply, and a command-line value wins over the file's."""
        root = _root_with('https-port = 9443\nmin_tls = "1.3"\nhsts = true\n')
        s = settings.resolve({"https_port": 7443, "min_tls": None}, root)
        self.assertEqual(s.https_port, 7443)
        self.assertEqual(s.min_tls, "1.3")
        self.assertTrue(s.hsts)

    def test_one_server(self) -> None:
        """Each server flag starts that server alone."""
        for name in settings.SERVERS:
            s = settings.resolve({name: True}, _root_with(None))
            self.assertEqual([n for n in settings.SERVERS if getattr(s, n)], [name])

    def test_command_line_choice_replaces_file_choice(self) -> None:
        """Servers named on the command line replace those named in the file."""
        root = _root_with("sql = true\n")
        self.assertEqual(
            [n for n in settings.SERVERS if getattr(settings.resolve({}, root), n)],
            ["sql"],
        )
        s = settings.resolve({"web": True}, root)
        self.assertEqual([n for n in settings.SERVERS if getattr(s, n)], ["web"])

    def test_file_turns_one_off(self) -> None:
        """A file that turns a server off runs the other two."""
        s = settings.resolve({}, _root_with("web = false\n"))
        self.assertEqual([n for n in settings.SERVERS if getattr(s, n)], ["app", "sql"])

    def test_file_turns_all_off(self) -> None:
        """A file that turns every server off is refused."""
        root = _root_with("web = false\napp = false\nsql = false\n")
        e = self.assertRaises(ConfigurationError, settings.resolve, {}, root)
        self.assertIn("turns every server off", str(e))

    def test_interface_must_be_an_address(self) -> None:
        """An interface that is not an IP address is refused before any lookup."""
        for interface in ("999.1.1.1", "localhost", "::1::2"):
            e = self.assertRaises(
                ConfigurationError,
                settings.resolve,
                {"interface": interface},
                _root_with(None),
            )
            self.assertIn(repr(interface), str(e))
        self.assertEqual(
            settings.resolve({"interface": "::1"}, _root_with(None)).interface, "::1"
        )

    def test_not_utf8(self) -> None:
        """A settings file that is not UTF-8 is refused, naming it."""
        root = _root_with(None)
        (root / "Settings").mkdir(parents=True)
        (root / "Settings" / "tls4d.toml").write_bytes(b"hsts = \xff\n")
        e = self.assertRaises(ConfigurationError, settings.resolve, {}, root)
        self.assertIn("tls4d.toml is not valid TOML", str(e))

    def test_unknown_key(self) -> None:
        """An unknown key in the file is refused, naming the file and the key."""
        root = _root_with("htps-port = 1\n")
        e = self.assertRaises(ConfigurationError, settings.resolve, {}, root)
        self.assertIn("'htps-port'", str(e))
        self.assertIn("tls4d.toml", str(e))

    def test_wrong_type(self) -> None:
        """A value of the wrong type is refused, naming the key."""
        root = _root_with('https-port = "443"\n')
        e = self.assertRaises(ConfigurationError, settings.resolve, {}, root)
        self.assertIn("https-port must be a whole number", str(e))

    def test_invalid_toml(self) -> None:
        """A file that is not TOML is refused, naming it."""
        root = _root_with("this is not toml\n")
        e = self.assertRaises(ConfigurationError, settings.resolve, {}, root)
        self.assertIn("not valid TOML", str(e))

    def test_port_range(self) -> None:
        """A port outside 0..65535 is refused."""
        e = self.assertRaises(
            ConfigurationError, settings.resolve, {"sql_port": 70000}, _root_with(None)
        )
        self.assertIn("sql-port 70000 is not a TCP port", str(e))

    def test_workers(self) -> None:
        """
        workers comes from the file or the command line, 1 to 256; unset, it
        is one per CPU this process may use.
        """
        root = _root_with("workers = 3\n")
        self.assertEqual(settings.resolve({}, root).processes, 3)
        self.assertEqual(settings.resolve({"workers": 1}, root).processes, 1)
        unset = settings.resolve({}, _root_with(None))
        self.assertIsNone(unset.workers)
        self.assertEqual(unset.processes, settings.default_workers())
        self.assertGreaterEqual(settings.default_workers(), 1)
        for wrong in (0, 257):
            e = self.assertRaises(
                ConfigurationError, settings.resolve, {"workers": wrong}, root
            )
            self.assertIn(f"workers must be 1 to 256 processes; got {wrong}", str(e))

    def test_same_port_twice(self) -> None:
        """Two listeners on one port are refused; two on port 0 are fine."""
        self.assertRaises(
            ConfigurationError,
            settings.resolve,
            {"app_port": 8443},
            _root_with(None),
        )
        settings.resolve({"app_port": 0, "sql_port": 0}, _root_with(None))


class OptionsTests(unittest.TestCase):
    """
    The twistd options parse into checked settings, and misuse is a usage error.
    """

    def test_parse(self) -> None:
        """Given options reach the settings; the rest keep their defaults."""
        options = tap.Options()
        root = _root_with(None)
        options.parseOptions(
            [
                "--web",
                "--root",
                str(root),
                "--https-port",
                "0",
                "--hsts",
                "--interface",
                "::1",
            ]
        )
        s = options.settings
        self.assertEqual((s.web, s.app, s.sql), (True, False, False))
        self.assertEqual((s.https_port, s.http_port, s.hsts), (0, 8080, True))
        self.assertEqual((s.root, s.interface), (root, "::1"))

    def test_strict(self) -> None:
        """--strict, or strict = true in the settings file, sets strict."""
        self.assertFalse(settings.resolve({}, _root_with(None)).strict)
        self.assertTrue(settings.resolve({}, _root_with("strict = true\n")).strict)
        options = tap.Options()
        options.parseOptions(["--strict", "--root", str(_root_with(None))])
        self.assertTrue(options.settings.strict)
        self.assertIn("--strict", str(tap.Options()))

    def refused(self, arguments: list[str]) -> str:
        """Parse options expected to stop the start; return what it printed."""
        error = io.StringIO()
        self.patch(sys, "stderr", error)
        e = self.assertRaises(SystemExit, tap.Options().parseOptions, arguments)
        self.assertEqual(e.code, 1)
        self.assertEqual(len(error.getvalue().splitlines()), 1)
        return error.getvalue()

    def test_old_tls_refused(self) -> None:
        """--min-tls 1.1 stops the start with one line that names RFC 8996."""
        line = self.refused(["--min-tls", "1.1", "--root", str(_root_with(None))])
        self.assertIn("RFC 8996", line)

    def test_ciphers_selecting_nothing(self) -> None:
        """--ciphers that selects nothing stops the start, naming the string."""
        line = self.refused(
            ["--ciphers", "NOTACIPHER", "--root", str(_root_with(None))]
        )
        self.assertIn("'NOTACIPHER' selects no TLS 1.2 cipher suite", line)

    def test_settings_file_error(self) -> None:
        """A bad settings file stops the start with one line naming the file."""
        line = self.refused(["--root", str(_root_with('hsts = "yes"\n'))])
        self.assertIn("tls4d.toml: hsts must be true or false", line)

    def test_help_mentions_defaults(self) -> None:
        """--help shows each port's default and how servers are chosen."""
        text = str(tap.Options())
        for fragment in ("8443", "8080", "19813", "19812", "63072000", "all three"):
            self.assertIn(fragment, text)
