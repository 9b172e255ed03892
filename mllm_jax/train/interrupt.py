"""Ctrl-C during training: finish the running step, checkpoint it, then stop.

A KeyboardInterrupt raised at an arbitrary point can land inside orbax's asynchronous
save and leave its background thread waiting forever at interpreter exit. While a
:class:`StopOnInterrupt` is active, the first SIGINT only sets a flag the loop checks at
each step boundary; a second one raises KeyboardInterrupt at once as usual.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any

import jax


class StopOnInterrupt:
    """Context manager turning the first SIGINT into a stop request (`requested`).

    Only in a single-process job and on the main thread: in a multi-host job every process
    must stop at the same step, so there Ctrl-C keeps its default behaviour.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> StopOnInterrupt:
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "interrupt: stopping after the current step with a checkpoint "
            "(Ctrl-C again to abort at once)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
