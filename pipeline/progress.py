"""Run progress: a bar on a terminal, a log line every few seconds otherwise."""
from __future__ import annotations

import sys
import time
from typing import TextIO


class RunProgress:
    def __init__(self, total: int, stream: TextIO | None = None, log_every: float = 10.0, width: int = 30):
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.log_every = log_every
        self.width = width
        self.started = time.monotonic()
        self.last_line = float("-inf")
        self.done = 0
        self.failed = 0

    def update(self, done: int, failed: int, force: bool = False) -> None:
        self.done, self.failed = done, failed
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r" + self.line(now))
            self.stream.flush()
        elif force or now - self.last_line >= self.log_every:
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()
            self.last_line = now

    def line(self, now: float) -> str:
        finished = self.done + self.failed
        elapsed = max(now - self.started, 1e-9)
        per_minute = 60.0 * finished / elapsed
        remaining = self.total - finished
        eta = f"{remaining / (finished / elapsed):.0f}s" if finished else "?"
        filled = self.width * finished // self.total if self.total else self.width
        bar = "#" * filled + "." * (self.width - filled)
        return (
            f"[{bar}] done {self.done}  failed {self.failed}  total {self.total}  "
            f"{per_minute:.1f} videos/min  ETA {eta}"
        )

    def close(self) -> None:
        self.update(self.done, self.failed, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
