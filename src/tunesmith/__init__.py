"""tunesmith: fine-tune Hugging Face language models with every method, from one config.

import tunesmith
result = tunesmith.train("configs/sft_lora.yaml", ["train.lr=1e-4"])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunesmith import tasks  # noqa: F401  (registers the tasks and their config sections)
from tunesmith.builtin import tasks as builtin_tasks  # noqa: F401  (registers builtin: data)
from tunesmith.config import Config, load_config
from tunesmith.errors import ConfigError, DataError, TunesmithError
from tunesmith.multi import MultiAdapter
from tunesmith.pipeline import RunResult

__all__ = [
    "Config",
    "ConfigError",
    "DataError",
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
    from tunesmith.pipeline import run_training
    from tunesmith.prepare import ensure_model
    from tunesmith.training import distributed

    cfg = load_config(config, overrides)
    distributed.setup(cfg.train)  # under torchrun: join the other processes
    distributed.main_first(lambda: ensure_model(cfg.model.name))
    return run_training(cfg, resume)
