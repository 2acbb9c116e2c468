"""The output directory of a run: committed videos, the metadata dataset, run reports.

    OUT/videos/ab/<job_id>.mp4    the video        (temp name, then renamed: first)
    OUT/videos/ab/<job_id>.json   its metadata row (temp name, then renamed: the commit marker)
    OUT/metadata/part-0.parquet   every job's row (done and failed), compacted from the sidecars
    OUT/metadata.parquet          the done rows only: the metadata file Hugging Face `videofolder`
                                  looks for, `file_name` relative to OUT, so every row has its video
    OUT/runs/<timestamp>.json     one report per run
    OUT/.reelray-run.lock         held by the run writing OUT (local OUT only), see `run_lock`

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
import socket
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.dataset import SidecarError, parse_sidecar, rows_to_table, sidecar_bytes
from jobs.identity import sidecar_relpath, video_relpath

TMP_PREFIX = ".tmp-"
LOCK_FILE = ".reelray-run.lock"
LOCK_GRACE_S = 5.0  # an unreadable lock younger than this is one being written, not a stale one
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

    # -- one run at a time ---------------------------------------------------

    @contextmanager
    def run_lock(self):
        """Hold OUT for one run; a second `reelray run` on the same OUT is refused while the first lives.

        Two runs on one OUT (say an overnight batch started again by cron
        before the last one finished) would render the same jobs twice, delete
        each other's in-flight temp files on start-up and overwrite each other's
        metadata. The lock is a file created exclusively in OUT naming the
        driver (host, pid, process start time). A lock whose driver is dead on
        this host (killed: the lock outlives it) is stale and taken over; one
        held on another host cannot be checked and is refused with the path
        to delete. Object stores (s3://, gs://) have no exclusive create: there
        the lock is not taken, and one run per OUT is the user's to keep.
        """
        if not self.local:
            yield
            return
        path = os.path.join(self.root, LOCK_FILE)
        mine = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": _process_start(os.getpid()),
                "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_lock(path)
                if _lock_is_live(path, holder):
                    who = (f"reelray run pid {holder['pid']} on {holder['host']} since {holder['since']}"
                           if holder else "a run that is starting")
                    raise OutputError(f"{self.uri}: in use by {who}; wait for it to finish, "
                                      f"or delete {path} if that run is gone") from None
                try:  # stale: its driver died without releasing it
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                continue
            try:
                with os.fdopen(fd, "w") as fh:
                    json.dump(mine, fh)
            except OSError as exc:  # a full disk, say: no half-written lock stays behind
                os.unlink(path)
                raise OutputError(f"{self.uri}: cannot write the run lock {path}: {exc}") from exc
            break
        else:
            raise OutputError(f"{self.uri}: cannot take the run lock {path}")
        try:
            yield
        finally:
            if _read_lock(path) == mine:
                os.unlink(path)

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


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22): tells a pid from its reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces and parentheses
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _read_lock(path: str) -> dict | None:
    try:
        with open(path, "rb") as fh:
            holder = json.loads(fh.read(4096))
    except (OSError, ValueError):
        return None
    if not isinstance(holder, dict) or not {"host", "pid", "pid_started", "since"} <= holder.keys():
        return None
    return holder


def _lock_is_live(path: str, holder: dict | None) -> bool:
    if holder is None:  # unreadable: being written right now, or left half-written by a crash
        try:
            return time.time() - os.stat(path).st_mtime < LOCK_GRACE_S
        except FileNotFoundError:
            return False
    if holder["host"] != socket.gethostname():
        return True  # another machine's process: cannot be checked from here
    pid, started = holder["pid"], holder["pid_started"]
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if started is not None:
        return _process_start(pid) == started  # None (no such process) or another start time: gone, or pid reused
    try:  # no /proc (macOS): whether the pid exists at all
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
