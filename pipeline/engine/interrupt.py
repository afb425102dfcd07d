"""Stopping a run on SIGINT (Ctrl-C) or SIGTERM within seconds, the cache left consistent.

`stopping_on_signals()` (the CLI's) turns either signal into `Interrupted` in the main thread and sets
STOP, which the work running in other threads sees at its next check: a shard task before it starts, a
training loop at every iteration (pipeline.training saves a checkpoint there first), per-image loops at
each image they read (`check_stop`). Shards that finished keep their records; the one that stopped leaves
only a temporary file, removed by the next run, which resumes there. A second signal ends the process at
once, as SIGKILL would (the cache survives that too: docs/cache.md).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal number, as shells report it


class StopFlag:
    """Set once a stop is asked for, with the signal that asked; seen by every thread of the process."""

    def __init__(self):
        self.event, self.signal_number = threading.Event(), signal.SIGINT

    def set(self, signal_number: int) -> None:
        self.signal_number = signal_number
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()

    def clear(self) -> None:
        self.event.clear()


STOP = StopFlag()


class Interrupted(KeyboardInterrupt):
    """The run was asked to stop (SIGINT or SIGTERM); `exit_code` is what the command returns."""

    def __init__(self, signal_number: int = signal.SIGINT):
        super().__init__(signal.Signals(signal_number).name)
        self.exit_code = EXIT_CODES.get(signal_number, 130)


def check_stop() -> None:
    """Raise Interrupted if a stop was asked for: called between units of work (an image, an iteration)."""
    if STOP.is_set():
        raise Interrupted(STOP.signal_number)


@contextlib.contextmanager
def stopping_on_signals():
    """Inside, SIGINT and SIGTERM set STOP and raise Interrupted in the main thread; a second one ends the
    process at once with the same exit code. The previous handlers are restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signal_number, _frame):
        if STOP.is_set():
            os._exit(EXIT_CODES.get(signal_number, 130))
        STOP.set(signal_number)
        raise Interrupted(signal_number)

    previous = {number: signal.signal(number, handle) for number in EXIT_CODES}
    STOP.clear()
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        STOP.clear()

