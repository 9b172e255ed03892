"""Worker processes that do not outlive the process that started them."""

from __future__ import annotations

import os
import threading
from pathlib import Path

POLL_SECONDS = 0.5


def is_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        # state is the field after the parenthesised command name, which may hold spaces
        return stat.read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (not Linux): kill(pid, 0) is all we know


def exit_with(pid: int, poll_seconds: float = POLL_SECONDS) -> threading.Thread:
    """Ends this process (exit status 1, without cleanup: the parent that would have
    wanted it is gone) once process ``pid`` is no longer alive.

    A worker blocked on its task queue never learns that a parent killed with SIGKILL is
    gone (multiprocessing's pools and forkserver do not tell it), and stays for minutes
    holding memory and a core. A daemon thread polls the parent instead.
    """

    def watch() -> None:
        event = threading.Event()
        while not event.wait(poll_seconds):
            if not is_alive(pid):
                os._exit(1)

    thread = threading.Thread(target=watch, name=f"exit-with-{pid}", daemon=True)
    thread.start()
    return thread
