"""Progress of long loops: a tqdm bar on a terminal, periodic plain lines when stderr is a log file.

Why not tqdm alone: without a terminal it still redraws with carriage returns, so a cluster log gets one line
of hundreds of overwritten bars (or nothing, with ``disable``) and a run that is capturing or evaluating for
minutes looks hung. Here a log gets one line every ``every_s`` seconds and one at the end, with counts and rates.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator, TextIO

from tqdm.auto import tqdm


def progress(iterable: Iterable, *, desc: str, total: int | None = None, initial: int = 0, enabled: bool = True,
             unit: str = "batch", every_s: float = 30.0, stream: TextIO | None = None):
    """``iterable`` wrapped with progress output (on the main process: pass ``enabled=is_main``).

    The result iterates like ``iterable``, has its ``len`` when it has one, and ``set_postfix(**values)``.
    """
    if not enabled:
        return _Quiet(iterable)
    stream = stream or sys.stderr
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, desc=desc, total=total, initial=initial, unit=unit, file=stream)
    return _LogLines(iterable, desc, total, initial, unit, every_s, stream)


class _Quiet:
    def __init__(self, iterable: Iterable) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator:
        return iter(self.iterable)

    def __len__(self) -> int:
        return len(self.iterable)  # type: ignore[arg-type]

    def set_postfix(self, **values: Any) -> None:
        pass


class _LogLines(_Quiet):
    """Plain ``desc: done/total unit (elapsed, rate) postfix`` lines, at most one per ``every_s`` seconds."""

    def __init__(self, iterable, desc, total, initial, unit, every_s, stream) -> None:
        super().__init__(iterable)
        self.desc, self.total, self.initial, self.unit = desc, total, initial, unit
        self.every_s, self.stream = every_s, stream
        self.postfix = ""

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def _line(self, done: int, start: float, final: bool) -> None:
        elapsed = time.perf_counter() - start
        count = f"{done}/{self.total}" if self.total is not None else f"{done}"
        new = done - self.initial
        rate = f", {elapsed / new:.2f} s/{self.unit}" if new > 0 else ""
        end = " done" if final else ""
        extra = f" {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {count} {self.unit}{'es' if self.unit.endswith('h') else 's'} ({elapsed:.0f} s{rate})"
              f"{extra}{end}", file=self.stream, flush=True)

    def __iter__(self) -> Iterator:
        start = last = time.perf_counter()
        done = self.initial
        for item in self.iterable:
            yield item
            done += 1
            now = time.perf_counter()
            if now - last >= self.every_s:
                self._line(done, start, final=False)
                last = now
        self._line(done, start, final=True)
