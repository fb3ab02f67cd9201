"""Recipes wire a task together: model + method + data + objective -> the loop -> artifacts."""

from __future__ import annotations

from tunesmith.config import Config
from tunesmith.recipes.common import RunResult


def run(cfg: Config, resume: bool = False) -> RunResult:
    """Run the recipe of ``cfg.task``."""
    from tunesmith.recipes import dpo, reward, sft

    recipes = {"sft": sft.run, "reward": reward.run, "dpo": dpo.run}
    return recipes[cfg.task](cfg, resume=resume)
