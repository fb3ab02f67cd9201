"""tunesmith: fine-tune Hugging Face language models with every method, from one config.

import tunesmith
result = tunesmith.train("configs/sft_lora.yaml", ["train.lr=1e-4"])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunesmith.config import Config, load_config
from tunesmith.errors import ConfigError, DataError, TunesmithError
from tunesmith.multi import MultiAdapter
from tunesmith.recipes.common import RunResult

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
    """Run one training job from a YAML path, a dict or a :class:`Config` (plus dotted overrides)."""
    from tunesmith import recipes

    return recipes.run(load_config(config, overrides), resume=resume)
