"""File helpers shared by the data cache, checkpoints and exports: hashing and all-or-nothing folders."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import UserError


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` a uniquely named temporary file beside ``path``, then rename it onto ``path``:
    readers never see a partial file, and concurrent writers never share a temporary name."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomically(path: Path, data: bytes) -> None:
    write_atomically(path, lambda tmp: tmp.write_bytes(data))


def require_new_folder(out: Path) -> None:
    """Refuse an output folder that exists and is not empty (nothing on disk is ever overwritten)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty folder: choose a new --out folder")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Write a new folder all at once: yields a temporary sibling, renamed to ``out`` on success.

    ``out`` must not exist or be empty; on any error the temporary folder is removed and ``out``
    stays as it was.
    """
    out = Path(out)
    require_new_folder(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700: the finished folder follows the user's umask
        yield tmp
        for p in tmp.rglob("*"):  # safetensors writes 0600: a model folder is for sharing
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~_umask())
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        from safetensors import SafetensorError

        if isinstance(e, (OSError, SafetensorError)):  # a full disk or a file size limit: nothing was left behind
            reason = getattr(e, "strerror", None) or " ".join(str(e).split())[:200]
            raise UserError(f"cannot write {out} ({reason}): free some space and run the command again") from None
        raise
