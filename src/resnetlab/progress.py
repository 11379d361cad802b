"""A one-line progress display on stderr: position, rate, ETA and whatever numbers the caller passes."""

from __future__ import annotations

import sys
import time


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Redraws at most every `interval` seconds; on a non-terminal stream, prints a line every `interval` instead."""

    def __init__(self, total: int, label: str = "", *, start: int = 0, stream=None, enabled: bool = True,
                 interval: float | None = None):
        self.total, self.label, self.start, self.enabled = total, label, start, enabled
        self.stream = stream or sys.stderr
        self.terminal = self.stream.isatty()
        self.interval = interval if interval is not None else (0.25 if self.terminal else 30.0)
        self.started = time.perf_counter()
        self.last_drawn = -float("inf")
        self.position = start

    def update(self, position: int, **numbers: str) -> None:
        self.position = position
        now = time.perf_counter()
        if self.enabled and (now - self.last_drawn >= self.interval or position >= self.total):
            self.last_drawn = now
            self._draw(now, numbers)

    def _draw(self, now: float, numbers: dict) -> None:
        done = self.position - self.start
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.position) / rate if rate > 0 else 0.0
        width = 20
        filled = int(width * self.position / max(1, self.total))
        details = " ".join(f"{k} {v}" for k, v in numbers.items())
        line = (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.position}/{self.total} {details} "
                f"elapsed {format_duration(elapsed)} ETA {format_duration(eta)}")
        if self.terminal:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.terminal:
            self.stream.write("\n")
            self.stream.flush()
