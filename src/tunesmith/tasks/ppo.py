"""``task: ppo``: proximal policy optimisation for language models (Schulman et al. 2017, arXiv
1707.06347; as in InstructGPT, Ouyang et al. 2022, arXiv 2203.02155).

The reward of a response is a per-token KL penalty against the reference plus the reward
source's score on its last token; a value head on the policy's backbone gives V_t; advantages come
from generalised advantage estimation (Schulman et al. 2016, arXiv 1506.02438) and are whitened:

    r_t = -beta KL_t + [t = T] R(x, y)                         (KL_t: k1, k2 or k3)
    delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lambda A_{t+1},   G_t = A_t + V_t
    L = L_clip(pi; A) + c_V * 1/2 max((V - G)^2, (V_old + clip(V - V_old, +-eps_V) - G)^2) - c_H H

beta is fixed, or adapted after every rollout batch towards ``kl_target`` (Ziegler et al. 2019,
arXiv 1909.08593): beta <- beta (1 + clip(KL / target - 1, +-0.2) n / horizon). Each rollout batch
is used for ``epochs`` passes of ``minibatches`` optimiser steps. The maths is in
``objectives/rl.py``; the shared RL plumbing in ``tasks/rl_source.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from tunesmith.config import Config
from tunesmith.errors import ConfigError
from tunesmith.objectives.ppo import RLBatch
from tunesmith.objectives.rl import gae, kl_controller, kl_penalised_rewards, whiten
from tunesmith.tasks.base import register
from tunesmith.tasks.rl_source import (
    RLConfig,
    Scored,
    check_rl,
    rl_task,
)


@dataclass
class PPOConfig(RLConfig):
    group_size: int = 1
    """Responses sampled per prompt (1 is classic PPO; the value head is the baseline)."""
    kl_coef: float = 0.05
    """beta: weight of the per-token KL penalty in the rewards (the start value when adaptive)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator of the penalty."""
    kl_control: Literal["fixed", "adaptive"] = "fixed"
    """Keep beta fixed, or adapt it towards ``kl_target``."""
    kl_target: float = 6.0
    """Target KL per response (nats) of the adaptive controller."""
    kl_horizon: int = 10000
    """Responses over which the adaptive controller may change beta by 20%."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """lambda of GAE (1: Monte Carlo returns, 0: one-step TD)."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, variance 1 over each rollout batch's tokens."""
    value_coef: float = 0.1
    """Weight of the value loss."""
    value_clip: float = 0.2
    """Clip range of the value update around the values that computed the advantages."""


class GAEAdvantages:
    """KL-penalised per-token rewards, GAE with the value head, whitening; the KL controller."""

    def __init__(self, s: PPOConfig) -> None:
        self.s = s
        self.controller = kl_controller(s.kl_control, s.kl_coef, s.kl_target, s.kl_horizon)

    def __call__(self, sc: Scored) -> tuple[RLBatch, dict[str, float]]:
        s, mask = self.s, sc.response_mask.float()
        if sc.values is None:
            raise RuntimeError("PPO needs the value head's values (the model has no value_head).")
        ref = sc.ref_logps if sc.ref_logps is not None else sc.logps
        beta = self.controller.value
        rewards, kl = kl_penalised_rewards(sc.scores, sc.logps, ref, mask, beta, s.kl_estimator)
        adv, returns = gae(rewards, sc.values, mask, s.gamma, s.lam)
        if s.whiten_advantages:
            adv = whiten(adv, mask)
        kl_seq = float(kl.sum(-1).mean())
        self.controller.update(kl_seq, n_steps=len(sc.scores))
        batch = RLBatch(sc.ids, sc.mask, sc.response_mask, sc.logps, adv, None, returns, sc.values)
        stats = {
            "kl_coef": beta,
            "kl_penalty": kl_seq,
            "value_mean": float((sc.values * mask).sum() / mask.sum()),
        }
        return batch, stats

    def state_dict(self) -> dict[str, Any]:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state)


def check(cfg: Config) -> None:
    check_rl(cfg.ppo, "ppo", cfg)
    s = cfg.ppo
    if not 0 <= s.gamma <= 1 or not 0 <= s.lam <= 1:
        raise ConfigError(f"ppo.gamma and ppo.lam must be in [0, 1], got {s.gamma}, {s.lam}.")
    if s.kl_control == "adaptive" and (s.kl_target <= 0 or s.kl_horizon <= 0):
        raise ConfigError("ppo.kl_target and ppo.kl_horizon must be > 0 with kl_control: adaptive.")


PPO = register(
    rl_task(
        "ppo",
        "PPO (RLHF): online RL from a reward, value head, GAE, KL penalty to the reference",
        head="value",
        section=PPOConfig,
        check=check,
        advantages=GAEAdvantages,
        kl_in_loss=False,
        extra_series=("kl_coef", "kl_penalty", "value_loss"),
    )
)
