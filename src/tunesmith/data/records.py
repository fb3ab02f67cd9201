"""A record as read from any source, with where it came from (for error messages)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Record:
    """One example as read, plus its origin (``file:line``) so any later error can point at it."""

    fields: dict[str, Any]
    origin: str
