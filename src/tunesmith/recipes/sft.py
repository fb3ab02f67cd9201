"""Supervised fine-tuning: any method, any supported record format."""

from __future__ import annotations

from tunesmith.config import Config
from tunesmith.objectives.sft import SFTObjective
from tunesmith.recipes.common import RunResult, train_task


def run(cfg: Config, resume: bool = False) -> RunResult:
    return train_task(cfg, resume, lambda ctx: SFTObjective())
