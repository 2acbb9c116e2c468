"""`reelray run`: manifest -> pending jobs -> render actors -> committed videos -> dataset.

Where and when, never how: the driver reads and validates the manifest
(jobs/), subtracts what OUT already holds, and hands jobs to resident
`RenderActor`s (Ray Core actors; see docs/ARCHITECTURE.md for why not Ray
Data), grouping a prompt's seeds on one actor so its text embedding is
computed once. Results come back as rows; failures are retried and then
recorded as rows; a dead or stuck actor is replaced. The metadata dataset is
compacted from the committed sidecars, so a driver killed at any moment
loses nothing that was committed, and the same command resumes.
"""
from __future__ import annotations

import functools
import os
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from jobs.dataset import make_row, with_added_columns
from jobs.inputs import FileKind, InputError
from jobs.job import RenderJob
from jobs.manifest import ManifestError, load_jobs
from pipeline.actor import CONCURRENCY, RenderActor, software_versions
from pipeline.output import OutputDir, OutputError
from pipeline.progress import RunProgress

QUEUE_DEPTH = CONCURRENCY  # jobs in flight per actor, each on its own actor thread: the next one waits on the actor, not on the driver
COMPACT_EVERY_S = 60.0
MAX_ERRORS_SHOWN = 20


@dataclass
class RunConfig:
    manifest: str
    out: str
    model_files: dict[str, str]  # role -> path (see engine.model_set.ModelSet.files)
    family: str
    model_dir: str | None = None
    actors: int | None = None
    seeds: list[int] | None = None
    skip_invalid: bool = False
    force: bool = False
    address: str | None = None
    retries: int = 2
    job_timeout: float | None = None
    log_every: float = 10.0
    device: str | None = None
    dtype: str | None = None
    policy: str = "dequantize_once"
    # LoRAs ("PATH[:STRENGTH]") for the rows that give none, per LoRA input ("loras", "loras_high", "loras_low")
    loras: dict[str, list[str]] = field(default_factory=dict)
    # Render parameters for the rows that do not give them (`reelray run --steps 4 --step-list ...`)
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"actors {self.actors}: must be at least 1")
        if self.retries < 0:
            raise ValueError(f"retries {self.retries}: must be 0 or more")


class RunStopped(OutputError):
    """The run stopped before all jobs were finished (e.g. the output ran out of space)."""


# -- scheduling ---------------------------------------------------------------


class PromptQueue:
    """Pending jobs grouped by LoRA set and prompt; an actor keeps taking its group's seeds.

    An idle actor continues its current group if it has jobs left, else claims
    the next unclaimed group with its current LoRA set (so the LoRAs it has
    loaded stay in use), else the next unclaimed group, else takes half of the
    largest group claimed by another actor (so the tail of a run keeps every
    actor busy).
    """

    def __init__(self, jobs: list[RenderJob]):
        self.groups: OrderedDict[tuple, deque[RenderJob]] = OrderedDict()
        for job in jobs:
            self.groups.setdefault(group_key(job), deque()).append(job)
        self.unclaimed: deque[tuple] = deque(self.groups)
        self.owner: dict[tuple, int] = {}

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups.values())

    def push_front(self, job: RenderJob) -> None:
        key = group_key(job)
        self.groups.setdefault(key, deque()).appendleft(job)
        if key not in self.owner and key not in self.unclaimed:
            self.unclaimed.appendleft(key)

    def next_for(self, actor: int, group: tuple | None) -> RenderJob | None:
        """The next job for `actor`, whose last job was of `group` (None for a fresh actor)."""
        if group is not None and self.groups.get(group):
            return self._pop(group)
        self.unclaimed = deque(k for k in self.unclaimed if self.groups.get(k))
        if self.unclaimed:
            candidate = self.unclaimed[0]
            if group is not None:  # the same LoRA set first
                candidate = next((k for k in self.unclaimed if k[0] == group[0]), candidate)
            self.unclaimed.remove(candidate)
            self.owner[candidate] = actor
            return self._pop(candidate)
        largest = max((k for k in self.groups if self.groups[k]), key=lambda k: len(self.groups[k]), default=None)
        if largest is None:
            return None
        self.owner[largest] = actor
        return self._pop(largest)

    def _pop(self, key: tuple) -> RenderJob:
        group = self.groups[key]
        job = group.popleft()
        if not group:
            del self.groups[key]
        return job


def group_key(job: RenderJob) -> tuple:
    """(the job's LoRA set, its prompt): jobs an actor renders best one after another."""
    return job.lora_key(), job.prompt


@dataclass
class Slot:
    """One actor and the jobs submitted to it, oldest first.

    The actor renders its jobs in the order submitted (`seq`), so the oldest
    job in flight is the one rendering (or encoding what it rendered): the
    per-job timeout runs from the moment it became the oldest.
    """

    index: int
    handle: Any
    inflight: deque = field(default_factory=deque)  # (ref, job, attempt)
    head_started: float = 0.0
    submitted: int = 0  # calls made to this actor: the next call's seq
    group: tuple | None = None  # (LoRA set, prompt) of its last job
    ready_ref: Any = None  # set until the actor has loaded its model: no job timeout runs before that

    def timed_out(self, timeout: float, now: float) -> bool:
        import ray

        if self.ready_ref is not None:
            done, _ = ray.wait([self.ready_ref], timeout=0)
            if not done:
                return False
            self.ready_ref = None
            self.head_started = now
        return bool(self.inflight) and now - self.head_started > timeout


# -- the run ------------------------------------------------------------------


def run(config: RunConfig, stream=None) -> dict:
    stream = stream or sys.stderr
    started_at = datetime.now(timezone.utc)
    t_start = time.monotonic()
    jobs, errors, n_rows, models, digest = read_jobs(config.manifest, config.model_files, config.family, config.seeds, config.loras,
                                                       config.params)
    if errors and not config.skip_invalid:
        shown = "\n".join(f"  {e}" for e in errors[:MAX_ERRORS_SHOWN])
        more = f"\n  ... and {len(errors) - MAX_ERRORS_SHOWN} more" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise ManifestError(
            f"{config.manifest}: {len(errors)} invalid row(s); fix them or pass --skip-invalid:\n{shown}{more}"
        )

    out = OutputDir(config.out)
    try:
        out.ensure()
    except OSError as exc:
        raise OutputError(f"{config.out}: cannot create the output directory: {exc}") from exc
    with out.run_lock():  # one run per OUT at a time: refused here, before anything in OUT is touched
        scan = out.scan()
        out.clean(scan)
        done_rows: dict[str, dict] = dict(scan.done)
        failed_rows: dict[str, dict] = previous_failures(out, done_rows)
        pending = [job for job in jobs if config.force or job.job_id not in done_rows]
        skipped_done = len(jobs) - len(pending)
        print(
            f"reelray: {n_rows} manifest rows -> {len(jobs)} jobs; {skipped_done} already done, "
            f"{len(pending)} to render, {len(errors)} invalid rows skipped" if errors else
            f"reelray: {n_rows} manifest rows -> {len(jobs)} jobs; {skipped_done} already done, {len(pending)} to render",
            file=stream,
        )

        actor_stats: list[dict] = []
        stop_reason = None
        try:
            if pending:
                ensure_ray(config.address)
                stop_reason = render_all(config, out, models, digest, pending, done_rows, failed_rows, actor_stats, stream)
        finally:
            try:
                out.compact(all_rows(done_rows, failed_rows))
            except OutputError as exc:
                # The sidecars are the source of truth: the next run compacts again.
                if stop_reason is None:
                    stop_reason = str(exc)

        job_ids = {job.job_id for job in jobs}
        counts = {
            "rows": n_rows,
            "invalid_rows": len(errors),
            "jobs": len(jobs),
            "skipped_done": skipped_done,
            "rendered": sum(1 for j in pending if j.job_id in done_rows),
            "done": sum(1 for j in job_ids if j in done_rows),
            "failed": sum(1 for j in job_ids if j in failed_rows and j not in done_rows),
        }
        counts["pending"] = counts["jobs"] - counts["done"] - counts["failed"]
        lookups = sum(s["cache_hits"] + s["cache_misses"] for s in actor_stats)
        report = {
            "started_at": started_at.isoformat(),
            "finished_at": datetime.now(timezone.utc).isoformat(),
            "wall_s": time.monotonic() - t_start,
            "config": {k: v for k, v in asdict(config).items() if k != "seeds"} | {"seeds": summarize_seeds(config.seeds)},
            "model_digest": digest,
            "family": models.family,
            "software": software_versions(),
            "counts": counts,
            "invalid_rows": [str(e) for e in errors[:1000]],
            "embedding_cache_hit_rate": sum(s["cache_hits"] for s in actor_stats) / lookups if lookups else None,
            "actors": actor_stats,
            "expert_placement": [s["placement"] for s in actor_stats if s.get("placement")] or None,
            "stopped": stop_reason,
        }
        name = started_at.strftime("%Y%m%dT%H%M%S.%fZ")
        try:
            report_path = out.write_report(name, report)
        except OSError as exc:
            report_path = f"(not written: {exc})"
        print(
            f"reelray: done {counts['done']}/{counts['jobs']}, failed {counts['failed']}, pending {counts['pending']}"
            f" in {report['wall_s']:.1f}s; videos in {out.path('videos')}, dataset in {out.path('metadata')}, report {report_path}",
            file=stream,
        )
        if stop_reason:
            raise RunStopped(f"{stop_reason}; {counts['done']} jobs are done and intact: rerun the same command to resume")
        return report


def read_jobs(manifest: str, model_files: dict[str, str], family: str | None, seeds: list[int] | None,
              loras: dict[str, list[str]] | None = None, params: dict[str, Any] | None = None):
    """(jobs, row errors, rows read, model set, model digest): the model set is checked from its
    file headers first, so a mismatched set fails in a second, before Ray starts."""
    from engine.families import foreign_names, get_family
    from engine.model_set import ModelSet

    models = ModelSet.from_files(model_files, family=family)
    models.check_fit()
    digest = models.digest()
    foreign = foreign_names(get_family(models.family))
    defaults = {}
    for name, refs in (loras or {}).items():
        spec = models.spec.input_spec(name)
        if spec is None or spec.kind != "loras":
            slots = [s.name for s in models.spec.inputs if s.kind == "loras"]
            raise ValueError(f"{name}: the {models.spec.title} family takes LoRAs as {' and '.join(slots)}")
        defaults[name] = [lora_ref_absolute(ref) for ref in refs]
    spec = models.spec
    if params:
        try:
            spec = spec.with_defaults(spec.params(**params))
        except ValueError as exc:
            raise ValueError(f"run parameters: {exc}") from None
    from engine.lora import LoraError

    fits = models.lora_fit_check()

    def check_lora(uri: str) -> None:
        try:
            fits(uri)
        except LoraError as exc:  # the file's own line, naming the DiT it does not fit
            raise InputError(str(exc)) from None

    videos: dict[str, tuple[int, int, int]] = {}
    jobs, errors, n_rows = load_jobs(manifest, model_digest=digest, family=spec, seeds=seeds, foreign=foreign,
                                     digest=functools.partial(digest_and_probe, check_lora=check_lora,
                                                              videos=videos),
                                     input_defaults=defaults)
    jobs, errors = check_video_sizes(jobs, errors, spec, videos)
    return jobs, errors, n_rows, models, digest


def check_video_sizes(jobs: list[RenderJob], errors: list, spec, videos: Mapping[str, tuple[int, int, int]]):
    """(jobs, errors) with every row whose video input must match another's size (`InputSpec.same_size_as`:
    a mask video and its control video) but does not, from the headers `digest_and_probe` read, moved
    from the jobs to the errors (one error per row, every seed of it out)."""
    from engine.video_input import VideoInputError, check_same_size
    from jobs.rows import RowError

    pairs = [(s.name, s.same_size_as) for s in spec.inputs if s.same_size_as is not None]
    if not pairs:
        return jobs, errors
    bad: dict[int, RowError] = {}
    for job in jobs:
        if job.row in bad:
            continue
        for name, other in pairs:
            if name in job.inputs and other in job.inputs:
                uri, other_uri = job.inputs[name].uri, job.inputs[other].uri
                try:
                    check_same_size(uri, videos[uri], other_uri, videos[other_uri], other.replace("_", " "))
                except VideoInputError as exc:
                    bad[job.row] = RowError(job.row, name, str(exc))
                    break
    if not bad:
        return jobs, errors
    return [job for job in jobs if job.row not in bad], sorted([*errors, *bad.values()], key=lambda e: e.row)


def lora_ref_absolute(ref: str) -> tuple[str, float]:
    """A run-wide "PATH[:STRENGTH]" as (absolute path or URI, strength): relative to the working directory."""
    from jobs.family import parse_lora_ref

    path, strength = parse_lora_ref(ref)
    return (path if "://" in path else os.path.abspath(os.path.expanduser(path))), strength


def probe_lora(uri: str) -> None:
    """InputError naming the file unless it is a LoRA as the engine reads one, judged from its
    safetensors header alone (`engine.lora.read_lora_header`: no weights read): a file that is not
    safetensors, holds no LoRA keys, or keys the engine cannot pair up, is its rows' error."""
    from engine.lora import LoraError, read_lora_header
    from jobs.inputs import find_input

    find_input(uri)  # a missing file keeps the inputs layer's own message
    try:
        read_lora_header(uri)
    except LoraError as exc:
        raise InputError(str(exc)) from None


def digest_and_probe(files: Mapping[str, FileKind], check_lora: Callable[[str], None] | None = None,
                     videos: dict[str, tuple[int, int, int]] | None = None) -> dict[str, str | InputError]:
    """Input digests ({uri: kind} in), each file's header checked on the way by its kind (an image's
    with `probe_image`, a video's with `probe_video`, a LoRA's with `probe_lora` and, given,
    `check_lora`: `ModelSet.lora_fit_check`'s): a file that is not what its column says, or a LoRA that
    does not fit the model, is its rows' error before anything renders. `videos`, given, is filled
    with each video's (width, height, frames), for `check_video_sizes`."""
    from engine.image import probe_image
    from jobs.inputs import digest_inputs

    probe_video = None
    if "video" in files.values():  # imported only when a manifest names a video
        from engine.video_input import probe_video

    def probe(uri: str, kind: FileKind) -> None:
        if kind == "image":
            probe_image(uri)
        elif kind == "lora":
            probe_lora(uri)
            if check_lora is not None:
                check_lora(uri)
        else:
            probed = probe_video(uri)
            if videos is not None:  # (width, height, frames), for the checks across a row's files
                videos[uri] = probed

    return digest_inputs(files, check=probe)


def all_rows(done_rows: dict[str, dict], failed_rows: dict[str, dict]) -> list[dict]:
    """The dataset: every done job, and every failed job that is not done since."""
    return list(done_rows.values()) + [row for job_id, row in failed_rows.items() if job_id not in done_rows]


def previous_failures(out: OutputDir, done_rows: dict[str, dict]) -> dict[str, dict]:
    """Failed rows of earlier runs (kept in the dataset until the job is done)."""
    table = out.read_metadata()
    if table is None or "status" not in table.column_names:
        return {}
    return {r["job_id"]: with_added_columns(r) for r in table.to_pylist()
            if r["status"] == "failed" and r["job_id"] not in done_rows}


def summarize_seeds(seeds: list[int] | None) -> str | None:
    if not seeds:
        return None
    return f"{len(seeds)} seeds, {min(seeds)}..{max(seeds)}"


def ensure_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    else:
        # A local instance: no dashboard to expose. Ray (2.59+) turns token
        # authentication on for a new local cluster; a test holds it to that.
        ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)


def actor_resources(config: RunConfig) -> tuple[int, dict, dict]:
    """How many actors, what each asks Ray for, and their engine options.

    One actor per GPU; on CPUs one actor per CPU by default (a CPU engine
    computes single-threaded, see engine.render.CPU_THREADS).
    """
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    device = config.device or ("cuda" if gpus else "cpu")
    if device.startswith("cuda"):
        count = config.actors or max(gpus, 1)
        request = {"num_gpus": 1, "num_cpus": 1}
    else:
        cpus = resources.get("CPU", 1.0)
        count = config.actors or max(int(cpus), 1)
        request = {"num_cpus": min(1.0, cpus / count)}
    dtype = config.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    import torch

    options = {"device": device, "dtype": getattr(torch, dtype), "policy": config.policy}
    return count, request, options


def render_all(config, out, models, digest, pending, done_rows, failed_rows, actor_stats, stream) -> str | None:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    count, request, engine_options = actor_resources(config)
    actor_cls = ray.remote(RenderActor).options(max_restarts=0, max_task_retries=0, max_concurrency=CONCURRENCY, **request)

    def start_actor(index: int) -> Slot:
        handle = actor_cls.remote(models.paths(), models.family, digest, out.uri, engine_options)
        return Slot(index=index, handle=handle, ready_ref=handle.ready.remote())

    slots = [start_actor(i) for i in range(min(count, len(pending)))]
    # Wait for the first actor only: a model that cannot load fails here, in
    # one line; the others take their jobs as soon as they are ready.
    try:
        first, _ = ray.wait([s.ready_ref for s in slots], num_returns=1)
        ray.get(first)
    except RayActorError as exc:
        raise RuntimeError(f"render actors could not load the model: {one_line_cause(exc)}") from None

    queue = PromptQueue(pending)
    attempts: dict[str, int] = {}
    total = len(pending)
    progress = RunProgress(total, stream=stream, log_every=config.log_every)
    n_failed = 0
    last_compact = time.monotonic()
    stop_reason: str | None = None

    def submit(slot: Slot) -> None:
        while len(slot.inflight) < QUEUE_DEPTH and stop_reason is None:
            job = queue.next_for(slot.index, slot.group)
            if job is None:
                return
            attempt = attempts.get(job.job_id, 0) + 1
            attempts[job.job_id] = attempt
            slot.group = group_key(job)
            if not slot.inflight:
                slot.head_started = time.monotonic()
            slot.inflight.append((slot.handle.render.remote(job, attempt, slot.submitted), job, attempt))
            slot.submitted += 1

    def fail_or_retry(job: RenderJob, attempt: int, error: str) -> None:
        nonlocal n_failed
        if attempt <= config.retries:
            queue.push_front(job)
            return
        failed_rows[job.job_id] = make_row(
            job, model_digest=digest, status="failed", error=error, attempts=attempt,
            software=software_versions(),
        )
        n_failed += 1

    def replace(slot: Slot, reason: str) -> None:
        """The actor died or hung: its running job counts an attempt, the queued ones go back.

        A job the actor committed before it died (its result never arrived)
        is taken from OUT as done, not rendered again.
        """
        ray.kill(slot.handle, no_restart=True)
        for position, (_, job, attempt) in enumerate(slot.inflight):
            row = None if config.force else out.committed_row(job.job_id)
            if row is not None:
                done_rows[job.job_id] = row
                failed_rows.pop(job.job_id, None)
            elif position == 0:
                fail_or_retry(job, attempt, reason)
            else:
                attempts[job.job_id] = attempt - 1
                queue.push_front(job)
        fresh = start_actor(slot.index)
        slot.handle, slot.inflight, slot.group, slot.ready_ref, slot.submitted = fresh.handle, deque(), None, fresh.ready_ref, 0

    for slot in slots:
        submit(slot)
    while any(slot.inflight for slot in slots):
        heads = {slot.inflight[0][0]: slot for slot in slots if slot.inflight}
        ready, _ = ray.wait(list(heads), num_returns=1, timeout=0.5)
        for ref in ready:
            slot = heads[ref]
            _, job, attempt = slot.inflight.popleft()
            slot.head_started = time.monotonic()
            try:
                result = ray.get(ref)
            except RayActorError as exc:
                slot.inflight.appendleft((ref, job, attempt))
                replace(slot, f"actor died: {one_line_cause(exc)}")
                continue
            if result["ok"]:
                done_rows[job.job_id] = result["row"]
                failed_rows.pop(job.job_id, None)
            elif result["out_of_space"]:
                stop_reason = f"{config.out}: no space left on the output filesystem ({result['error']})"
                queue.push_front(job)
            else:
                fail_or_retry(job, attempt, result["error"])
        if config.job_timeout:
            now = time.monotonic()
            for slot in slots:
                if slot.timed_out(config.job_timeout, now):
                    replace(slot, f"TimeoutError: job exceeded the per-job timeout of {config.job_timeout:g}s")
        for slot in slots:
            submit(slot)
        progress.update(len([1 for j in pending if j.job_id in done_rows]), n_failed)
        if time.monotonic() - last_compact > COMPACT_EVERY_S:
            try:
                out.compact(all_rows(done_rows, failed_rows))
            except OutputError as exc:
                stop_reason = str(exc)
            last_compact = time.monotonic()
    progress.close()

    for slot in slots:
        try:
            actor_stats.append(ray.get(slot.handle.stats.remote(), timeout=30))
        except (RayActorError, GetTimeoutError):
            pass
        ray.kill(slot.handle, no_restart=True)
    return stop_reason


def one_line_cause(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # Ray's message ends with the original error's last line; that is what a user needs.
    lines = [line.strip() for line in text if line.strip()]
    return lines[-1] if lines else type(exc).__name__


# -- status -------------------------------------------------------------------


def status(out_uri: str, manifest: str | None = None, model_files: dict[str, str] | None = None,
           family: str | None = None, seeds: list[int] | None = None, loras: dict[str, list[str]] | None = None,
           params: dict[str, Any] | None = None) -> dict:
    """Done / failed / pending counts of an output directory (of a manifest's jobs, when given)."""
    out = OutputDir(out_uri)
    scan = out.scan()
    failed = previous_failures(out, scan.done)
    counts: dict[str, Any] = {"done": len(scan.done), "failed": len(failed)}
    if manifest:
        jobs, errors, _, _, _ = read_jobs(manifest, model_files or {}, family, seeds, loras, params)
        ids = {j.job_id for j in jobs}
        counts = {
            "done": len(ids & scan.done.keys()),
            "failed": len(ids & failed.keys()),
            "pending": len(ids - scan.done.keys() - failed.keys()),
            "invalid_rows": len(errors),
        }
    counts["leftovers"] = len(scan.corrupt)
    return counts
