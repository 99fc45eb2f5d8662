"""lowdiff.progress: a bar on a terminal, periodic lines in a log, nothing when quiet."""

from __future__ import annotations

import io

from lowdiff.progress import Progress


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_mode_prints_a_line_per_interval_and_one_at_the_end() -> None:
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress(100, "generating", "img", stream=stream, interval_s=10, clock=clock)
    assert progress.mode == "log"
    clock.now = 5
    progress.update(20, loss=0.123456)
    assert stream.getvalue() == ""  # not yet 10 s since the start
    clock.now = 10
    progress.update(20)
    first = stream.getvalue().splitlines()
    assert len(first) == 1
    # 40 images in 10 s = 4 img/s; 60 left → 15 s
    assert first[0] == "generating: 40/100 img  4 img/s  eta 15 s  loss 0.1235"
    clock.now = 12
    progress.update(10)
    assert len(stream.getvalue().splitlines()) == 1  # 2 s after the last line
    clock.now = 15
    progress.update(50)
    progress.close()
    progress.close()  # idempotent: the summary line is written once
    lines = stream.getvalue().splitlines()
    assert lines[-1] == "generating: 100/100 img  6.67 img/s  eta 0 s  loss 0.1235"
    assert len(lines) == 2


def test_close_does_not_repeat_a_line_that_already_said_it_all() -> None:
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress(10, "export", "stage", stream=stream, interval_s=1, clock=clock)
    clock.now = 2
    progress.update(10)
    progress.close()
    assert stream.getvalue().splitlines() == ["export: 10/10 stage  5 stage/s  eta 0 s"]


def test_quiet_writes_nothing() -> None:
    with Progress(3, "x", stream=None) as progress:
        progress.update(3, loss=1.0)
        progress.note("hello")
        assert progress.mode == "quiet"
        assert progress.count == 3


def test_terminal_gets_a_tqdm_bar_with_figures() -> None:
    stream = Terminal()
    with Progress(10, "training", "img", stream=stream) as progress:
        assert progress.mode == "bar"
        progress.update(4, loss=0.5)
        progress.note("a message")
        progress.update(6)
    text = stream.getvalue()
    assert "training" in text and "10/10" in text and "loss=0.5" in text
    assert "a message" in text


def test_initial_counts_toward_done_but_not_the_rate() -> None:
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress(100, "resume", "img", stream=stream, initial=60, clock=clock)
    clock.now = 20
    progress.update(20)
    progress.close()
    assert stream.getvalue().strip() == "resume: 80/100 img  1 img/s  eta 20 s"


def test_long_durations_read_as_hours_and_minutes() -> None:
    stream, clock = io.StringIO(), FakeClock()
    progress = Progress(10_000, "train", "img", stream=stream, clock=clock)
    clock.now = 100
    progress.update(10)  # 0.1 img/s, 9,990 left → 99,900 s = 27 h 45 min
    assert "eta 27 h 45 min" in stream.getvalue()
