"""One autograd node for RMSNorm (Zhang and Sennrich 2019, arXiv 1910.07467) as Llama, Qwen2/3 and
Mistral write it: in float32, then cast back, then scaled by the weight.

For ``x`` of shape (..., d), weight ``w`` and ``eps``:

    r = 1 / sqrt(mean(x^2) + eps)          (..., 1), in float32
    y = w * (x r)                          (x r cast back to x's dtype first)

and, for ``g = dL/dy`` and ``x^ = x r``:

    dL/dw = sum over rows of g * x^
    dL/dx = r * (g w - x^ * mean(g w * x^)) = r g w - (r^3 / d) (sum_i (g w)_i x_i) x

Op by op, autograd keeps ``x`` for the square, ``x`` and ``r`` for the product and, when the
weight trains (full fine-tuning), ``x^`` as well: two float32 (N, d) tensors per norm, four per
decoder layer. This node keeps ``x`` and ``r`` and recomputes ``x^`` only for ``dL/dw``.

On a CPU each elementwise pass over an (N, d) activation costs about as much as reading and
writing it from memory, so the node makes as few as it can: ``mean(x^2)`` as a norm reduction
(no squared copy), the scaling by ``r`` and ``w`` into one output, and ``dL/dx`` in the second
form above (a row dot product, one scaling and one fused multiply-add) instead of materialising
``x^`` and three temporaries. Measured at 8 x 428 x 512 (float32, forward and backward): 2.4 vs
3.7 ms per norm with a frozen weight, 3.1 vs 4.2 ms with a trained one.

``fuse_rmsnorm`` installs it on every module whose own forward computes exactly that (a
``weight`` and a ``variance_epsilon``, checked on a probe input, not by class name); Gemma's
``(1 + w)`` variant and any other norm keep their forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from tunesmith.methods.fusing import agrees, install_forward


class FusedRMSNorm(torch.autograd.Function):
    """``w * (x / sqrt(mean(x^2) + eps))`` (see the module doc)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        norm = torch.linalg.vector_norm(xf, 2, -1, keepdim=True)  # sqrt(sum x^2), no x^2 kept
        r = norm.square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        ctx.save_for_backward(x, r, weight)
        y = torch.mul(xf, r).to(x.dtype)
        # scaled in place where that keeps the dtype the module returns
        return y.mul_(weight) if torch.result_type(y, weight) == y.dtype else weight * y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, r, weight = ctx.saved_tensors
        xf = x.float()
        dx = dw = None
        if ctx.needs_input_grad[1]:
            dw = (grad * (xf * r).to(x.dtype)).reshape(-1, grad.shape[-1]).sum(0)
        if ctx.needs_input_grad[0]:
            gh = (grad * weight).to(x.dtype).float()  # the gradient at x^, rounded as op by op
            coef = torch.linalg.vecdot(gh, xf).unsqueeze(-1).mul_(r.pow(3)).div_(-x.shape[-1])
            dx = gh.mul_(r).addcmul_(xf, coef).to(x.dtype)
        return dx, dw, None


def _fused_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if args or kwargs:  # a variant with more inputs (a gated norm): its own forward
        return type(self).forward(self, x, *args, **kwargs)
    return FusedRMSNorm.apply(x, self.weight, self.variance_epsilon)


def is_rmsnorm(module: nn.Module) -> bool:
    """Whether ``module``'s forward computes ``w * (x / sqrt(mean(x^2) + eps))`` as the module
    doc writes it (checked on a probe input)."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", None)
    if (
        not isinstance(weight, nn.Parameter)
        or weight.dim() != 1
        or not isinstance(eps, float)
        or any(True for _ in module.children())
    ):
        return False
    return agrees(module, lambda x: FusedRMSNorm.apply(x, weight, eps), weight.shape[0])


def fuse_rmsnorm(model: nn.Module) -> int:
    """Install the one-node forward on every RMSNorm of ``model``; returns how many have it."""
    return install_forward(model, _fused_forward, is_rmsnorm)
