"""SIGTERM/SIGUSR1 as a polite stop: a flag the work in progress reads at a point where stopping loses
nothing (a pretraining step, a predicted block, a finetuning run), instead of dying mid-write."""
from __future__ import annotations

import signal
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """SIGTERM/SIGUSR1 set a flag (the work in progress decides where to stop); the previous handlers
    come back on exit. Outside the main thread signals stay as they are."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __call__(self) -> bool:
        return self.requested

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
