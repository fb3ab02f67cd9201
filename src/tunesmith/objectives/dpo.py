"""Direct preference optimisation and its siblings, each its own small loss.

DPO (Rafailov et al. 2023, arXiv 2305.18290). With the implicit reward
r(x, y) = beta * (log pi(y|x) - log ref(y|x)) and the margin
h = (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x)):

    sigmoid (DPO):  L = -log sigmoid(beta * h)
    cdpo:           L = -(1 - e) log sigmoid(beta * h) - e log sigmoid(-beta * h)
                    (conservative DPO: labels flipped with probability e = label_smoothing)
    ipo:            L = (h_avg - 1 / (2 beta))^2      (Azar et al. 2023, arXiv 2310.12036;
                    h_avg uses per-token average log-probs, as TRL does)
    hinge:          L = max(0, 1 - beta * h)          (SLiC, Zhao et al. 2023, arXiv 2305.10425)
    simpo:          L = -log sigmoid(beta * (avg log pi(y_c|x) - avg log pi(y_r|x)) - gamma)
                    (Meng et al. 2024, arXiv 2405.14734: reference-free, length-normalised,
                    with a target margin gamma)

A loss is found by name in ``LOSSES``; adding one is adding a function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.data.batching import Batch
from tunesmith.errors import ConfigError
from tunesmith.objectives.reward import pair_accuracy
from tunesmith.objectives.sft import sequence_logps


@dataclass
class DPOConfig:
    loss: Literal["sigmoid", "cdpo", "ipo", "hinge", "simpo"] = "sigmoid"
    """``sigmoid`` (DPO), ``cdpo`` (label-smoothed), ``ipo``, ``hinge`` or ``simpo`` (reference-free)."""
    beta: float = 0.1
    """Strength of the implicit KL constraint (and the reward scale)."""
    label_smoothing: float = 0.0
    """cDPO: probability that a preference label is flipped (0 <= e < 0.5)."""
    simpo_gamma: float = 0.5
    """SimPO: target reward margin gamma."""
    reference: Literal["auto", "disable", "cache", "copy"] = "auto"
    """Reference model: ``disable`` the method (free, not for ``full``), ``cache`` reference
    log-probs computed once before training, or keep a frozen ``copy``. ``auto``: disable, or cache
    with ``full``."""

    def check(self, prefix: str) -> None:
        if self.beta <= 0:
            raise ConfigError(f"{prefix}.beta: got {self.beta}; must be > 0.")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(
                f"{prefix}.label_smoothing: got {self.label_smoothing}; must be in [0, 0.5)."
            )


@dataclass
class PairLogps:
    """Summed log-probs of each pair's responses (P,), and their token counts (P,)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def margin(self) -> torch.Tensor:
        """h: the policy's log-ratio gap minus the reference's."""
        return (self.chosen - self.ref_chosen) - (self.rejected - self.ref_rejected)

    def margin_avg(self) -> torch.Tensor:
        """h with per-token average log-probs."""
        c, r = self.chosen_tokens, self.rejected_tokens
        return (self.chosen / c - self.ref_chosen / c) - (self.rejected / r - self.ref_rejected / r)


def sigmoid(p: PairLogps, cfg: DPOConfig) -> torch.Tensor:
    return -F.logsigmoid(cfg.beta * p.margin())


def cdpo(p: PairLogps, cfg: DPOConfig) -> torch.Tensor:
    z = cfg.beta * p.margin()
    return -(1 - cfg.label_smoothing) * F.logsigmoid(z) - cfg.label_smoothing * F.logsigmoid(-z)


def ipo(p: PairLogps, cfg: DPOConfig) -> torch.Tensor:
    return (p.margin_avg() - 1 / (2 * cfg.beta)) ** 2


def hinge(p: PairLogps, cfg: DPOConfig) -> torch.Tensor:
    return torch.relu(1 - cfg.beta * p.margin())


def simpo(p: PairLogps, cfg: DPOConfig) -> torch.Tensor:
    gap = p.chosen / p.chosen_tokens - p.rejected / p.rejected_tokens
    return -F.logsigmoid(cfg.beta * gap - cfg.simpo_gamma)


LOSSES: dict[str, Callable[[PairLogps, DPOConfig], torch.Tensor]] = {
    "sigmoid": sigmoid,
    "cdpo": cdpo,
    "ipo": ipo,
    "hinge": hinge,
    "simpo": simpo,
}
REFERENCE_FREE = {"simpo"}


class DPOObjective:
    """Preference loss over pair batches (all chosen rows, then all rejected rows).

    ``reference(model, batch)`` gives the reference log-probs and token counts of every row:
    the frozen base (method disabled), a cached table, or a frozen copy (see recipes/dpo.py).
    """

    name = "dpo"

    def __init__(
        self, cfg: DPOConfig, reference: Callable[[nn.Module, Batch], torch.Tensor] | None
    ) -> None:
        self.cfg = cfg
        self.loss = LOSSES[cfg.loss]
        self.reference = reference

    def count(self, batch: Batch) -> int:
        return batch.sequences // 2

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        logps, tokens = sequence_logps(model, batch)  # (2P,) in one forward pass
        if self.reference is None:
            ref = torch.zeros_like(logps)
        else:
            with torch.no_grad():
                ref = self.reference(model, batch).to(logps.device)
        n = self.count(batch)
        p = PairLogps(logps[:n], logps[n:], ref[:n], ref[n:], tokens[:n], tokens[n:])
        losses = self.loss(p, self.cfg)  # (P,)
        if self.cfg.loss in REFERENCE_FREE:
            r_c, r_r = (
                self.cfg.beta * p.chosen / p.chosen_tokens,
                self.cfg.beta * p.rejected / p.rejected_tokens,
            )
        else:
            r_c, r_r = (
                self.cfg.beta * (p.chosen - p.ref_chosen),
                self.cfg.beta * (p.rejected - p.ref_rejected),
            )
        r_c, r_r = r_c.detach(), r_r.detach()
        # Metric sums; the loop divides by the number of pairs.
        metrics = {
            "reward_chosen": float(r_c.sum()),
            "reward_rejected": float(r_r.sum()),
            "reward_margin": float((r_c - r_r).sum()),
            "accuracy": float(pair_accuracy(r_c - r_r)),
        }
        return losses.sum(), metrics
