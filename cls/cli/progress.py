"""A tiny progress bar on stderr (clsctl bench, clsctl simulate): redrawn in place on a terminal,
a line per 10% otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str = "", stream=None, enabled: bool = True, width: int = 30):
        self.total, self.label, self.width = total, label, width
        self.stream = stream or sys.stderr
        self.enabled = enabled and total > 0
        self.done = self.failed = 0
        self._start = time.perf_counter()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_tenth = -1

    def update(self, ok: bool = True) -> None:
        self.done += 1
        self.failed += not ok
        if not self.enabled:
            return
        tenth = self.done * 10 // self.total
        if self._tty or tenth != self._last_tenth:
            self._last_tenth = tenth
            self.stream.write(("\r" if self._tty else "") + self.line() + ("" if self._tty else "\n"))
            self.stream.flush()

    def line(self) -> str:
        filled = self.done * self.width // self.total
        bar = "=" * filled + (">" if filled < self.width else "") + " " * (self.width - filled - 1)
        failed = f", {self.failed} failed" if self.failed else ""
        label = f"{self.label} " if self.label else ""
        return (f"{label}{self.done}/{self.total} [{bar[:self.width]}] "
                f"{100 * self.done // self.total:3d}% {time.perf_counter() - self._start:6.1f} s{failed}")

    def close(self) -> None:
        if self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()


def advance_to_callback(total: int, label: str = "", enabled: bool = True):
    """A bar for work reported as 'n done so far' (the simulator's progress callback)."""
    bar = Progress(total, label, enabled=enabled)

    def advance_to(num_done: int) -> None:
        while bar.done < num_done:
            bar.update()
        if num_done >= total:
            bar.close()
    return advance_to
