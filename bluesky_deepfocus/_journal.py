"""Write-ahead journal of Bluesky documents: one append-only file per run.

The journal makes the documents of a run durable as they are emitted, before (and
independently of) the catalog writer, which batches events until the stop document.
After a crash the journal is replayed into the catalog (see :mod:`bluesky_deepfocus.storage`).

File format (``<start uid>.dfjournal``)::

    MAGIC (8 bytes: b"DFJRNL1\\n")
    record*  where record = <u4 payload length> <u4 crc32 of payload> payload

Each payload is ``msgpack([name, doc])``. numpy arrays are stored as a msgpack extension
(type 1: ``msgpack([dtype.str, shape])`` followed by the raw C-order bytes), numpy scalars
as Python numbers. A record whose length or checksum does not match (a write torn by the
crash) ends the readable part of the file; everything before it is intact.

A live journal is held under an exclusive ``flock`` by the process writing it, so a
reader can tell a run that is still being measured (lock busy) from one whose writer died
or could not deliver it (lock free).
"""

from __future__ import annotations

import fcntl
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

__all__ = [
    "JOURNAL_SUFFIX",
    "JournalFile",
    "is_journal_locked",
    "journal_path",
    "pack_document",
    "read_journal",
    "unpack_document",
]

MAGIC = b"DFJRNL1\n"
JOURNAL_SUFFIX = ".dfjournal"
_HEADER = struct.Struct("<II")
_EXT_NDARRAY = 1


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            return obj.tolist()
        arr = np.ascontiguousarray(obj)
        head = msgpack.packb([arr.dtype.str, list(arr.shape)])
        return msgpack.ExtType(_EXT_NDARRAY, struct.pack("<I", len(head)) + head + arr.tobytes())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple | set | frozenset):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot journal a value of type {type(obj).__name__}: {obj!r}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != _EXT_NDARRAY:
        return msgpack.ExtType(code, data)
    (n,) = struct.unpack_from("<I", data)
    dtype, shape = msgpack.unpackb(data[4 : 4 + n])
    return np.frombuffer(data, dtype=np.dtype(dtype), offset=4 + n).reshape(shape).copy()


def pack_document(name: str, doc: dict[str, Any]) -> bytes:
    """Serialize one ``(name, doc)`` pair (numpy arrays kept binary)."""
    return msgpack.packb([name, doc], default=_default, use_bin_type=True)


def unpack_document(payload: bytes) -> tuple[str, dict[str, Any]]:
    """Inverse of :func:`pack_document`."""
    name, doc = msgpack.unpackb(payload, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    return name, doc


def journal_path(folder: Path, run_uid: str) -> Path:
    """The journal file of run ``run_uid`` in ``folder``."""
    return folder / f"{run_uid}{JOURNAL_SUFFIX}"


class JournalFile:
    """An open, exclusively locked journal of one run.

    Parameters
    ----------
    path
        File to create (it must not exist yet).
    fsync
        ``True``: ``os.fsync`` after every document, so the documents survive a power
        cut or kernel crash, not only the death of the process. ``False``: each document
        is handed to the operating system with one ``write`` (survives the process being
        killed, not a machine crash).
    """

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.records = 0
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, MAGIC)
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd
        if fsync:
            os.fsync(fd)
            _fsync_dir(self.path.parent)

    @property
    def closed(self) -> bool:
        return self._fd is None

    def append(self, name: str, doc: dict[str, Any]) -> None:
        """Append one document (one ``write`` call; ``fsync`` if asked for)."""
        if self._fd is None:
            raise ValueError(f"journal {str(self.path)!r} is closed")
        payload = pack_document(name, doc)
        record = _HEADER.pack(len(payload), zlib.crc32(payload)) + payload
        view = memoryview(record)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        if self.fsync:
            os.fsync(self._fd)
        self.records += 1

    def close(self) -> None:
        """Close the file and release its lock (the file stays)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Delete the journal (its run is safely stored elsewhere) and close it."""
        try:
            self.path.unlink(missing_ok=True)
        finally:
            self.close()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_journal_locked(path: Path) -> bool:
    """Whether a live process holds ``path`` (its run is still being measured)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def read_journal(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield the intact ``(name, doc)`` records of a journal, in order.

    Reading stops silently at the first torn or corrupted record (the tail a crash may
    leave behind). A file that does not start with the journal signature raises
    ``ValueError``.
    """
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError(f"{str(path)!r} is not a bluesky-deepfocus journal")
        while True:
            header = f.read(_HEADER.size)
            if len(header) < _HEADER.size:
                return
            length, crc = _HEADER.unpack(header)
            payload = f.read(length)
            if len(payload) < length or zlib.crc32(payload) != crc:
                return
            try:
                yield unpack_document(payload)
            except (ValueError, msgpack.UnpackException):
                return
