"""``task: dpo``: direct preference optimisation (and IPO, cDPO, SimPO, hinge) with any method.

The reference model costs no second copy when it can be avoided:

- ``disable`` (default for methods with a frozen base): the policy with its method disabled
  *is* the starting model;
- ``cache`` (default otherwise, e.g. ``full``): reference log-probs are computed once, before
  training, and cached on disk keyed by model and data;
- ``copy``: a frozen copy of the starting model, when memory allows and you prefer it.

Scoring a finished run uses the same reference: the base under the method, or (for a run whose
method has no frozen base) a fresh copy of the model it started from.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tunesmith.config import Config
from tunesmith.console import say
from tunesmith.data.batching import Batch
from tunesmith.data.kinds import PAIRS
from tunesmith.errors import ConfigError
from tunesmith.methods import Method
from tunesmith.methods.base import method_class
from tunesmith.objectives.dpo import REFERENCE_FREE, DPOConfig, DPOObjective
from tunesmith.objectives.reference import cached_reference_logps
from tunesmith.objectives.sft import sequence_logps
from tunesmith.tasks.base import Context, Task, register, share_prompt
from tunesmith.training.distributed import main_first

Reference = Callable[[nn.Module, Batch], torch.Tensor]


def disabled_reference(method: Method) -> Reference:
    """log ref(y|x) from the policy itself with its method switched off (the frozen base)."""

    def reference(model: nn.Module, batch: Batch) -> torch.Tensor:
        with method.disable():
            return sequence_logps(model, batch)[0]

    return reference


def model_reference(frozen: nn.Module) -> Reference:
    """log ref(y|x) from a separate, frozen model."""
    frozen.eval().requires_grad_(False)

    def reference(model: nn.Module, batch: Batch) -> torch.Tensor:
        return sequence_logps(frozen, batch)[0]

    return reference


def cached_reference(model: nn.Module, batch: Batch) -> torch.Tensor:
    """log ref(y|x) computed before training and carried by the batch."""
    return batch.extras["ref_logp"]


def reference_mode(cfg: Config, method: Method | None) -> str:
    """The reference actually used: ``auto`` resolves by the method's capability."""
    frozen_base = method is not None and method.frozen_base
    mode = cfg.dpo.reference
    if mode == "auto":
        mode = "disable" if frozen_base else "cache"
    return mode


def make_objective(ctx: Context) -> DPOObjective:
    cfg = ctx.cfg
    if cfg.dpo.loss in REFERENCE_FREE:
        return DPOObjective(cfg.dpo, None)
    mode = reference_mode(cfg, ctx.method)
    if mode == "disable":
        return DPOObjective(cfg.dpo, disabled_reference(ctx.method))
    if mode == "copy" or not ctx.training:  # a finished run: its starting model, freshly loaded
        return DPOObjective(cfg.dpo, model_reference(ctx.starting_model()))
    share = share_prompt(ctx)[0]  # the layout training uses: the same roundings at step 0
    for split in (ctx.data.train, ctx.data.eval):
        if split:
            # Under torchrun rank 0 computes them once; the others read its cache file.
            path = main_first(
                lambda s=split: cached_reference_logps(
                    ctx.model, s, cfg, ctx.device, PAIRS.group, share
                )
            )
    say(f"reference log-probs cached in {path.parent}")
    return DPOObjective(cfg.dpo, cached_reference)


def check(cfg: Config) -> None:
    if cfg.dpo.reference == "disable" and not method_class(cfg.method.name).frozen_base:
        raise ConfigError(
            f"dpo.reference: 'disable' needs a method with a frozen base to switch back to; method "
            f"'{cfg.method.name}' changes the base itself, so use cache or copy."
        )


DPO = register(
    Task(
        name="dpo",
        about="direct preference optimisation (DPO, cDPO, IPO, hinge, SimPO) from preference pairs",
        records=PAIRS,
        head="lm",
        objective=make_objective,
        section=DPOConfig,
        check=check,
        compare_metrics=("eval_loss", "eval_accuracy"),
        rising=("eval_accuracy",),
        shares_prompt=True,
    )
)
