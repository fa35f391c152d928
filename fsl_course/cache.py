"""The cache directory (``$FSL_COURSE_CACHE``, default ``~/.cache/fsl_course``) and
atomic writes, so an interrupted build never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def cache_dir() -> Path:
    """The cache directory, created on first use."""
    path = Path(os.environ.get("FSL_COURSE_CACHE") or Path.home() / ".cache" / "fsl_course")
    path = path.expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    The rename is atomic on POSIX and Windows, so readers see either the old file or the
    complete new one, never a partial write. On an exception the temporary file is removed.

    >>> with atomic_write(target) as tmp:          # doctest: +SKIP
    ...     np.savez(tmp, images=images)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private (0600); give it the usual permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
