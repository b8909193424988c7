"""A dependency-free progress bar: redrawn in place on a terminal, a line per tenth in logs and CI."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, width: int = 30):
        self.total, self.width = total, width
        self.start = time.perf_counter()
        self.interactive = sys.stderr.isatty()
        self.next_line = 0

    def update(self, done: int, status: str) -> None:
        """`done` of the total are finished; `status` says how they went (losses, the last entry)."""
        filled = self.width * done // self.total
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total - done)
        line = (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total}  {status}  "
            f"{elapsed:.0f}s elapsed, ~{eta:.0f}s left"
        )
        if self.interactive:
            sys.stderr.write("\r" + line)
        elif done >= self.next_line or done == self.total:
            sys.stderr.write(line + "\n")
            self.next_line = done + max(1, self.total // 10)
        sys.stderr.flush()

    def close(self) -> None:
        if self.interactive:
            sys.stderr.write("\n")
