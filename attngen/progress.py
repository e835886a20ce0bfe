"""A tiny progress reporter for long CLI work (building many specs, property tests,
benchmarks), written to stderr so stdout stays machine-readable.

On a terminal the current item is redrawn in place (``3/10 causal_prefill … 4.2s``);
elsewhere (CI logs, pipes) only one line per finished item is printed.

>>> import io
>>> out = io.StringIO()
>>> with Progress(2, "build", stream=out) as p:
...     p.step("a")
...     p.step("b")
>>> [line.split(" … ")[0] for line in out.getvalue().splitlines()]
['build 1/2 a', 'build 2/2 b']
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO


class Progress:
    """Counts ``total`` named items; ``step(name)`` marks one finished."""

    def __init__(self, total: int, label: str = "", *, stream: TextIO | None = None,
                 enabled: bool = True) -> None:
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.done = 0
        self.start = time.perf_counter()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def _line(self, count: int, name: str) -> str:
        head = f"{self.label} " if self.label else ""
        return f"{head}{count}/{self.total} {name} … {self.elapsed:.1f}s"

    def begin(self, name: str) -> None:
        """Show that ``name`` is being worked on (terminal only: it is redrawn)."""
        if self.enabled and self._tty:
            self._draw(self._line(self.done + 1, name))

    def step(self, name: str, note: str = "") -> None:
        """Mark ``name`` finished; ``note`` (e.g. 'ok', 'unchanged') follows it."""
        self.done += 1
        if not self.enabled:
            return
        line = self._line(self.done, name) + (f" {note}" if note else "")
        if self._tty:
            self._draw(line)
            self.stream.write("\n")
            self._drawn = False
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _draw(self, line: str) -> None:
        self.stream.write("\r\x1b[2K" + line)
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
