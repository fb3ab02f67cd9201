"""The maths of online RL for language models (PPO and GRPO / RLOO), one small function each.

A response y = (y_1, ..., y_T) to a prompt x is an episode whose action at step t is the token
y_t; pi_theta is the policy being trained, pi_old the policy that sampled y, pi_ref the frozen
reference (the base with the method disabled). Every tensor is per response token, shape (B, T),
with a ``mask`` (B, T) that is 1 on the response's tokens (its end token included) and 0 on
padding after it. Token losses here return *sums* over masked tokens: the loop divides by the
number of response tokens of the whole optimiser step (``count``), so batch 8 x accumulation 1
and batch 1 x accumulation 8 give the same update.

KL to the reference, per token, from the log-ratio of the sampled token (Schulman 2020,
"Approximating KL Divergence", http://joschu.net/blog/kl-approx.html). With
s = log pi(y_t) - log pi_ref(y_t) and y_t ~ pi, each is an estimate of KL[pi || pi_ref]:

    k1 = s                       unbiased, high variance, negative for some samples
    k2 = s^2 / 2                 biased (an f-divergence, equal to KL to second order), low variance
    k3 = (e^{-s} - 1) + s        unbiased and >= 0 (k1 plus the control variate r - 1, r = e^{-s})

PPO for language models (InstructGPT: Ouyang et al. 2022, arXiv 2203.02155; after Ziegler et al.
2019, arXiv 1909.08593). The per-token reward is a KL penalty, plus the sequence score R(x, y)
of the reward source on the last response token:

    r_t = -beta * KL_t + [t = T] * R(x, y)

beta is fixed or adapted to a KL target (Ziegler et al. 2019, section 2.2):

    e = clip(KL / KL_target - 1, -0.2, 0.2),    beta <- beta * (1 + e * n_steps / horizon)

Advantages by generalised advantage estimation (Schulman et al. 2016, arXiv 1506.02438), with
the value V_{T+1} = 0 after the last token:

    delta_t = r_t + gamma * V_{t+1} - V_t,    A_t = delta_t + gamma * lambda * A_{t+1},
    returns G_t = A_t + V_t

The clipped surrogate (Schulman et al. 2017, arXiv 1707.06347), with rho_t = pi_theta / pi_old:

    L_pi = -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)
    L_V  = 1/2 max((V_t - G_t)^2, (V_old_t + clip(V_t - V_old_t, -eps_V, eps_V) - G_t)^2)

GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300) drops the value model: G responses are
sampled per prompt, and every token of response i gets the group-relative advantage of its score

    A_i = (R_i - mean(R_1..R_G)) / (std(R_1..R_G) + eps)

(``group_centred`` omits the division, as Dr. GRPO does: Liu et al. 2025, arXiv 2503.20783). The
KL to the reference enters the loss, not the reward, with the k3 estimator:
L = L_pi + beta * k3. RLOO (Ahmadian et al. 2024, arXiv 2402.14740) is the same loop with the
leave-one-out baseline A_i = R_i - (1 / (G - 1)) sum_{j != i} R_j.

Functions are found by name in ``KL_ESTIMATORS``, ``KL_CONTROLLERS`` and ``GROUP_ADVANTAGES``;
adding a variant is adding a function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from tunesmith.training.rollout import entropy_from_logits  # noqa: F401  (part of the RL maths API)

# ----------------------------------------------------------------------------------------------
# Masked reductions


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum of x where mask is 1 (over ``dim``, or everything)."""
    x = x * mask
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * m) / sum(m), over ``dim`` or everything; 0 where nothing is masked in."""
    return masked_sum(x, mask, dim) / masked_sum(torch.ones_like(x), mask, dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked-in entries of x (with Bessel's correction when ``unbiased``)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_sum((x - mean) ** 2, mask) / n.clamp(min=1)
    if unbiased:
        var = var * n / (n - 1).clamp(min=1)
    return var


def whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked-in entries; masked-out entries become 0.

    With ``shift_mean=False`` the mean is added back (scale only), as PPO does for rewards.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# ----------------------------------------------------------------------------------------------
# KL estimators: per token, from log pi(y_t) and log pi_ref(y_t) of the sampled token


def kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k1 = log pi - log pi_ref: unbiased, can be negative."""
    return logps - ref_logps


def kl_k2(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k2 = (log pi - log pi_ref)^2 / 2: biased, non-negative, low variance."""
    return 0.5 * (logps - ref_logps) ** 2


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = pi_ref / pi: unbiased and non-negative."""
    log_r = ref_logps - logps
    return torch.expm1(log_r) - log_r  # expm1: exact near r = 1, where most tokens sit


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def kl_penalised_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token rewards (B, T), per-token KL estimates (B, T)), both 0 off the mask.

    r_t = -kl_coef * KL_t, plus the sequence score R (B,) on each row's last response token
    (InstructGPT's reward: the reward model judges the whole response, the KL every token).
    """
    if bool((mask.sum(-1) == 0).any()):
        raise ValueError("kl_penalised_rewards: a response has no tokens to put its score on.")
    kl = KL_ESTIMATORS[estimator](logps, ref_logps) * mask  # (B, T)
    rewards = -kl_coef * kl
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * mask.long()).argmax(-1)  # (B,) index of each row's last response token
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, kl


# ----------------------------------------------------------------------------------------------
# KL coefficient controllers (Ziegler et al. 2019, arXiv 1909.08593, section 2.2)


class KLController(Protocol):
    value: float

    def update(self, kl: float, n_steps: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class FixedKLController:
    """beta stays where it started."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon).

    A proportional controller: above the target KL beta grows, below it shrinks, by at most
    20% per ``horizon`` samples. ``n_steps`` is the number of samples (responses) the KL was
    measured on, so the rate does not depend on the batch size.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(
                f"adaptive KL needs target > 0 and horizon > 0, got {target}, {horizon}"
            )
        self.value, self.target, self.horizon = float(kl_coef), float(target), int(horizon)

    def update(self, kl: float, n_steps: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        # Python floats: a JSON round trip restores them bit for bit, so resume is exact.
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.target, self.horizon = float(state["target"]), int(state["horizon"])


def kl_controller(
    kind: str, kl_coef: float, target: float | None = None, horizon: int | None = None
) -> KLController:
    """``fixed`` or ``adaptive`` (which needs ``target`` and ``horizon``)."""
    if kind == "fixed":
        return FixedKLController(kl_coef)
    if kind == "adaptive":
        if target is None or horizon is None:
            raise ValueError("adaptive KL control needs a target KL and a horizon.")
        return AdaptiveKLController(kl_coef, target, horizon)
    raise ValueError(f"unknown KL controller {kind!r}; use one of {', '.join(KL_CONTROLLERS)}.")


KL_CONTROLLERS = ("fixed", "adaptive")


# ----------------------------------------------------------------------------------------------
# Advantages


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages (B, T), returns (B, T)) by generalised advantage estimation over the masked
    tokens; 0 off the mask.

    delta_t = r_t + gamma V_{t+1} - V_t and A_t = delta_t + gamma lambda A_{t+1}, where V_{t+1}
    and A_{t+1} count as 0 past the last response token (the episode ends there); G_t = A_t + V_t.
    """
    B, T = rewards.shape
    rewards, values, mask = rewards.float(), values.float(), mask.float()
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, device=rewards.device)  # V_{t+1}, 0 past the end
    next_adv = torch.zeros(B, device=rewards.device)  # A_{t+1}
    for t in reversed(range(T)):
        live = mask[:, t + 1] if t + 1 < T else torch.zeros(B, device=rewards.device)
        delta = rewards[:, t] + gamma * next_value * live - values[:, t]
        adv = delta + gamma * lam * next_adv * live
        advantages[:, t] = adv * mask[:, t]
        next_value, next_adv = values[:, t], adv
    returns = (advantages + values) * mask
    return advantages, returns


def group_normalised(scores: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: (R_i - mean_group) / (std_group + eps), std with Bessel's correction.

    ``scores`` (B,) holds B / G groups of G consecutive responses to the same prompt.
    """
    g = _groups(scores, group_size)  # (B / G, G)
    return ((g - g.mean(-1, keepdim=True)) / (g.std(-1, keepdim=True) + eps)).reshape(-1)


def group_centred(scores: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO without the std scaling (Dr. GRPO): R_i - mean_group."""
    g = _groups(scores, group_size)
    return (g - g.mean(-1, keepdim=True)).reshape(-1)


def leave_one_out(scores: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """RLOO: R_i - mean_{j != i} R_j = G / (G - 1) * (R_i - mean_group)."""
    if group_size < 2:
        raise ValueError("leave-one-out advantages need at least 2 responses per prompt.")
    g = _groups(scores, group_size)
    others = (g.sum(-1, keepdim=True) - g) / (group_size - 1)  # (B / G, G)
    return (g - others).reshape(-1)


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(
            f"{tuple(scores.shape)} scores do not split into groups of {group_size} responses."
        )
    return scores.float().view(-1, group_size)


GROUP_ADVANTAGES: dict[str, Callable[[torch.Tensor, int, float], torch.Tensor]] = {
    "grpo": group_normalised,
    "grpo_no_std": group_centred,
    "rloo": leave_one_out,
}


# ----------------------------------------------------------------------------------------------
# Losses: each returns (sum over masked tokens, metric sums over masked tokens)


def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(sum_t max(-rho_t A_t, -clip(rho_t, 1-eps, 1+eps) A_t), metric sums), rho = pi / pi_old.

    Metrics (sums over tokens; divide by the token count): ``clip_frac`` tokens whose clipped
    term was the active one, ``approx_kl`` k3 estimate of KL[pi_old || pi] (how far this update
    moved the policy; Schulman's recommendation over the mean log-ratio), ``ratio``.
    """
    log_ratio = logps - old_logps.detach()  # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_sum(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {
            "clip_frac": float(masked_sum((clipped > unclipped).float(), mask)),
            "approx_kl": float(masked_sum(torch.expm1(log_ratio) - log_ratio, mask)),
            "ratio": float(masked_sum(ratio, mask)),
        }
    return loss, metrics


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(sum_t 1/2 max((V - G)^2, (V_old + clip(V - V_old, -c, c) - G)^2), metric sums).

    The clipped term keeps one update from moving a value far from the one that computed the
    advantages. Metrics: ``value_clip_frac`` tokens where it was the active one.
    """
    old_values = old_values.detach()
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    err = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_sum(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        metrics = {"value_clip_frac": float(masked_sum((err_clipped > err).float(), mask))}
    return loss, metrics
