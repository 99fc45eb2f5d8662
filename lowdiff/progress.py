"""Progress of long work: a tqdm bar on a terminal, a plain line every few seconds in a log, or nothing.

Every long command (``train``, ``eval``, ``train-classifier``, ``export``, ``bench``, the quality
study) reports through :class:`Progress`, so they all behave alike:

- **terminal** (the stream is a TTY): a tqdm bar with count, rate, ETA and the command's figures
  (loss, accuracy) in its postfix;
- **log** (a file, a pipe, ``kubectl logs``, CI, ``nohup``): one plain line every ``interval_s``
  seconds and one at the end. tqdm alone is the wrong tool here: its carriage-return redraws become
  one endless line in a log file, and with ``disable=None`` (its "off when not a TTY") a training
  run in a pod would say nothing for hours;
- **quiet** (``--quiet``, or ``stream=None`` from library callers): nothing.

Results (the JSON a command prints on stdout, the final summary) are not progress and are printed
by the commands themselves; progress always goes to stderr.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

from tqdm import tqdm

Clock = Callable[[], float]


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class Progress:
    """Count ``total`` units of work (images, steps, stages) toward done; see the module docstring.

    ``update(n, **figures)`` adds ``n`` and sets the figures shown next to the count (floats are
    written with 4 significant digits). ``note(text)`` prints a message without breaking a bar.
    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        total: float,
        desc: str,
        unit: str = "it",
        *,
        stream: TextIO | None,
        interval_s: float = 10.0,
        initial: float = 0,
        clock: Clock = time.monotonic,
    ):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.stream = stream
        self.interval_s = interval_s
        self.count = initial
        self.initial = initial
        self.figures: dict[str, Any] = {}
        self._clock = clock
        self._start = self._last_line = clock()
        self._last_line_count: float | None = None
        self._closed = False
        self._bar: tqdm | None = None
        if stream is not None and _is_tty(stream):
            self._bar = tqdm(
                total=total, desc=desc, unit=unit, initial=initial, file=stream, dynamic_ncols=True, leave=True
            )

    @property
    def mode(self) -> str:
        """``"bar"``, ``"log"`` or ``"quiet"``."""
        return "quiet" if self.stream is None else "bar" if self._bar is not None else "log"

    def update(self, n: float = 1, **figures: Any) -> None:
        self.count += n
        self.figures.update(figures)
        if self._bar is not None:
            if figures:
                self._bar.set_postfix({k: _fmt(v) for k, v in self.figures.items()}, refresh=False)
            self._bar.update(n)
        elif self.stream is not None and self._clock() - self._last_line >= self.interval_s:
            self._line()

    def note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        elif self.stream is not None:
            print(text, file=self.stream, flush=True)

    def rate(self) -> float:
        """Units per second since this progress began (units counted from ``initial`` on)."""
        return (self.count - self.initial) / max(self._clock() - self._start, 1e-9)

    def _line(self) -> None:
        self._last_line, self._last_line_count = self._clock(), self.count
        rate = self.rate()
        eta = (self.total - self.count) / rate if rate > 0 and self.total > self.count else 0.0
        figures = "".join(f"  {k} {_fmt(v)}" for k, v in self.figures.items())
        done = f"{_fmt(self.count)}/{_fmt(self.total)}"
        print(
            f"{self.desc}: {done} {self.unit}  {rate:.3g} {self.unit}/s  eta {_duration(eta)}{figures}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.stream is not None and self._last_line_count != self.count:
            self._line()  # the final figures, unless the last periodic line already said them

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
