"""Progress lines for people: on stderr, so stdout stays clean for piping."""

from __future__ import annotations

import os
import sys


def say(msg: str) -> None:
    """One progress line; under torchrun only rank 0 speaks (every rank says the same)."""
    if os.environ.get("RANK", "0") != "0":
        return
    print(f"tunesmith: {msg}", file=sys.stderr, flush=True)
