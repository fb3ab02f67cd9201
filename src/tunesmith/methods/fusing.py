"""What the fused nodes share: installing a forward on the modules it computes, and checking on a
probe input that a module computes what a node would (so nodes are chosen by what modules do, not
by their class names)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn


def hooked(module: nn.Module) -> bool:
    """Whether forward hooks are registered on ``module`` (a fused node would skip them)."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def agrees(module: nn.Module, formula: Callable[[torch.Tensor], torch.Tensor], width: int) -> bool:
    """Whether ``module``'s own forward gives what ``formula`` gives on a probe input, in eval
    mode and in training mode (each side from the same random state, so dropout the formula
    also applies draws the same, and dropout only the module applies tells them apart)."""
    weights = list(module.parameters())
    if not weights or any(p.is_meta for p in weights):
        return False
    w = weights[0]
    rng = torch.Generator(w.device).manual_seed(0)  # the global generator stays untouched
    probe = torch.randn(2, width, generator=rng, device=w.device).to(w.dtype)
    modes = {m: m.training for m in module.modules()}
    devices = [w.device] if w.device.type == "cuda" else []
    try:
        for training in (False, True):
            module.train(training)
            got = []
            for fn in (lambda p: type(module).forward(module, p), formula):
                with torch.no_grad(), torch.random.fork_rng(devices):
                    torch.manual_seed(0)
                    got.append(fn(probe))
            if got[0].shape != got[1].shape or not torch.allclose(*got, rtol=1e-4, atol=1e-5):
                return False
        return True
    except Exception:  # a forward that needs more than one tensor is not this module
        return False
    finally:
        for m, training in modes.items():
            m.training = training


def install_forward(
    model: nn.Module, forward: Callable[..., torch.Tensor], applies: Callable[[nn.Module], bool]
) -> int:
    """Make ``forward`` the forward of every module of ``model`` for which ``applies`` holds
    (once: a module that has it already counts; never over another instance-level forward, such
    as a dispatch hook's); returns how many modules have it."""
    count = 0
    for module in model.modules():
        own = module.__dict__.get("forward")
        done = getattr(own, "func", None) is forward
        if not done and own is None and applies(module):
            module.forward = functools.partial(forward, module)  # picklable, unlike a method
            done = True
        count += done
    return count
