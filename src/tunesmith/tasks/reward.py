"""``task: reward``: a reward model from preference pairs (Bradley-Terry, ``objectives/reward.py``).

The model is the backbone with a scalar head. The run folder is a whole
``*ForSequenceClassification`` model (the method merged in where it can be), so
``AutoModelForSequenceClassification.from_pretrained(run_dir)`` loads it; ``tunesmith score``
prints its rewards. Held out: the loss and pairwise accuracy.
"""

from __future__ import annotations

from tunesmith.data.kinds import PAIRS
from tunesmith.objectives.reward import RewardConfig, RewardObjective
from tunesmith.tasks.base import Task, register

REWARD = register(
    Task(
        name="reward",
        about="reward model from preference pairs (Bradley-Terry), scored by pairwise accuracy",
        records=PAIRS,
        head="reward",
        objective=lambda ctx: RewardObjective(ctx.cfg.reward.margin),
        section=RewardConfig,
        compare_metrics=("eval_loss", "eval_accuracy"),
        rising=("eval_accuracy",),
    )
)
