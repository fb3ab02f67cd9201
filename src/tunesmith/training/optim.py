"""AdamW (Loshchilov & Hutter 2019, arXiv 1711.05101) and the learning-rate schedule.

Decoupled weight decay applies to matrices only (``p.ndim >= 2``); biases and norm gains are not
decayed. The schedule warms up linearly from 0 to the peak over ``W`` steps, then decays:

    cosine:  lr_t = lr * 0.5 * (1 + cos(pi * (t - W) / (T - W)))
    linear:  lr_t = lr * (T - t) / (T - W)
    constant: lr_t = lr
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tunesmith.config import TrainConfig


def build_optimizer(
    params: list[tuple[str, nn.Parameter]], cfg: TrainConfig, device: torch.device
) -> torch.optim.AdamW:
    decay = [p for _, p in params if p.ndim >= 2]
    no_decay = [p for _, p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    # Fused AdamW is one kernel per step on GPU; on CPU the multi-tensor (foreach) path is fastest.
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused, foreach=None if fused else True
    )


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    return int(cfg.warmup * total) if cfg.warmup < 1 else int(cfg.warmup)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr for the update made at ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    opt: torch.optim.Optimizer, cfg: TrainConfig, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    w = warmup_steps(cfg, total)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, w, cfg.schedule))
