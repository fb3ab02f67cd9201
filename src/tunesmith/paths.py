"""Where tunesmith keeps what it builds once and reuses: the built-in models and cached
reference and teacher log-probs (``$TUNESMITH_CACHE``, else ``$XDG_CACHE_HOME/tunesmith``, else
``~/.cache/tunesmith``)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("TUNESMITH_CACHE"):
        return Path(os.environ["TUNESMITH_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "tunesmith"
