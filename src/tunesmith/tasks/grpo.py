"""``task: grpo``: group relative policy optimisation (Shao et al. 2024, DeepSeekMath, arXiv
2402.03300), and RLOO (Ahmadian et al. 2024, arXiv 2402.14740) as a setting of it.

Each prompt gets ``group_size`` = G sampled responses with scores R_1..R_G; every token of
response i gets the same advantage, relative to its group, with no value model:

    grpo         A_i = (R_i - mean_j R_j) / (std_j R_j + eps)
    grpo_no_std  A_i = R_i - mean_j R_j                         (Dr. GRPO, arXiv 2503.20783)
    rloo         A_i = R_i - 1/(G-1) sum_{j != i} R_j           (leave-one-out baseline)

and the policy minimises the clipped surrogate plus, optionally, beta times the k3 estimate of
KL[pi || pi_ref] per token (``kl_coef``; the reference is the starting model, see
``tasks/rl_source.py``):

    L = sum_t max(-rho_t A_t, -clip(rho_t, 1 - eps, 1 + eps) A_t) + beta KL_t,  rho_t = pi / pi_old
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from tunesmith.config import Config
from tunesmith.errors import ConfigError
from tunesmith.objectives.ppo import RLBatch
from tunesmith.objectives.rl import GROUP_ADVANTAGES
from tunesmith.tasks.base import register
from tunesmith.tasks.rl_source import (
    RLConfig,
    Scored,
    check_rl,
    rl_task,
)


@dataclass
class GRPOConfig(RLConfig):
    advantage: Literal["grpo", "grpo_no_std", "rloo"] = "grpo"
    """How a response's score becomes its advantage within its group (``rloo``: leave-one-out)."""


class GroupAdvantages:
    """Group-relative advantages of sequence scores, on every token of the response."""

    def __init__(self, s: GRPOConfig) -> None:
        self.fn, self.group = GROUP_ADVANTAGES[s.advantage], s.group_size

    def __call__(self, s: Scored) -> tuple[RLBatch, dict[str, float]]:
        adv = self.fn(s.scores.float(), self.group, 1e-4).to(s.logps.device)
        tokens = adv[:, None] * s.response_mask.float()
        flat = float((s.scores.view(-1, self.group).std(-1) == 0).float().mean())
        batch = RLBatch(s.ids, s.mask, s.response_mask, s.logps, tokens, s.ref_logps)
        return batch, {"zero_std_groups": flat}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def check(cfg: Config) -> None:
    check_rl(cfg.grpo, "grpo", cfg)
    if cfg.grpo.group_size < 2:
        raise ConfigError(
            f"grpo.group_size: group-relative advantages compare responses to the same prompt; "
            f"use at least 2 (got {cfg.grpo.group_size})."
        )


GRPO = register(
    rl_task(
        "grpo",
        "GRPO / RLOO: online RL from a reward, advantages relative to a group of responses",
        head="lm",
        section=GRPOConfig,
        check=check,
        advantages=GroupAdvantages,
        kl_in_loss=True,
    )
)
