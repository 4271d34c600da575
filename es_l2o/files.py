"""Atomic file writes, and the removal of what a killed write leaves behind.

`write_atomic` writes a file to a temporary `.NAME.tmp-XXXXXXXX.part` beside it,
flushes and fsyncs it, renames it over `NAME` and fsyncs the folder: readers see the
old file or the complete new one, never a part. A kill during the write leaves the
temporary file; `remove_temp_files` deletes such files from a folder, and a run that
continues calls it on its folders before it writes anything.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> write_atomic(folder / "notes.txt", "hello")
    >>> (folder / ".notes.txt.tmp-left-by-a-kill.part").write_bytes(b"hel")
    3
    >>> [p.name for p in remove_temp_files(folder)]
    ['.notes.txt.tmp-left-by-a-kill.part']
    >>> sorted(p.name for p in folder.iterdir())
    ['notes.txt']
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

#: temporary files of `write_atomic` (`.NAME.tmp-*.part`), of earlier versions
#: (`.tmp-*.part`) and of the earlier config writer (`.tmp-config.yaml`)
TEMP_NAME = re.compile(r"^\.(?:.+\.)?tmp-.*\.part$|^\.tmp-config\.yaml$")


def fsync_directory(directory: str | os.PathLike) -> None:
    """Makes a rename in `directory` durable (where the platform allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Writes `data` to `path` through a synced temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.tmp-", suffix=".part"
    )
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these files are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def temp_files(directory: str | os.PathLike) -> list[Path]:
    """The temporary files of killed `write_atomic` calls in `directory`."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(directory / n for n in os.listdir(directory) if TEMP_NAME.match(n))


def remove_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Deletes the temporary files of killed writes in `directory`; returns them.

    Call it only where no other process is writing into `directory` at the time.
    """
    found = temp_files(directory)
    for path in found:
        path.unlink(missing_ok=True)
    return found
