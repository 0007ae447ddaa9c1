"""How `replicator jobs --follow` and `machine ... --wait` draw a job: redrawn in place on a terminal, plain
lines (new log entries, every 10 %) otherwise; `status` uses the same line."""
from __future__ import annotations

import io

from replicator.cli.progress import JobDisplay
from replicator.orchestration.jobs import JobRegistry

MiB = 1 << 20


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    t = 1000.0

    def __call__(self):
        return self.t


def test_plain_lines_for_logs_and_every_ten_percent():
    clock = Clock()
    job = JobRegistry(None, clock=clock).create("resync", "vm01", total=100 * MiB)
    out = io.StringIO()
    display = JobDisplay(out)
    display.update(job.summary())
    for done in (3, 6, 12, 15, 58):
        clock.t += 1
        job.progress(done * MiB)
        display.update(job.summary())
    job.note("d0.vhdx: 12 blocks differ")
    job.progress(100 * MiB)
    job.succeed()
    display.close(job.summary())
    lines = out.getvalue().splitlines()
    assert lines[0] == "job-00001: resync vm01 started"
    assert [line.split("] ")[1].split("%")[0].strip() for line in lines if "[" in line] == \
        ["0.0", "12.0", "58.0", "100.0"]                    # 3, 6 and 15 % are in steps already shown
    assert "job-00001: d0.vhdx: 12 blocks differ" in lines and "job-00001: succeeded" in lines
    assert lines[-1].startswith("job-00001 resync vm01 [" + "#" * 30 + "] 100.0% 100.0 MiB/100.0 MiB")
    assert lines[-1].endswith(" succeeded")


def test_a_terminal_redraws_one_line():
    clock = Clock()
    job = JobRegistry(None, clock=clock).create("initial", "vm01", total=10 * MiB)
    term = Terminal()
    display = JobDisplay(term)
    display.update(job.summary())
    clock.t += 2
    job.progress(5 * MiB)
    display.update(job.summary())
    job.fail("target unreachable")
    display.close(job.summary())
    text = term.getvalue()
    assert text.startswith("\r\x1b[Kjob-00001: initial vm01 started\n\r\x1b[Kjob-00001 initial vm01 [")
    assert "\r\x1b[Kjob-00001 initial vm01 [###############               ]  50.0% 5.0 MiB/10.0 MiB " \
           "2.5 MiB/s ETA 0:02" in text
    assert text.endswith("failed\n") and "job-00001: failed: target unreachable\n" in text
    assert text.count("\n") == 3                          # log lines and the last state; progress in place
