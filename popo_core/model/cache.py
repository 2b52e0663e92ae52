"""Directories popo builds once and keeps in its cache (the warm start, converted packaged models)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it replaces `path` (an incomplete
    leftover there is removed), on any error it is removed and `path` is left as it was. Whoever
    writes into it writes its completion marker last."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def file_lock(file: Path) -> Iterator[None]:
    """An exclusive flock on `file` (created if missing): concurrent runs build a cache entry once."""
    import fcntl

    with open(file, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
