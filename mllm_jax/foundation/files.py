"""Files written whole or not at all, with the modes a plain `open()` would give them.

`atomic_file`, `atomic_write_bytes` / `_text` / `_json` and `atomic_path` are the one way
this project writes an output file: to a temporary name, renamed into place, so a reader
never sees a half-written file. `tempfile.mkstemp` and `mkdtemp` create those with private modes (0600,
0700); renamed into place they would stay private, unreadable by colleagues on a shared
machine. `default_mode` gives a file or directory the mode `open()` or `mkdir()` would
have given it under the process's umask.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


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


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yields a fresh temporary path beside `path` (parents created) for a writer that
    wants a file name (e.g. matplotlib's savefig); when the block ends without an error
    the file, given the default mode, is renamed over `path`. On an error it is removed
    and `path` stays as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(temporary)
        default_mode(temporary)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike[str], mode: str = "w", *, newline: str | None = None
) -> Iterator[IO[Any]]:
    """Opens a temporary file beside `path` for writing (mode "w" or "wb"); when the
    block ends without an error it is flushed to disk and renamed over `path`, so a
    reader sees the old file or the whole new one, never a half-written one."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes whole files: mode 'w' or 'wb', not {mode!r}")
    with atomic_path(path) as temporary:
        encoding = None if "b" in mode else "utf-8"
        with open(temporary, mode, encoding=encoding, newline=newline) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Writes `data` as the whole content of `path`, atomically."""
    with atomic_file(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Writes `text` (UTF-8) as the whole content of `path`, atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Writes `data` as indented JSON plus a final newline, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
