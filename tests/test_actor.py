"""The render actor's own contract, driven in-process from threads the way Ray's threaded actor calls it.

The driver's per-job timeout blames the oldest job in flight, so the actor
must render its calls in the order they were numbered (`seq`), whatever
order its threads happen to start them in, and a failed render must not
hold up the ones after it.
"""
from __future__ import annotations

import threading
import time

import pytest

from engine.model_set import ModelSet
from jobs.job import RenderJob
from pipeline.actor import RenderActor


@pytest.fixture(scope="module")
def actor(tiny_model, tmp_path_factory):
    models = ModelSet.from_dir(tiny_model)
    out = tmp_path_factory.mktemp("actor-out")
    return RenderActor(models.paths(), models.family, models.digest(), str(out), {"device": "cpu"})


def jobs_for(actor: RenderActor, n: int) -> list[RenderJob]:
    spec = actor.engine.spec
    params = spec.params(steps=1)
    return [RenderJob.create(family=spec.name, model_digest=actor.model_digest, prompt=f"ordered {i}", seed=i,
                             params=params, negative_prompt=spec.negative_prompt) for i in range(n)]


def call_in_threads(actor: RenderActor, calls: list[tuple[RenderJob, int]], stagger_s: float) -> dict[int, dict]:
    results: dict[int, dict] = {}
    threads = []
    for job, seq in calls:
        thread = threading.Thread(target=lambda j=job, s=seq: results.__setitem__(s, actor.render(j, 1, s)))
        thread.start()
        threads.append(thread)
        time.sleep(stagger_s)
    for thread in threads:
        thread.join(timeout=120)
        assert not thread.is_alive(), "a render call never returned: the turnstile deadlocked"
    return results


def test_renders_run_in_seq_order_whatever_order_the_calls_start_in(actor):
    base = actor.next_seq
    jobs = jobs_for(actor, 3)
    # Started newest first, 0.2 s apart: without the turnstile seq base+2 would render first.
    results = call_in_threads(actor, [(jobs[2], base + 2), (jobs[1], base + 1), (jobs[0], base)], stagger_s=0.2)
    assert all(results[base + i]["ok"] for i in range(3)), results
    started = [results[base + i]["row"]["started_at"] for i in range(3)]
    assert started == sorted(started)
    assert actor.next_seq == base + 3


def test_a_failed_render_hands_the_turn_on(actor, monkeypatch):
    base = actor.next_seq
    jobs = jobs_for(actor, 2)
    real_render = actor.engine.render

    def fail_the_first(prompt, *args, **kwargs):
        if prompt == jobs[0].prompt:
            raise RuntimeError("injected render failure")
        return real_render(prompt, *args, **kwargs)

    monkeypatch.setattr(actor.engine, "render", fail_the_first)
    results = call_in_threads(actor, [(jobs[1], base + 1), (jobs[0], base)], stagger_s=0.1)
    assert results[base] == {"ok": False, "error": "RuntimeError: injected render failure", "out_of_space": False}
    assert results[base + 1]["ok"]
    assert actor.next_seq == base + 2
