"""The node's background loops: one thread class that every periodic worker is made of.

Translators, deliverers, webhook senders, the notifier, the housekeeper and the heartbeat all do
the same thing: a step, a pause, again, until the node stops or a reload retires them; an
unexpected error (the spool's disk is full, the database is away) must neither kill the thread
nor turn it into a busy loop that floods the log.  That shape lives here once, so each worker
says only what its step is, how long it idles, and how it reports an outage.

Two kinds of pause, on purpose: idling (nothing to do) ends early when the loop is woken (a new
instance, a finished translation), while the pause after an error does not, so a stream of
wake-ups cannot turn a broken database into a busy loop.  Both end at once on stop or retire.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from dicom_node.database import first_line

if TYPE_CHECKING:
    from dicom_node.config import NodeConfig

__all__ = ["Loop", "Broadcast", "POLL_SECONDS", "ERROR_PAUSE"]

log = logging.getLogger("dicom_node.loops")

POLL_SECONDS = 0.5  # how long an idle loop waits before looking again (a wake-up ends it sooner)
ERROR_PAUSE = 5.0  # after an unexpected error (disk full, database busy) before trying again
STOP_CHECK_SECONDS = 0.1  # a pause on an event other than the stop notices the stop this often
RETIRE_CHECK_SECONDS = 1.0  # a pause on the stop event (after an error) notices a retire this often


class Loop(threading.Thread):
    """A daemon thread that runs :meth:`step` until the node stops or :meth:`retire` is called.

    ``step()`` returns True when it did work (then it runs again at once); otherwise the loop
    idles :meth:`idle_seconds` or until ``wake`` is set (a loop without ``wake`` is periodic: only
    the stop ends its idling).  A loop with ``WAIT_FIRST`` idles before its first step (periodic
    chores: the housekeeper, the heartbeat).  An exception in a step is reported (:meth:`failed`)
    and the loop pauses ``error_pause`` seconds; ``failing`` is True from the first failure to the
    next step that succeeds (:meth:`recovered`).
    """

    WAIT_FIRST = False
    logger = log

    def __init__(self, name: str, stop: threading.Event, wake: threading.Event | None = None,
                 config: NodeConfig | None = None) -> None:
        super().__init__(name=name, daemon=True)
        self.stop_event = stop
        self.wake = wake
        # None for a loop that needs none; a loop that reads it declares ``config: NodeConfig``
        self.config = config
        self.error_pause = ERROR_PAUSE
        self.retired = False  # a reload removed what this loop serves: finish the step, then end
        self.failing = False

    # -- what a loop says about itself ------------------------------------------------------
    def step(self) -> bool:
        raise NotImplementedError

    def idle_seconds(self) -> float:
        return POLL_SECONDS

    def begin(self) -> None:
        """Runs once in the thread before the first step (load models, purge leftovers)."""

    def end(self) -> None:
        """Runs once in the thread after the last step, also after an error in :meth:`begin`."""

    def failed(self, exc: Exception) -> None:
        """Report an error of a step (``self.failing``: an earlier step failed too)."""
        self.logger.error("%s: %s (retrying in %gs)", self.name, first_line(exc), self.error_pause)

    def recovered(self) -> None:
        """A step succeeded after one or more failed."""

    def configure(self, config: NodeConfig) -> None:
        """Take a reloaded config (dicom_node.reload has kept what needs a restart as it runs)."""
        self.config = config

    # -- the loop -----------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.retired or self.stop_event.is_set()

    def retire(self) -> None:
        self.retired = True
        if self.wake is not None:
            self.wake.set()

    def run(self) -> None:
        try:
            self.begin()
            if self.WAIT_FIRST:
                self._wait(self.stop_event, self._idle_seconds())
            while not self.done:
                if self.wake is not None:
                    self.wake.clear()  # before looking for work: a wake-up during step() is not lost
                try:
                    did_work = self.step()
                except Exception as exc:  # noqa: BLE001 - keep serving; the work stays where it was
                    self.failed(exc)
                    self.failing = True
                    self._wait(self.stop_event, self.error_pause)
                    continue
                if self.failing:
                    self.failing = False
                    self.recovered()
                if not did_work:
                    self._wait(self.wake or self.stop_event, self._idle_seconds())
        finally:
            self.end()

    def _idle_seconds(self) -> float:
        try:
            return self.idle_seconds()
        except Exception:  # noqa: BLE001 - the database is away: look again later, never die
            return ERROR_PAUSE

    def _wait(self, event: threading.Event, seconds: float) -> None:
        """Wait up to ``seconds`` for ``event``; returns early when the loop is stopped or retired."""
        deadline = time.monotonic() + seconds
        while not self.done:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if event is self.stop_event:
                event.wait(min(left, RETIRE_CHECK_SECONDS))
            elif event.wait(min(left, STOP_CHECK_SECONDS)):
                return


class Broadcast:
    """Wakes several loops at once (the translator wakes every deliverer)."""

    def __init__(self, events: list[threading.Event]) -> None:
        self.events = events

    def set(self) -> None:
        for e in self.events:
            e.set()
