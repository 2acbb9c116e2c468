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
