"""SIGINT/SIGTERM during a batch: a flag checked between images and denoising steps, so a run stops cleanly."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


class Stop:
    """The signal that asked the run to stop (None: none yet)."""

    signum: int | None = None


class Interrupted(Exception):
    """Raised from the engine's step callback to abandon the batch being sampled."""


@contextlib.contextmanager
def stop_on_signals(enabled: bool = True) -> Iterator[Stop]:
    """SIGINT/SIGTERM set a flag the run checks between images and denoising steps; a second signal
    interrupts at once. Only in the main thread (elsewhere signals cannot be handled)."""
    stop = Stop()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        if stop.signum is not None:
            raise KeyboardInterrupt
        stop.signum = signum

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
