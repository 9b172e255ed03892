"""File modes of atomically written outputs.

Outputs are written to a temporary name and renamed into place, so a reader never sees a
half-written file. `tempfile.mkstemp` and `mkdtemp` create those with private modes (0600,
0700); renamed into place they would stay private, unreadable by colleagues on a shared
machine. `default_mode` gives a file or directory the mode `open()` or `mkdir()` would
have given it under the process's umask.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where the system tells it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but brief)
    os.umask(mask)
    return mask


def default_mode(path: str | os.PathLike[str], *, directory: bool = False) -> None:
    """Sets `path` to the mode a plain `open()` (0666) or `mkdir()` (0777) would give it
    under the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())
