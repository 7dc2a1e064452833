"""
A short run of the soak test (``bench/soak.py``): many clients on all three
servers of a real twistd at once, without a single error.
"""

from __future__ import annotations

import json
import subprocess
import sys

from twisted.trial import unittest

from tests.test_e2e import REPOSITORY, _environment


class ShortSoakTests(unittest.TestCase):
    """
    The soak script, run for a few seconds, reports no error.
    """

    timeout = 180

    def test_no_errors(self) -> None:
        """
        Six clients on each server for 6 s: every request is answered as
        expected, the server logs no error, and memory is sampled.
        """
        result = subprocess.run(
            [
                sys.executable,
                str(REPOSITORY / "bench" / "soak.py"),
                "--duration",
                "6",
                "--clients",
                "6",
                "--interval",
                "1",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=150,
            env=_environment(),
            stdin=subprocess.DEVNULL,
        )
        output = result.stdout + result.stderr
        self.assertIn(result.returncode, (0, 2), output)
        summary = json.loads(result.stdout.splitlines()[-1])
        self.assertEqual(summary["errors"], 0, output)
        self.assertEqual(summary["error_examples"], [], output)
        for server in ("https", "app", "sql"):
            self.assertGreater(summary["requests"].get(server, 0), 0, output)
        self.assertGreater(summary["connections"].get("https", 0), 0, output)
        self.assertGreaterEqual(len(summary["rss_kb"]), 3, output)
        self.assertTrue(all(kb > 0 for _, kb in summary["rss_kb"]), output)
