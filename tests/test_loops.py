"""The one loop every background worker is made of (dicom_node.loops), with real threads."""
from __future__ import annotations

import threading
import time

from dicom_node.loops import Loop


class _Counting(Loop):
    """Counts its steps; fails while ``broken``; has work while ``work`` > 0."""

    def __init__(self, stop: threading.Event, wake: threading.Event | None = None) -> None:
        super().__init__("counting", stop, wake)
        self.steps, self.work, self.broken = 0, 0, False
        self.reports: list[str] = []
        self.error_pause = 0.5

    def step(self) -> bool:
        self.steps += 1
        if self.broken:
            raise OSError("disk full")
        if self.work:
            self.work -= 1
            return True
        return False

    def idle_seconds(self) -> float:
        return 30.0

    def failed(self, exc: Exception) -> None:
        self.reports.append(f"failed {exc} (already failing: {self.failing})")

    def recovered(self) -> None:
        self.reports.append("recovered")

    def end(self) -> None:
        self.reports.append("end")


def _wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_a_loop_works_while_it_has_work_idles_until_woken_and_ends_at_stop_or_retire() -> None:
    stop, wake = threading.Event(), threading.Event()
    loop = _Counting(stop, wake)
    loop.work = 3
    loop.start()
    assert _wait_for(lambda: loop.steps == 4)  # three with work, one that found none
    time.sleep(0.3)
    assert loop.steps == 4  # idles (30 s) instead of polling
    loop.work = 1
    wake.set()
    assert _wait_for(lambda: loop.steps == 6)
    loop.retire()
    loop.join(2.0)
    assert not loop.is_alive() and loop.reports == ["end"]

    periodic = _Counting(stop)  # no wake event: only the stop ends its idling
    periodic.start()
    assert _wait_for(lambda: periodic.steps == 1)
    stop.set()
    periodic.join(2.0)
    assert not periodic.is_alive()


def test_an_error_pauses_the_loop_wakes_do_not_shorten_the_pause_and_it_recovers() -> None:
    stop, wake = threading.Event(), threading.Event()
    loop = _Counting(stop, wake)
    loop.broken = True
    loop.start()
    assert _wait_for(lambda: loop.steps == 1)
    for _ in range(20):  # a stream of wake-ups (received instances) during the pause
        wake.set()
        time.sleep(0.01)
    assert loop.steps == 1, "a wake-up must not turn a failing step into a busy loop"
    assert _wait_for(lambda: loop.steps == 2, 2.0)
    loop.broken = False
    assert _wait_for(lambda: "recovered" in loop.reports, 2.0)
    assert loop.reports[:2] == ["failed disk full (already failing: False)", "failed disk full (already failing: True)"]
    assert loop.is_alive()  # the error never ended the thread
    stop.set()
    t0 = time.monotonic()
    loop.join(2.0)
    assert not loop.is_alive() and time.monotonic() - t0 < 1.0
    assert loop.reports[-1] == "end"
