"""Progress lines for people: on stderr, so stdout stays clean for piping."""

from __future__ import annotations

import sys


def say(msg: str) -> None:
    print(f"tunesmith: {msg}", file=sys.stderr, flush=True)
