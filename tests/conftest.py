"""Every test runs offline, with caches and Dagster state kept out of the user's folders."""

import os
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", str(PROJECT / ".cache" / "hf"))
os.environ.setdefault("XDG_CACHE_HOME", str(PROJECT / ".cache" / "xdg"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton kernels run on CPU tensors only under its interpreter, and the flag must be set before
# anything imports triton (lighteval -> torch._dynamo does). No GPU code runs in the suite.
os.environ.setdefault("TRITON_INTERPRET", "1")
