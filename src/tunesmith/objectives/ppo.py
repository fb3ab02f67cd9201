"""The policy update of PPO and GRPO / RLOO: one objective over mini-batches of rollouts.

Both minimise the clipped surrogate of Schulman et al. 2017 (arXiv 1707.06347) over response
tokens; they differ in where advantages come from and where the KL to the reference goes (see
``objectives/rl.py`` for the maths of each piece):

    PPO (Ouyang et al. 2022, arXiv 2203.02155):
        advantages by GAE on KL-penalised rewards (KL in the reward), a value model:
        L = L_pi + c_V L_V - c_H H
    GRPO (Shao et al. 2024, arXiv 2402.03300) / RLOO (Ahmadian et al. 2024, arXiv 2402.14740):
        group-relative advantages of sequence scores, no value model, KL in the loss:
        L = L_pi + beta k3(pi, pi_ref) - c_H H

Every term is a sum over the mini-batch's response tokens; ``count`` is its number of response
tokens, and the loop divides the step's summed loss by the step's summed count, so the update is
the token-mean over all micro-batches of the step whatever their split.

The objective calls the root model (``response_logps``: one forward over prompt + response); the
value model, when there is one, is a callable ``value_fn(model, batch) -> (B, R)`` giving V at
each response token (the recipe owns the value head).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import nn

from tunesmith.objectives.rl import (
    KL_ESTIMATORS,
    clipped_policy_loss,
    clipped_value_loss,
    masked_sum,
)
from tunesmith.training.rollout import Rollout, response_logps


@dataclass
class RLBatch:
    """A mini-batch of rollouts with what the update needs; every (B, R) tensor is 0 off
    ``response_mask``.

    ``input_ids`` / ``attention_mask`` (B, P + R): prompt (left-padded) then response
    (right-padded); ``old_logps`` log pi_old of the response tokens (from sampling or one
    no-grad ``response_logps`` pass before the update); ``advantages`` per token (GRPO: the
    sequence's advantage on each of its tokens); ``ref_logps`` log pi_ref (for a KL term in the
    loss); ``returns`` and ``old_values`` for a value model (PPO).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    old_logps: torch.Tensor
    advantages: torch.Tensor
    ref_logps: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    old_values: torch.Tensor | None = None

    @classmethod
    def from_rollout(
        cls,
        rollout: Rollout,
        advantages: torch.Tensor,
        old_logps: torch.Tensor | None = None,
        ref_logps: torch.Tensor | None = None,
        returns: torch.Tensor | None = None,
        old_values: torch.Tensor | None = None,
    ) -> RLBatch:
        """From a rollout; ``advantages`` (B,) per sequence are put on each of its tokens."""
        mask = rollout.response_mask
        if advantages.dim() == 1:
            advantages = advantages[:, None].to(mask.device) * mask  # (B, R)
        old = old_logps if old_logps is not None else rollout.logps
        if old is None:
            raise ValueError("RLBatch needs old log-probs: from the rollout or given.")
        return cls(
            rollout.input_ids,
            rollout.attention_mask,
            mask,
            old,
            advantages,
            ref_logps,
            returns,
            old_values,
        )

    def to(self, device: torch.device) -> RLBatch:
        return RLBatch(
            **{
                f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                for f in fields(self)
            }
        )

    def select(self, rows: torch.Tensor | list[int]) -> RLBatch:
        """Some rows only (a mini-batch), in the order given."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        return RLBatch(
            **{
                f.name: None
                if getattr(self, f.name) is None
                else getattr(self, f.name)[idx.to(getattr(self, f.name).device)]
                for f in fields(self)
            }
        )

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens, prompt and response: what the loop counts as processed."""
        return int(self.attention_mask.sum())

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class ClippedPolicyObjective:
    """Clipped policy loss, plus optional KL-to-reference, entropy and value terms.

    ``kl_coef`` > 0 puts ``kl_coef * KL_t`` (``kl_estimator``, k3 by default as in GRPO) in the
    loss and needs ``ref_logps``; leave it 0 for PPO, whose KL is in the rewards. ``value_fn``
    (with ``returns`` and ``old_values`` in the batch) adds ``value_coef`` times the clipped value
    loss. ``temperature`` must be the sampling temperature, so pi and pi_old are one distribution.
    """

    name = "policy"

    def __init__(
        self,
        clip_eps: float = 0.2,
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        entropy_coef: float = 0.0,
        temperature: float = 1.0,
        value_fn: Callable[[nn.Module, RLBatch], torch.Tensor] | None = None,
        value_coef: float = 0.5,
        value_clip: float = 0.2,
    ) -> None:
        self.clip_eps, self.kl_coef, self.kl = clip_eps, kl_coef, KL_ESTIMATORS[kl_estimator]
        self.entropy_coef, self.temperature = entropy_coef, temperature
        self.value_fn, self.value_coef, self.value_clip = value_fn, value_coef, value_clip

    def count(self, batch: RLBatch) -> int:
        return int(batch.response_mask.sum())

    def __call__(self, model: nn.Module, batch: RLBatch) -> tuple[torch.Tensor, dict[str, float]]:
        mask = batch.response_mask.float()  # (B, R)
        logps, entropy = response_logps(
            model,
            batch.input_ids,
            batch.attention_mask,
            mask.shape[1],
            self.temperature,
            with_entropy=True,
        )
        loss, metrics = clipped_policy_loss(
            logps, batch.old_logps, batch.advantages, mask, self.clip_eps
        )
        metrics["policy_loss"] = float(loss.detach())
        if self.entropy_coef:
            loss = loss - self.entropy_coef * masked_sum(entropy, mask)
        metrics["entropy"] = float(masked_sum(entropy.detach(), mask))
        if batch.ref_logps is not None:
            kl = masked_sum(self.kl(logps, batch.ref_logps), mask)
            metrics["kl_ref"] = float(kl.detach())
            if self.kl_coef:
                loss = loss + self.kl_coef * kl
        elif self.kl_coef:
            raise ValueError("kl_coef > 0 needs the reference log-probs (ref_logps) in the batch.")
        if self.value_fn is not None:
            if batch.returns is None or batch.old_values is None:
                raise ValueError("a value loss needs returns and old_values in the batch.")
            values = self.value_fn(model, batch)  # (B, R)
            v_loss, v_metrics = clipped_value_loss(
                values, batch.old_values, batch.returns, mask, self.value_clip
            )
            loss = loss + self.value_coef * v_loss
            metrics.update(v_metrics, value_loss=float(v_loss.detach()))
        return loss, metrics
