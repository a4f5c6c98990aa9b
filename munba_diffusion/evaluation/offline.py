"""Whether downloads are allowed: the Hugging Face convention, ``HF_HUB_OFFLINE=1`` means none."""

from __future__ import annotations

import os

_TRUE = {"1", "true", "yes", "on"}


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE
