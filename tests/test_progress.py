"""Progress output: a bar on a terminal, plain periodic lines (never carriage returns) in a log."""
from __future__ import annotations

import io

from cdad_dist.progress import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_plain_lines_with_counts_and_no_carriage_returns():
    log = io.StringIO()
    wrapped = progress(range(4), desc="task 1 basis capture", every_s=0.0, stream=log)
    assert len(wrapped) == 4
    wrapped.set_postfix(loss="0.1")
    assert list(wrapped) == [0, 1, 2, 3]
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("task 1 basis capture: 1/4 batches (") and lines[0].endswith("loss=0.1")
    assert lines[-1].startswith("task 1 basis capture: 4/4 batches") and lines[-1].endswith(" done")


def test_a_log_gets_at_most_one_line_per_period_plus_the_last():
    log = io.StringIO()
    list(progress(range(1000), desc="eval", every_s=3600.0, stream=log, unit="image", initial=0))
    assert log.getvalue().splitlines() == [line for line in log.getvalue().splitlines() if "1000/1000" in line]
    assert len(log.getvalue().splitlines()) == 1


def test_a_terminal_gets_a_bar_and_disabled_progress_is_silent():
    term = _Terminal()
    list(progress(range(3), desc="eval demo/carpet", stream=term))
    assert "\r" in term.getvalue() and "3/3" in term.getvalue()
    quiet = io.StringIO()
    assert list(progress(iter(range(3)), desc="x", enabled=False, stream=quiet)) == [0, 1, 2]
    assert quiet.getvalue() == ""
