"""
The benchmark harness's pure parts: reading ``/proc/PID/stat``, summing a
process tree, and rendering the table. Nothing here is timed.
"""

from __future__ import annotations

from twisted.trial import unittest

from bench import clients, figures, procstat, profile, report, suite

#: A /proc/PID/stat line whose command holds a space and a parenthesis.
STAT = (
    "4242 (tw istd) x) S 1 4242 4242 0 -1 4194560 9000 0 0 0 "
    "150 30 7 3 20 0 1 0 1000 123456789 2500 18446744073709551615 "
    "1 1 0 0 0 0 0 16781312 2 0 0 0 17 0 0 0 0 0 0 0 0 0 0 0 0 0 0"
)


def _stat(pid: int, parent: int, ticks: int) -> procstat.ProcessStat:
    return procstat.ProcessStat(pid, "p", "S", parent, ticks, 0, 0, 0, 10)


class ProcStatTests(unittest.TestCase):
    """Parsing ``/proc/PID/stat`` and summing a server's process tree."""

    def test_parse(self) -> None:
        """The fields after a command holding spaces and ')' are read right."""
        stat = procstat.parse_stat(STAT)
        self.assertEqual(
            (stat.pid, stat.command, stat.state, stat.parent),
            (4242, "tw istd) x", "S", 1),
        )
        self.assertEqual(
            (stat.user_ticks, stat.system_ticks, stat.cpu_ticks, stat.rss_pages),
            (150, 30, 190, 2500),
        )

    def test_not_stat(self) -> None:
        """A line that is not in the stat format is refused."""
        self.assertRaises(ValueError, procstat.parse_stat, "4242 nothing")

    def test_tree(self) -> None:
        """A tree holds the root and its descendants, not its siblings."""
        stats = {
            1: _stat(1, 0, 1),
            10: _stat(10, 1, 100),
            11: _stat(11, 10, 20),
            12: _stat(12, 11, 3),
            20: _stat(20, 1, 5000),
        }
        found = procstat.tree(10, stats)
        self.assertEqual(sorted(s.pid for s in found), [10, 11, 12])
        self.assertEqual(procstat.cpu_seconds(found), 123 / procstat.CLOCK_TICKS)
        self.assertEqual(procstat.rss_bytes(found), 30 * procstat.PAGE_SIZE)
        self.assertEqual(procstat.tree(99, stats), [])

    def test_cores_busy(self) -> None:
        """A core's busy time is its user, nice, system and steal time."""
        text = (
            "cpu  10 0 10 100 5 0 0 0 0 0\n"
            "cpu0 3 1 2 50 4 1 1 2 0 0\n"
            "cpu1 7 0 8 50 1 0 0 0 0 0\nintr 5\n"
        )
        busy = procstat.parse_cpu_lines(text)
        self.assertEqual(
            busy, {0: 8 / procstat.CLOCK_TICKS, 1: 15 / procstat.CLOCK_TICKS}
        )


class ReportTests(unittest.TestCase):
    """The table's ratios, verdicts and rendering."""

    def test_ratio_target(self) -> None:
        """A ratio target is judged against its own reference's median."""
        figure = report.Figure(
            "keep-alive",
            "requests/CPU-s",
            True,
            report.Samples((300.0, 310.0, 290.0)),
            {
                "stock": report.Samples((100.0, 200.0, 250.0)),
                "nginx": report.Samples((1e4,)),
            },
            report.Target("≥ 1.5× stock", ratio_at_least=1.5, reference="stock"),
        )
        self.assertEqual(figure.ratios()["stock"], 1.5)
        self.assertEqual(figure.verdict(), "met")
        table = report.render_table([figure])
        self.assertIn(
            "| keep-alive | requests/CPU-s (higher is better) | 300 (290–310)", table
        )
        self.assertIn("| ″ | ″ | ″ | nginx | 10,000 | 0.03× |", table)

    def test_absolute_target_and_skip(self) -> None:
        """An upper bound is missed above it; a skipped figure says why."""
        over = report.Figure(
            "handshake",
            "ms",
            False,
            report.Samples((1.2,)),
            target=report.Target("≤ 1 ms", at_most=1.0),
        )
        self.assertEqual(over.verdict(), "missed")
        skipped = report.Figure(
            "sql", "selects/s", True, report.Samples(), skipped="no pgbench"
        )
        table = report.render_table([over, skipped])
        self.assertIn("| handshake | ms (lower is better) | 1.20 | — |", table)
        self.assertIn("not measured: no pgbench", table)


class HarnessTests(unittest.TestCase):
    """The clients' framing and the core lists."""

    def test_count_frames(self) -> None:
        """Complete frames are taken off the buffer, a partial one stays."""
        buffer = bytearray(
            clients.frame(b"ab") + clients.frame(b"") + b"\x00\x00\x00\x05abc"
        )
        self.assertEqual(clients.count_frames(buffer), (2, 10))
        self.assertEqual(bytes(buffer), b"\x00\x00\x00\x05abc")

    def test_bulk_payload(self) -> None:
        """A bulk request is exactly 1 MiB of JSON."""
        self.assertEqual(len(clients.bulk_payload(12345)), clients.BULK_SIZE)

    def test_s_time_resumed_share(self) -> None:
        """Only s_time's progress marks count as new or resumed sessions."""
        out = "***rr\nrrrrr\n\n10 connections in 1.20s; bytes read 99\n"
        out += "10 connections in 2 real seconds, 9 bytes read per connection\n"
        self.assertEqual(figures._s_time_parse([out]), (10, "only 70% resumed"))

    def test_cpu_count(self) -> None:
        """taskset lists count their cores."""
        self.assertEqual(
            [suite.cpu_count(c) for c in ("0", "0-3", "0,2-3", "")], [1, 4, 3, 1]
        )


#: py-spy raw output: two busy stacks and one waiting in epoll.
_TOP = 'process 7:"twistd";run (twisted/internet/base.py:1)'
_SITE = "/v/site-packages/"
RAW = "\n".join(
    [
        f"{_TOP};EPollReactor.doPoll ({_SITE}twisted/internet/epollreactor.py:9) 50",
        f"{_TOP};Connection.do_handshake ({_SITE}OpenSSL/SSL.py:3) 30",
        f"{_TOP};SQLServerProtocol.lineReceived (/r/twisted_tls4d/sql/protocol.py:5);"
        f"Logger.debug ({_SITE}twisted/logger/_logger.py:2) 10",
    ]
)


class ProfileTests(unittest.TestCase):
    """Reading py-spy's raw stacks."""

    def test_summarize(self) -> None:
        """Waiting samples are set apart; own, cumulative and categories add up."""
        total, idle, own, cumulative, shares = profile.summarize(RAW)
        self.assertEqual((total, idle), (40, 50))
        self.assertEqual(own[0], ("OpenSSL/SSL.py: Connection.do_handshake", 30))
        self.assertIn(("twisted/internet/base.py: run", 40), cumulative)
        self.assertEqual(
            dict(shares),
            {"TLS handshake in OpenSSL": 30, "twisted.logger events": 10},
        )
