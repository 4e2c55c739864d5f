"""Progress lines for long work (weight loading, checkpoint writing) on stderr."""

from __future__ import annotations

import sys
import time


class Progress:
    """Counts units of work; redraws one line on a terminal, prints every 10% otherwise."""

    def __init__(self, total: float, what: str, *, unit: str = "", enabled: bool = True) -> None:
        self.total, self.what, self.unit = max(total, 1e-9), what, unit
        self.enabled = enabled
        self.done = 0.0
        self.start = time.monotonic()
        self._tty = sys.stderr.isatty()
        self._last_decile = -1

    def advance(self, amount: float = 1.0) -> None:
        self.done += amount
        if not self.enabled:
            return
        frac = min(self.done / self.total, 1.0)
        if self._tty:
            print(f"\r{self._line(frac)}", end="", file=sys.stderr, flush=True)
        elif int(frac * 10) > self._last_decile:
            self._last_decile = int(frac * 10)
            print(self._line(frac), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self._tty:
            print(file=sys.stderr, flush=True)

    def _line(self, frac: float) -> str:
        elapsed = time.monotonic() - self.start
        eta = elapsed / frac * (1 - frac) if frac > 0 else float("nan")
        amount = f"{self.done:.1f}/{self.total:.1f}{self.unit}" if self.unit else ""
        return f"{self.what}: {frac:6.1%} {amount} {elapsed:.0f}s elapsed, ETA {eta:.0f}s"
