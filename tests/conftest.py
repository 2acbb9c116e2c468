"""Session-wide test settings.

Hypothesis runs without deadlines: this 2-core machine is shared by torch
threads, so per-example timing is noise, not signal.
"""
import os

from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
