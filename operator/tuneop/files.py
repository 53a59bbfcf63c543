"""Files written whole or not at all. Standard library only: the trainer and the S3 client in pods
use it too."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Any, Iterator, Optional


@contextlib.contextmanager
def atomic_file(dest: str, mode: str = "wb", *, prefix: str = ".part-",
                permissions: Optional[int] = None) -> Iterator[IO[Any]]:
    """A temporary file beside `dest` (its directory created), flushed, synced and renamed to `dest`
    when the block ends without an error, removed when it raises: `dest` is never partial.
    `permissions`: the file's mode bits (mkstemp's are 0600)."""
    directory = os.path.dirname(os.path.abspath(dest))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            if permissions is not None:
                os.fchmod(f.fileno(), permissions)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
