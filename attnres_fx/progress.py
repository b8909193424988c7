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

    def update(self, done: int, losses: dict[str, float], tokens_per_second: float) -> None:
        filled = self.width * done // self.total
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total - done)
        loss_text = "  ".join(f"{name} {loss:.3f}" for name, loss in losses.items())
        line = (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total}  loss: {loss_text}  "
            f"{tokens_per_second / 1e3:.1f}k tok/s  {elapsed:.0f}s elapsed, ~{eta:.0f}s left"
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
