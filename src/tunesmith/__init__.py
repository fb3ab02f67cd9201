"""tunesmith: fine-tune Hugging Face language models with every method, from one config.

import tunesmith
result = tunesmith.train("configs/sft_lora.yaml", ["train.lr=1e-4"])
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith.errors import ConfigError, DataError, TunesmithError

if TYPE_CHECKING:
    from tunesmith.config import Config
    from tunesmith.multi import MultiAdapter
    from tunesmith.pipeline import RunResult

# Imported on first use, so that ``import tunesmith`` (and the CLI's start) does not load torch
# before it is needed: the CLI may first restart itself under another allocator.
_LAZY = {
    "Config": "tunesmith.config",
    "Interrupted": "tunesmith.training.guard",  # a run stopped by SIGINT/SIGTERM, checkpoint written
    "load_config": "tunesmith.config",
    "MultiAdapter": "tunesmith.multi",
    "RunResult": "tunesmith.pipeline",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tunesmith' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "Config",
    "ConfigError",
    "DataError",
    "Interrupted",
    "MultiAdapter",
    "RunResult",
    "TunesmithError",
    "load_config",
    "train",
]
__version__ = "0.1.0"


def train(
    config: str | Path | dict[str, Any] | Config,
    overrides: Sequence[str] = (),
    resume: bool = False,
) -> RunResult:
    """Run one training job from a YAML path, a dict or a :class:`Config` (plus dotted overrides).

    The model source is prepared first (the built-in model built, a run folder merged: explicit
    steps, so that loading has no side effects); then ``run_training`` sets the task's run up,
    trains it with the task's loop and saves it.
    """
    from tunesmith.config import load_config
    from tunesmith.pipeline import run_training
    from tunesmith.prepare import ensure_model
    from tunesmith.training import distributed

    cfg = load_config(config, overrides)
    distributed.setup(cfg.train)  # under torchrun: join the other processes
    distributed.main_first(lambda: ensure_model(cfg.model.name))
    return run_training(cfg, resume)
