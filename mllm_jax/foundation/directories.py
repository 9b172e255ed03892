"""Output directories written whole or not at all, and refused in one line when they
cannot be written.

`atomic_directory(target)` yields a fresh temporary sibling of `target` to write into
and, when the block ends without an error, renames it into place. An existing `target`
is first renamed to a hidden sibling in the same parent (a rename within one directory
does not rewrite the moved directory's "..", so it needs no write permission on the
directory itself), and removed once the new one is in place; if the new one cannot be
put in place the old one is renamed back.

Every way the place cannot be written (a parent that is read-only, on a read-only
filesystem or not a directory; an existing output this process may not remove) raises
`OutputDirectoryError`, which names the directory and what could not be written (an
existing output that is not to be replaced: FileExistsError). What can be told in
advance (`check_output_directory`) is refused before anything is written;
what only the writes find out is undone: no temporary or set-aside directory is left
behind and an existing output stays as it was.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mllm_jax.foundation.files import default_mode


class OutputDirectoryError(OSError):
    """An output directory that cannot be created or replaced where it was asked for: the
    user's to fix (another place, or permissions)."""


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def _nearest_existing(path: Path) -> Path:
    """`path` or its closest ancestor that exists (a dangling symlink counts)."""
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return path


def _writable_dir(path: Path) -> bool:
    """Whether this process may add and remove entries of directory `path` (False for a
    read-only filesystem or an immutable directory, even for root)."""
    return os.access(path, os.W_OK | os.X_OK)


def make_directory_problem(directory: str | os.PathLike[str]) -> str | None:
    """Creates `directory` (and its parents); returns what stops it from being a writable
    directory ("not a directory", "cannot create the directory (<reason>)", "the
    directory is not writable"), or None. Callers raise their own error with it."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return "not a directory"
    except OSError as error:
        return f"cannot create the directory ({_reason(error)})"
    return None if _writable_dir(path) else "the directory is not writable"


def check_output_directory(target: str | os.PathLike[str], *, overwrite: bool) -> None:
    """Raises if directory `target` may not or cannot be written by this process; cheap
    (no writes), so called before the work whose result goes there.

    FileExistsError: `target` exists, is not an empty directory, and overwrite is False.
    OutputDirectoryError: the nearest existing ancestor of its parent is not a writable
    directory, or a directory inside an existing `target` (itself included) is not
    writable, so the old output could not be removed.
    """
    target = Path(target)
    exists = target.exists() or target.is_symlink()
    if exists and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(
            f"{target} exists and is not empty; pass overwrite=True (--overwrite on the "
            "command line)"
        )
    parent = _nearest_existing(target.parent)
    if not parent.is_dir():
        raise OutputDirectoryError(f"cannot write {target}: {parent} is not a directory")
    if not _writable_dir(parent):
        raise OutputDirectoryError(
            f"cannot write {target}: directory {parent} is not writable (nothing was written)"
        )
    if target.is_dir() and not target.is_symlink():
        for root, _, _ in os.walk(target):
            if not _writable_dir(Path(root)):
                raise OutputDirectoryError(
                    f"cannot replace {target}: directory {root} is not writable, so the "
                    "existing output cannot be removed (it is left as it was)"
                )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _put_in_place(tmp: Path, target: Path) -> None:
    """Renames the finished `tmp` to `target`, replacing an existing `target`."""
    if not (target.exists() or target.is_symlink()):
        try:
            os.rename(tmp, target)
        except OSError as error:
            raise OutputDirectoryError(f"cannot write {target}: {_reason(error)}") from None
        return
    old = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
    try:
        os.rename(target, old)
    except OSError as error:
        raise OutputDirectoryError(
            f"cannot replace {target}: it cannot be moved ({_reason(error)}); it is left as it was"
        ) from None
    try:
        os.rename(tmp, target)
    except OSError as error:
        os.rename(old, target)  # the existing output back where it was
        raise OutputDirectoryError(
            f"cannot replace {target}: {_reason(error)}; it is left as it was"
        ) from None
    try:
        _remove(old)
    except OSError as error:
        # check_output_directory makes this unlikely (permissions changed meanwhile).
        raise OutputDirectoryError(
            f"wrote {target}, but the output it replaced, moved to {old}, could not be "
            f"removed ({_reason(error)})"
        ) from None


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields an empty temporary directory beside `target`; when the block ends without
    an error its contents get the umask's usual modes (mkdtemp and safetensors create
    them private) and it replaces `target`. On an error nothing is left behind: the
    temporary directory and any parent directories this call created are removed.
    Raises OutputDirectoryError when `target` cannot be written or replaced; whether an
    existing `target` may be replaced is the caller's to decide (`check_output_directory`
    with its overwrite flag)."""
    target = Path(target)
    check_output_directory(target, overwrite=True)
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    tmp = None
    try:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        except OSError as error:
            raise OutputDirectoryError(
                f"cannot write {target}: cannot create a directory in {target.parent} "
                f"({_reason(error)})"
            ) from None
        default_mode(tmp, directory=True)
        yield tmp
        for path in tmp.rglob("*"):
            default_mode(path, directory=path.is_dir())
        _put_in_place(tmp, target)
        created = []
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        for directory in created:  # innermost first; only the ones now empty
            with contextlib.suppress(OSError):
                directory.rmdir()
