"""A one-line progress bar on stderr (only when stderr is a terminal; silent in logs and CI)."""
from __future__ import annotations

import sys
import time

from .common import human


class ProgressBar:
    def __init__(self, label: str = "", stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.label = label
        self.start = time.monotonic()

    def __call__(self, name: str, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        frac = min(1.0, done / total)
        elapsed = time.monotonic() - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0
        bar = "#" * int(frac * 30)
        self.stream.write(f"\r{self.label}{name} [{bar:<30}] {frac:6.1%} {human(done)} of {human(total)} "
                          f"ETA {eta:5.0f} s ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
