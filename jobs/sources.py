"""Where manifest rows come from: a Parquet file, a directory, a glob or a filesystem URI.

Files are listed in sorted path order; a directory means every ``*.parquet``
below it, skipping names that start with ``.`` or ``_`` (``_SUCCESS``); a glob
matches as a shell does (``*`` skips names starting with ".", ``**`` is any
depth); a URI is anything pyarrow's filesystems open (``file://``, ``s3://``,
``gs://``; percent-encode spaces).
"""
from __future__ import annotations

import fnmatch
import os
import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs


class ManifestError(ValueError):
    """A problem with a whole manifest source (missing, not Parquet, no prompt column); names the file."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _match(pattern: list[str], parts: list[str]) -> bool:
    """Path segments against glob segments, as a shell does: ``**`` matches any number
    of segments, and names starting with "." match only a pattern segment that does too."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(
            _match(pattern[1:], parts[k:]) for k in range(len(parts) + 1) if not any(p.startswith(".") for p in parts[:k])
        )
    return (
        bool(parts)
        and (not parts[0].startswith(".") or pattern[0].startswith("."))
        and fnmatch.fnmatchcase(parts[0], pattern[0])
        and _match(pattern[1:], parts[1:])
    )


def _hidden(relpath: str) -> bool:
    return any(part.startswith((".", "_")) for part in relpath.split("/"))


@dataclass(frozen=True)
class SourceFile:
    fs: pafs.FileSystem
    path: str
    name: str  # for messages: the path, or the URI for remote sources

    def resolve(self, ref: str) -> str:
        """A file named in this manifest's rows (an input image): URIs and absolute paths as they are,
        relative paths taken from this manifest file's folder."""
        ref = os.path.expanduser(ref)
        if "://" in ref or os.path.isabs(ref):
            return ref
        return posixpath.normpath(posixpath.join(posixpath.dirname(self.name), ref)) if "://" not in self.name \
            else posixpath.dirname(self.name) + "/" + posixpath.normpath(ref)


def list_files(source: str) -> list[SourceFile]:
    """The Parquet files of a source, sorted by path; ManifestError if there are none."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source:
        raise ManifestError(f"manifest source must be a path or URI, got {source!r:.80}")
    scheme = source.split("://", 1)[0] if "://" in source else None
    # Split off the glob part before resolving: '?' would otherwise start a URI query.
    segments = source.split("/")
    cut = next((i for i, seg in enumerate(segments) if _has_glob(seg)), len(segments))
    prefix, pattern_rest = "/".join(segments[:cut]), segments[cut:]
    try:
        if scheme is None:
            fs, base = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(prefix or "."))
        else:
            fs, base = pafs.FileSystem.from_uri(prefix)
    except (pa.ArrowInvalid, OSError, ValueError) as exc:
        raise ManifestError(f"{source}: cannot open manifest source ({first_line(exc)})") from None
    base = base.rstrip("/") or "/"

    def name(path: str) -> str:
        return path if scheme is None else f"{scheme}://{path}"

    def listing(directory: str, recursive: bool) -> list[pafs.FileInfo]:
        try:
            return fs.get_file_info(pafs.FileSelector(directory, recursive=recursive))
        except (OSError, pa.ArrowInvalid) as exc:
            raise ManifestError(f"{name(directory)}: cannot list manifest files ({first_line(exc)})") from None

    if pattern_rest:
        pattern = [seg for seg in pattern_rest if seg]
        infos = listing(base, recursive=len(pattern) > 1 or "**" in pattern)
        paths = [
            info.path
            for info in infos
            if info.type == pafs.FileType.File
            and _match(pattern, posixpath.relpath(info.path, base).split("/"))
        ]
        if not paths:
            raise ManifestError(f"{source}: no files match")
        return [SourceFile(fs, p, name(p)) for p in sorted(paths)]

    try:
        info = fs.get_file_info(base)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ManifestError(f"{name(base)}: cannot read manifest ({first_line(exc)})") from None
    if info.type == pafs.FileType.NotFound:
        raise ManifestError(f"{name(base)}: manifest not found")
    if info.type == pafs.FileType.File:
        return [SourceFile(fs, base, name(base))]
    paths = [
        i.path
        for i in listing(base, recursive=True)
        if i.type == pafs.FileType.File
        and i.path.endswith(".parquet")
        and not _hidden(posixpath.relpath(i.path, base))
    ]
    if not paths:
        raise ManifestError(f"{name(base)}: no .parquet files in this directory")
    return [SourceFile(fs, p, name(p)) for p in sorted(paths)]
