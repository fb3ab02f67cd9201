"""Explicit preparation of a model source, so that loading it has no side effects.

Two kinds of ``model.name`` need work before they can be loaded: ``builtin:NAME`` (pretrained by
tunesmith on first use) and the run folder of a parameter-efficient method (merged into a plain
model, ``RUN/merged``, so DPO or RL can start from an SFT run). ``ensure_model`` does that work;
``tunesmith.models`` only resolves and loads. Entry points call it once, before anything loads
(under several processes, one process would do it and the others wait).
"""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.models import is_run_dir, resolve_model_path


def ensure_model(name: str) -> str:
    """Build or merge what ``name`` needs, then return its loadable path (or hub id)."""
    if name.startswith("builtin:"):
        from tunesmith.builtin.model import ensure_builtin_model

        return str(ensure_builtin_model(name.split(":", 1)[1]))
    path = Path(name).expanduser()
    if is_run_dir(path) and json.loads((path / "run.json").read_text())["artifact"] == "adapter":
        merged = path / "merged"
        if not (merged / "config.json").exists():
            from tunesmith.merge import merge_run

            merge_run(path, merged)
    return resolve_model_path(name)
