"""Input files named by manifest rows (conditioning images and videos): finding them and their content digests.

A row names an input by a local path or by a URI that pyarrow resolves
(`file:///...`, `s3://bucket/key`, `gs://...`). An input's digest is the
sha256 of its bytes, so a job can name its image or video by content: the same
file under two names is the same input, a rewritten file is a new one.

Digests are cached in-process by (resolved path, size, mtime): a manifest
that names one image in a thousand rows reads it once, and a file rewritten
since (new size or mtime) is read again. Local paths are resolved through
symlinks, so `img.png`, `./img.png` and `file:///abs/img.png` share one entry.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs

from jobs.sources import first_line

_CHUNK = 1024 * 1024  # bytes per read while hashing; several files are hashed at once
_CACHE_SIZE = 65536  # digests kept; a manifest may name millions of distinct images
_READ_TRIES = 3  # a file that changes while being hashed is hashed again, this many times in all

FileKind = Literal["image", "video", "lora"]  # what one input file holds (an "images" list holds images)
FILE_KINDS: tuple[FileKind, ...] = ("image", "video", "lora")


class InputError(ValueError):
    """An input file that cannot be read: missing, a directory, no permission, unreachable."""


@dataclass(frozen=True)
class InputFile:
    """An existing input file: where it lives and what it was when looked at."""

    fs: pafs.FileSystem
    path: str  # inside fs; for local files absolute with symlinks resolved
    name: str  # the path or URI as the caller wrote it, for messages
    size: int
    mtime_ns: int | None  # None where the filesystem does not report one

    @property
    def cache_key(self) -> tuple[str, str, int, int] | None:
        """(where, path, size, mtime_ns), or None when the file has no mtime (then it is never cached)."""
        if self.mtime_ns is None:
            return None
        # A remote path means nothing without its filesystem (bucket region, endpoint), so
        # remote files are keyed by the URI as written; local ones by their resolved path.
        where = "local" if isinstance(self.fs, pafs.LocalFileSystem) else self.name
        return (where, self.path, self.size, self.mtime_ns)


def find_input(uri: Any) -> InputFile:
    """The file that `uri` (a local path or a pyarrow filesystem URI) names, or InputError."""
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)
    if not isinstance(uri, str) or not uri:
        raise InputError(f"an input must be a non-empty path or URI, got {uri!r:.80}")
    try:
        if "://" in uri:
            fs, path = pafs.FileSystem.from_uri(uri)
        else:
            fs, path = pafs.LocalFileSystem(), os.path.expanduser(uri)
        if isinstance(fs, pafs.LocalFileSystem):
            path = os.path.realpath(path)
        info = fs.get_file_info(path)
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise InputError(f"{uri}: cannot open input ({first_line(exc)})") from None
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"{uri}: no such file")
    if info.type != pafs.FileType.File:
        raise InputError(f"{uri}: not a file (a {info.type.name.lower()})")
    return InputFile(fs, path, uri, info.size, info.mtime_ns)


def _sha256(file: InputFile) -> str:
    """sha256 hex of the file's bytes, read in `_CHUNK` pieces."""
    h = hashlib.sha256()
    try:
        with file.fs.open_input_stream(file.path) as stream:
            while chunk := stream.read(_CHUNK):
                h.update(chunk)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{file.name}: cannot read input ({first_line(exc)})") from None
    return h.hexdigest()


_digests: OrderedDict[tuple, str] = OrderedDict()
_digests_lock = threading.Lock()


def input_digest(uri: str | os.PathLike[str]) -> str:
    """sha256 hex of the bytes of the file at `uri` (local path or pyarrow URI); InputError if unreadable.

    Streamed in chunks, never the whole file in memory, and cached by (resolved
    path, size, mtime); a file that changes while it is read is read again.
    """
    file = find_input(uri)
    for _ in range(_READ_TRIES):
        key = file.cache_key
        if key is None:  # no mtime: nothing to key a cache on or to notice a change by
            return _sha256(file)
        with _digests_lock:
            digest = _digests.get(key)
            if digest is not None:
                _digests.move_to_end(key)
                return digest
        digest = _sha256(file)
        file = find_input(uri)
        # The same size and mtime after the read as before: the bytes hashed are the file's.
        if file.cache_key == key:
            with _digests_lock:
                _digests[key] = digest
                while len(_digests) > _CACHE_SIZE:
                    _digests.popitem(last=False)
            return digest
    raise InputError(f"{file.name}: changed while being read, {_READ_TRIES} times in a row")


def _digest_or_error(uri: Any, kind: FileKind, check: Callable[[Any, FileKind], None] | None) -> str | InputError:
    try:
        digest = input_digest(uri)
        if check is not None:
            check(uri, kind)
        return digest
    except InputError as exc:
        return exc


def digest_inputs(
    files: Mapping[Any, FileKind],
    max_workers: int = 8,
    check: Callable[[Any, FileKind], None] | None = None,
) -> dict[Any, str | InputError]:
    """{uri: sha256 hex, or the InputError saying why it cannot be read} for `files` ({uri: kind}), each hashed once.

    Files are hashed in up to `max_workers` threads (reads and sha256 release the
    GIL). An unreadable file is a value, not an exception, so the caller can mark
    the rows that name it as failed and go on with the others. `check(uri, kind)`,
    when given, runs after the digest in the same thread and may raise InputError
    too (the driver passes a cheap header check: an image's, or a video's).
    """
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise ValueError(f"max_workers must be a positive integer, got {max_workers!r:.80}")
    if not isinstance(files, Mapping):
        raise TypeError(f"files must map each uri to its kind ({', '.join(FILE_KINDS)}), got {type(files).__name__}")
    bad = {repr(kind) for kind in files.values() if kind not in FILE_KINDS}
    if bad:
        raise ValueError(f"unknown input file kinds {', '.join(sorted(bad))} (known: {', '.join(FILE_KINDS)})")
    if not files:
        return {}
    items = list(files.items())
    with ThreadPoolExecutor(max_workers=min(max_workers, len(items)), thread_name_prefix="input-digest") as pool:
        return dict(zip(files, pool.map(lambda item: _digest_or_error(item[0], item[1], check), items)))
