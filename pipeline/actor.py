"""The render actor: one resident Engine, jobs in, committed videos out.

Ray's batch-inference shape: `__init__` loads the model set once and keeps
it; `render` takes one job. The actor runs CONCURRENCY calls at once, one
thread per job the driver keeps in flight, but renders one at a time and in
the order the driver numbered them (`seq`): encoding and committing a job's
MP4 overlaps with the next render, and the oldest job in flight is always
the one rendering or encoding, which is what the driver's per-job timeout
measures. A job that raises comes back as data (`ok: False` with the
error), never as an exception that takes the actor down; only a dead
process (killed, out of memory) surfaces as a Ray actor error, which the
driver handles by replacing the actor.
"""
from __future__ import annotations

import errno
import hashlib
import os
import platform
import socket
import threading
import time
from datetime import datetime, timezone
from importlib import metadata

from engine.model_set import ModelSet
from engine.render import Engine
from engine.video import write_mp4
from jobs.dataset import make_row
from jobs.job import RenderJob
from pipeline.output import OutputDir, OutputError

CONCURRENCY = 3  # threads: one job rendering, the one before it encoding, the next one waiting its turn
PACKAGES = ("reelray", "torch", "ray", "av", "gguf", "numpy", "pyarrow", "pydantic")


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def is_out_of_space(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__
    return False


class RenderActor:
    def __init__(self, model_files: dict[str, str], family: str, model_digest: str, out_uri: str,
                 engine_options: dict):
        self.created_at = time.time()
        self.turn = threading.Condition()
        self.next_seq = 0  # the `seq` whose render goes next
        self.stats_lock = threading.Lock()
        self.engine = Engine(ModelSet.from_files(model_files, family=family), **engine_options)
        self.model_digest = model_digest
        self.out = OutputDir(out_uri)
        self.node = socket.gethostname()
        self.actor_name = f"{self.node}:{os.getpid()}"
        self.software = software_versions() | {"device": str(self.engine.device), "cpu_threads": str(self.engine.cpu_threads)}
        self.ready_at = time.time()
        self.last_done_at = self.ready_at
        self.jobs = 0
        self.render_s = 0.0
        self.encode_s = 0.0
        self.commit_s = 0.0

    def ready(self) -> str:
        return self.actor_name

    def render(self, job: RenderJob, attempt: int, seq: int) -> dict:
        """Render, encode and commit one job; `seq` numbers this actor's calls 0, 1, 2, ... in submission order."""
        encoded = None
        try:
            with self.turn:
                self.turn.wait_for(lambda: self.next_seq == seq)
            try:  # the next call's render starts as soon as this one's ends, raised or not
                started = datetime.now(timezone.utc)
                t0 = time.perf_counter()
                inputs = job.input_uris()  # {name: uri, or [uri, ...] for a list input}
                result = self.engine.render(job.prompt, job.seed, job.params, job.negative_prompt, inputs,
                                            digests=job.input_digests())
                t1 = time.perf_counter()
            finally:
                self._next_turn()
            encoded = self.out.encode_target(job.job_id)
            write_mp4(result.frames, encoded, fps=job.params.fps)
            video_bytes = os.path.getsize(encoded)
            video_sha256 = _sha256_file(encoded)
            t2 = time.perf_counter()
            row = make_row(
                job,
                model_digest=self.model_digest,
                status="done",
                error=None,
                attempts=attempt,
                frames_sha256=result.frames_sha256,
                video_sha256=video_sha256,
                video_bytes=video_bytes,
                video_size=(result.frames.shape[2], result.frames.shape[1]),
                started_at=started,
                finished_at=datetime.now(timezone.utc),
                render_s=t1 - t0,
                encode_s=t2 - t1,
                total_s=t2 - t0,
                node=self.node,
                actor=self.actor_name,
                software=self.software,
            )
            self.out.commit(job.job_id, encoded, row)
            encoded = None
            t3 = time.perf_counter()
            with self.stats_lock:
                self.jobs += 1
                self.render_s += t1 - t0
                self.encode_s += t2 - t1
                self.commit_s += t3 - t2
            return {"ok": True, "row": row}
        except Exception as exc:  # failures are data: the driver decides on retries
            message = f"{type(exc).__name__}: {exc}".splitlines()[0]
            return {"ok": False, "error": message, "out_of_space": is_out_of_space(exc) or _out_of_space_text(exc)}
        finally:
            if encoded is not None:
                try:
                    os.unlink(encoded)
                except OSError:
                    pass
            self.last_done_at = time.time()

    def _next_turn(self) -> None:
        with self.turn:
            self.next_seq += 1
            self.turn.notify_all()

    def stats(self) -> dict:
        cache = self.engine.embeddings
        return {
            "actor": self.actor_name,
            "node": self.node,
            "placement": self.engine.placement,
            "load_s": self.ready_at - self.created_at,
            "jobs": self.jobs,
            "text_encoder_calls": self.engine.text_encoder_calls,
            "cache_hits": cache.hits,
            "cache_misses": cache.misses,
            "render_s": self.render_s,
            "encode_s": self.encode_s,
            "commit_s": self.commit_s,
            "wall_s": self.last_done_at - self.ready_at,
        }


def _out_of_space_text(exc: BaseException) -> bool:
    # pyarrow and PyAV report ENOSPC in their own exception types; the text is what survives.
    return isinstance(exc, (OSError, OutputError)) and "No space left on device" in str(exc)


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(8 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
