"""
The code follows the project's style: ruff's lint rules and formatting, as
configured in pyproject.toml.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

REPOSITORY = Path(__file__).resolve().parent.parent
CHECKED = ["twisted_tls4d", "tests", "twisted"]


def _ruff(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *arguments, *CHECKED],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=120,
    )


class RuffTests(unittest.TestCase):
    """
    ruff finds nothing to report and nothing to reformat.
    """

    def setUp(self) -> None:
        try:
            import ruff  # noqa: F401
        except ImportError:
            msg = "ruff is not installed (pip install '.[test]')"
            raise unittest.SkipTest(msg) from None

    def test_lint(self) -> None:
        """ruff check reports no problem."""
        result = _ruff("check", "--output-format", "concise")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_format(self) -> None:
        """ruff format would change no file."""
        result = _ruff("format", "--check")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
