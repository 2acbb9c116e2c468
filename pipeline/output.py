"""The output directory of a run: committed videos, the metadata dataset, run reports.

    OUT/videos/ab/<job_id>.mp4    the video        (temp name, then renamed: first)
    OUT/videos/ab/<job_id>.json   its metadata row (temp name, then renamed: the commit marker)
    OUT/metadata/part-0.parquet   every job's row (done and failed), compacted from the sidecars
    OUT/metadata.parquet          the done rows only: the metadata file Hugging Face `videofolder`
                                  looks for, `file_name` relative to OUT, so every row has its video
    OUT/runs/<timestamp>.json     one report per run

A job is done when its sidecar parses and names an MP4 that exists with the
recorded size. Anything else in OUT (temp files of a killed process, a
truncated MP4 or sidecar) is not done and gets rendered again. OUT may be a
local path or any pyarrow filesystem URI (s3://, gs://, file://).
"""
from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.dataset import SidecarError, parse_sidecar, rows_to_table, sidecar_bytes
from jobs.identity import sidecar_relpath, video_relpath

TMP_PREFIX = ".tmp-"
METADATA_FILE = "metadata/part-0.parquet"
VIDEOFOLDER_FILE = "metadata.parquet"  # the name `datasets`' folder builders look for (csv / jsonl / parquet)


class OutputError(RuntimeError):
    """The output directory cannot be written (no space, no permission, not reachable)."""


@dataclass
class DoneScan:
    done: dict[str, dict] = field(default_factory=dict)  # job_id -> sidecar row
    corrupt: list[str] = field(default_factory=list)  # paths of leftovers that do not count


class OutputDir:
    def __init__(self, uri: str):
        self.uri = uri
        if "://" in uri:
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, relpath: str) -> str:
        return posixpath.join(self.root, relpath)

    def ensure(self) -> None:
        for sub in ("videos", "metadata", "runs"):
            self.fs.create_dir(self.path(sub), recursive=True)

    # -- committing one job -------------------------------------------------

    def encode_target(self, job_id: str) -> str:
        """A local path to encode a job's MP4 into before `commit`.

        For a local OUT it is the temp name beside the final file, so the
        commit is one rename; for a remote OUT it is a local temp file.
        """
        if self.local:
            final = self.path(video_relpath(job_id))
            os.makedirs(posixpath.dirname(final), exist_ok=True)
            return self._tmp_name(final)
        fd, path = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".mp4")
        os.close(fd)
        return path

    def commit(self, job_id: str, encoded: str, row: dict) -> None:
        """Move the encoded MP4 into place, then write its sidecar under a temp name and rename it."""
        video = self.path(video_relpath(job_id))
        sidecar = self.path(sidecar_relpath(job_id))
        tmp_sidecar = self._tmp_name(sidecar)
        try:
            if self.local:
                os.replace(encoded, video)
            else:
                tmp_video = self._tmp_name(video)
                self.fs.create_dir(posixpath.dirname(video), recursive=True)
                with open(encoded, "rb") as src, self.fs.open_output_stream(tmp_video) as dst:
                    shutil.copyfileobj(src, dst, 8 << 20)
                self.fs.move(tmp_video, video)
                os.unlink(encoded)
            with self.fs.open_output_stream(tmp_sidecar) as dst:
                dst.write(sidecar_bytes(row))
            self.fs.move(tmp_sidecar, sidecar)
        except OSError as exc:
            self._remove_quietly(tmp_sidecar)
            raise OutputError(f"{self.uri}: cannot commit job {job_id}: {exc}") from exc

    def _tmp_name(self, final: str) -> str:
        return posixpath.join(posixpath.dirname(final), f"{TMP_PREFIX}{uuid.uuid4().hex}-{posixpath.basename(final)}")

    def _remove_quietly(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except OSError:
            pass

    # -- reading what is done -------------------------------------------------

    def scan(self) -> DoneScan:
        """Every committed job whose sidecar parses and whose MP4 has the recorded size."""
        scan = DoneScan()
        selector = pafs.FileSelector(self.path("videos"), recursive=True, allow_not_found=True)
        infos = {info.path: info for info in self.fs.get_file_info(selector) if info.type == pafs.FileType.File}
        # Temp files of a killed compaction or report write: OUT itself, metadata/, runs/.
        for directory in ("", "metadata", "runs"):
            selector = pafs.FileSelector(self.path(directory).rstrip("/") or "/", allow_not_found=True)
            scan.corrupt.extend(info.path for info in self.fs.get_file_info(selector)
                                if info.type == pafs.FileType.File and info.base_name.startswith(TMP_PREFIX))
        for path, info in infos.items():
            name = posixpath.basename(path)
            if name.startswith(TMP_PREFIX):
                scan.corrupt.append(path)
                continue
            if not name.endswith(".json"):
                continue
            try:
                with self.fs.open_input_stream(path) as fh:
                    row = parse_sidecar(fh.read(), path)
            except (SidecarError, OSError):
                scan.corrupt.append(path)
                continue
            video = infos.get(self.path(row["file_name"]))
            if video is None or video.size != row.get("video_bytes"):
                scan.corrupt.append(path)
                continue
            scan.done[row["job_id"]] = row
        return scan

    def committed_row(self, job_id: str) -> dict | None:
        """The job's row if it is committed and intact (used when an actor died mid-commit)."""
        try:
            with self.fs.open_input_stream(self.path(sidecar_relpath(job_id))) as fh:
                row = parse_sidecar(fh.read(), sidecar_relpath(job_id))
            video = self.fs.get_file_info(self.path(row["file_name"]))
        except (SidecarError, OSError):
            return None
        if video.type != pafs.FileType.File or video.size != row.get("video_bytes"):
            return None
        return row

    def clean(self, scan: DoneScan) -> None:
        """Remove leftovers that do not count (temp files, sidecars of missing or truncated videos)."""
        for path in scan.corrupt:
            self._remove_quietly(path)

    def read_metadata(self) -> pa.Table | None:
        """The compacted dataset as last written, or None when there is none (or it is unreadable)."""
        path = self.path(METADATA_FILE)
        try:
            return pq.read_table(path, filesystem=self.fs)
        except (OSError, pa.ArrowInvalid):
            return None

    def compact(self, rows: list[dict]) -> None:
        """Write every row (done and failed) as the metadata dataset, and the done ones as the videofolder index.

        Each file atomically replaces the last one; the sidecars stay the
        source of truth, so a crash between the two loses nothing.
        """
        table = rows_to_table(rows)
        self._write_table(table, METADATA_FILE)
        self._write_table(table.filter(pc.equal(table["status"], "done")), VIDEOFOLDER_FILE)

    def _write_table(self, table: pa.Table, relpath: str) -> None:
        final = self.path(relpath)
        tmp = self._tmp_name(final)
        try:
            self.fs.create_dir(posixpath.dirname(final), recursive=True)
            pq.write_table(table, tmp, filesystem=self.fs)
            self.fs.move(tmp, final)
        except OSError as exc:
            self._remove_quietly(tmp)
            raise OutputError(f"{self.uri}: cannot write {relpath}: {exc}") from exc

    def write_report(self, name: str, report: dict) -> str:
        path = self.path(f"runs/{name}.json")
        data = (json.dumps(report, indent=2, sort_keys=True, default=str) + "\n").encode()
        tmp = self._tmp_name(path)
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        with self.fs.open_output_stream(tmp) as dst:
            dst.write(data)
        self.fs.move(tmp, path)
        return path
