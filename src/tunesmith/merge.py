"""``tunesmith merge``: fold a run's adapter into its base weights and save a plain model."""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.errors import TunesmithError
from tunesmith.models import is_run_dir, load_for_inference
from tunesmith.paths import require_new_folder, share_weights


def merge_run(run_dir: str | Path, out: str | Path) -> Path:
    if not is_run_dir(run_dir):
        raise TunesmithError(f"{run_dir}: not a tunesmith run folder (no config.yaml / run.json).")
    out = require_new_folder(out, "--out")  # before the slow part
    model, tokenizer, cfg = load_for_inference(str(run_dir), torch.device("cpu"))
    method = getattr(model, "tunesmith_method", None)
    if method is None:
        raise TunesmithError(
            f"{run_dir}: a '{cfg.method.name}' run is already a whole model; nothing to merge."
        )
    merged = method.merge()
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    share_weights(out)
    return out
