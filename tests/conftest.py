"""Session-wide test settings.

Hypothesis runs without deadlines: this 2-core machine is shared by torch
threads, so per-example timing is noise, not signal.

Ray starts its worker processes at niceness 15 by default, so under any
other CPU load on the test machine the render actors get a few percent of
a core and the Ray tests crawl (measured: a 3-job run took 205 s instead
of 25 s beside three busy loops). The tests run the actors at the
driver's own priority; the product keeps Ray's default.
"""
import os

from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_worker_niceness", "0")

settings.register_profile("reelray", deadline=None, max_examples=60)
settings.load_profile("reelray")


import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The embedded tiny model set (what `reelray make-tiny-model` writes), made once per session."""
    from engine.tiny import make_tiny_model

    directory = tmp_path_factory.mktemp("tiny-model")
    make_tiny_model(directory)
    return directory


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray instance for the whole test session (starting one takes ~30 s here)."""
    import ray

    from pipeline.driver import ensure_ray

    ensure_ray(None)
    yield ray
    ray.shutdown()
