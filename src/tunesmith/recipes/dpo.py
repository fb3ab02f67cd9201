"""Direct preference optimisation (and IPO, cDPO, SimPO, hinge) with any method.

The reference model costs no second copy when it can be avoided:

- ``disable`` (default for parameter-efficient methods): the policy with its method disabled
  *is* the frozen base model;
- ``cache`` (default for ``full``): reference log-probs are computed once, before training, and
  cached on disk keyed by model and data;
- ``copy``: a frozen copy of the starting model, when memory allows and you prefer it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from tunesmith.config import Config
from tunesmith.data.batching import Batch
from tunesmith.methods import Method
from tunesmith.objectives.dpo import REFERENCE_FREE, DPOObjective
from tunesmith.objectives.reference import cached_reference_logps
from tunesmith.objectives.sft import sequence_logps
from tunesmith.recipes.common import Context, RunResult, say, train_task

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


def make_objective(ctx: Context) -> DPOObjective:
    cfg = ctx.cfg
    if cfg.dpo.loss in REFERENCE_FREE:
        return DPOObjective(cfg.dpo, None)
    mode = cfg.dpo.reference
    if mode == "auto":
        mode = "cache" if cfg.method.name == "full" else "disable"
    if mode == "disable":
        reference = disabled_reference(ctx.method)
    elif mode == "copy":
        reference = model_reference(copy.deepcopy(ctx.model))
    else:
        for split in (ctx.data.train, ctx.data.eval):
            if split:
                path = cached_reference_logps(ctx.model, split, cfg, ctx.device)
        say(f"reference log-probs cached in {path.parent}")

        def reference(model: nn.Module, batch: Batch) -> torch.Tensor:
            return batch.ref_logps

    return DPOObjective(cfg.dpo, reference)


def run(cfg: Config, resume: bool = False) -> RunResult:
    return train_task(cfg, resume, make_objective, pairs=True)
