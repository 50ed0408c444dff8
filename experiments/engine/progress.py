"""The progress line of a training run."""
from __future__ import annotations

import sys
import time


class Progress:
    """step/total, loss, steps/s and ETA on stderr: one updating line on a terminal, else a line every 10 s."""

    def __init__(self, total_steps: int, first_step: int, enabled: bool):
        self.total, self.first, self.enabled = total_steps, first_step, enabled
        self.start = self.last_line = time.perf_counter()
        self.terminal = sys.stderr.isatty()

    def update(self, record: dict) -> None:
        now = time.perf_counter()
        done = record["step"] == self.total
        if not self.enabled or not (self.terminal or done or now - self.last_line >= 10):
            return
        self.last_line = now
        rate = (record["step"] - self.first) / max(now - self.start, 1e-9)
        eta = (self.total - record["step"]) / max(rate, 1e-9)
        epoch = f" | epoch {record['epoch'] + 1}" if "epoch" in record else ""  # language models count steps only
        line = (f"step {record['step']}/{self.total}{epoch} | loss {record['loss']:.4f} | "
                f"{rate:.2f} steps/s | ETA {eta // 60:.0f}m{eta % 60:02.0f}s")
        print(("\r" if self.terminal else "") + line, end="\n" if done or not self.terminal else "",
              file=sys.stderr, flush=True)
