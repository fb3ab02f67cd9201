"""Reward modelling: a scalar head on the backbone, trained on preference pairs (Bradley-Terry).

The saved run folder is a whole ``*ForSequenceClassification`` model (the method merged in), so
``AutoModelForSequenceClassification.from_pretrained(run_dir)`` loads it; ``tunesmith score``
prints its rewards.
"""

from __future__ import annotations

from tunesmith.config import Config
from tunesmith.objectives.reward import RewardObjective
from tunesmith.recipes.common import RunResult, train_task


def run(cfg: Config, resume: bool = False) -> RunResult:
    return train_task(
        cfg, resume, lambda ctx: RewardObjective(cfg.reward.margin), pairs=True, head="reward"
    )
