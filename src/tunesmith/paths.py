"""Where tunesmith keeps what it builds once and reuses: the built-in models and cached
reference and teacher log-probs (``$TUNESMITH_CACHE``, else ``$XDG_CACHE_HOME/tunesmith``, else
``~/.cache/tunesmith``)."""

from __future__ import annotations

import os
from pathlib import Path

from tunesmith.errors import TunesmithError


def cache_root() -> Path:
    if os.environ.get("TUNESMITH_CACHE"):
        return Path(os.environ["TUNESMITH_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "tunesmith"


def require_new_folder(path: str | Path, what: str, why: str = "") -> Path:
    """``path`` as a ``Path`` if it is a folder that does not exist yet or is empty; else a
    one-line error naming ``what`` (the option or key that gave it), with ``why`` after it:
    writing there would mix with, or overwrite, what the user keeps in it."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise TunesmithError(
            f"{what}: {path} is not empty; choose a new folder{why}. Nothing was changed."
        )
    return path


def looks_local(name: str) -> bool:
    """Whether ``name`` can only be a local path, never a hub id (``NAME`` or ``ORG/NAME``): it
    starts with ``.``, ``/`` or ``~``, has more than one ``/``, or its first part is a folder
    here (``runs/nothere`` where ``runs/`` exists). A missing path then gets "does not exist"
    at once instead of a minute of hub requests."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or bool(shadowing_folder(name))


def shadowing_folder(name: str) -> str | None:
    """``ORG`` when ``name`` is ``ORG/NAME`` and ``ORG`` is a folder here: then ``name`` is read
    as a path in it, not as a hub id."""
    org, sep, rest = name.partition("/")
    plain = sep and "/" not in rest and not name.startswith((".", "/", "~"))
    return org if plain and Path(org).is_dir() else None


def share_weights(folder: str | Path) -> None:
    """Give the ``.safetensors`` files under ``folder`` (its checkpoints aside) the permissions a
    new file gets here (``0o666`` less the umask), as every other file of a run has: safetensors
    0.8 writes them owner-only (``0o600``), which a server running as another user cannot read."""
    mask = os.umask(0)  # the one way to read it: set, then put back at once
    os.umask(mask)
    for f in Path(folder).rglob("*.safetensors"):
        if "checkpoints" not in f.relative_to(folder).parts:
            f.chmod(0o666 & ~mask)
