"""One autograd node for a linear layer, plain or with a LoRA update over a frozen base (Hu et al.
2021, arXiv 2106.09685): the base product, the low-rank update and their sum in three matrix
products forward and four backward, in the compute dtype.

For ``x`` of shape (N, d_in), frozen ``W`` (d_out, d_in) and bias ``b``, trainable ``A`` (r, d_in)
and ``B`` (d_out, r), scale ``s`` and the LoRA branch's input ``x'`` (``x`` itself, or
``dropout(x)``):

    h  = x' A^T                        (N, r)
    y  = x W^T + b + h (s B)^T         (the last product accumulates into y: one GEMM, no add)

and, for the upstream gradient ``g = dL/dy``:

    dL/dx  = g W   (+ (g s B) A when x' is x)
    dL/dx' = (g s B) A                 (when x' = dropout(x): autograd takes it through dropout)
    dL/dA  = (g s B)^T x'
    dL/dB  = s g^T h

The module-by-module version (``base(x) + lora_B(lora_A(x)) * s``) does the same products plus,
per layer and step, a cast of the input for the LoRA branch (to the adapter's float32 and back
under autocast), a multiplication of the (N, d_out) update by ``s`` forward and backward, the
(N, d_out) sum, and the sum of the two input gradients: passes over activations as large as the
products' outputs, and temporaries that stay alive for the backward pass. Here ``s`` scales the
(d_out, r) matrix ``B`` instead, and the sums happen inside the products. Measured on CPU
(``bench/IDEAS.md``, whole runs on three bench shapes): peak memory 0.89-0.95x, loop time
1.05x on short examples and unchanged on the others.

Under autocast the products run in the autocast dtype (bf16): ``x``, ``W``, ``A`` and ``B`` are
cast once each, the gradients of ``A`` and ``B`` come back in their own dtype (float32), as
autocast's casts would give them. Layers that read the same tensor one after another (q, k and
v) share one cast of it: the nodes keep one bf16 copy of the attention input instead of three.
``fuse_linear`` runs every plain ``nn.Linear`` (full fine-tuning's q, k and v; ``W`` and ``b``
then train, ``dL/dW = g^T x`` and ``dL/db`` = column sums of ``g``) through the same node for
that sharing. The node keeps ``W`` itself, not its bf16 copy, and casts it again in the backward
pass: a cast per layer and step more, and no copy of every weight held from forward to backward.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from tunesmith.methods.fusing import hooked, install_forward

_last_cast: tuple[weakref.ref, int, torch.dtype, weakref.ref] | None = None


def _cast_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``, untracked by autograd; the same copy again while ``x`` (the same object,
    unmodified) is what the layers read, as q, k and v do. Only weak references are kept: a
    tensor later allocated where ``x`` was can never match, and the copy lives only as long as
    a node saves it (with no gradients, nothing does, and each layer casts for itself)."""
    global _last_cast
    if torch.compiler.is_compiling() or x.is_inference():  # no sharing to do / no version
        return x.detach().to(dtype)
    last = _last_cast
    if last is not None and last[0]() is x and last[1] == x._version and last[2] == dtype:
        cast = last[3]()
        if cast is not None:
            return cast
    with torch.no_grad():
        cast = x.to(dtype)
    _last_cast = (weakref.ref(x), x._version, dtype, weakref.ref(cast))
    return cast


class FusedLinear(torch.autograd.Function):
    """``y = x W^T + b (+ s (x' A^T) B^T)`` (see the module doc); ``W`` and ``b`` train or not,
    the LoRA branch is optional."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        x_cast: torch.Tensor | None,
        x_lora: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor | None,
        lora_b: torch.Tensor | None,
        scaling: float,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        x2 = x if x_cast is None else x_cast  # (N, d_in): callers pass 2-D rows
        x2 = x2.to(dtype)
        w = weight.to(dtype)
        y = x2 @ w.t() if bias is None else torch.addmm(bias.to(dtype), x2, w.t())
        xl = h = a = sb = None
        if lora_a is not None and lora_b is not None:
            xl = x2 if x_lora is None else x_lora.to(dtype)
            a, sb = lora_a.to(dtype), (lora_b * scaling).to(dtype)
            h = xl @ a.t()
            y.addmm_(h, sb.t())
        # The weight is kept as it is (no copy) and cast again in the backward pass: one (d_out,
        # d_in) cast more per step instead of a compute-dtype copy of every weight held from the
        # forward to the backward pass. The input is kept only if the weight trains.
        ctx.save_for_backward(x2 if weight.requires_grad else None, weight, xl, h, a, sb)
        ctx.scaling, ctx.separate, ctx.dtype = scaling, x_lora is not None, dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, weight, xl, h, a, sb = ctx.saved_tensors
        need = ctx.needs_input_grad
        w = weight.to(ctx.dtype)
        g = grad.to(ctx.dtype)
        gh = None if sb is None else g @ sb  # (N, r): the gradient at h
        dx = dx_lora = None
        if ctx.separate:
            dx_lora = gh @ a if need[2] else None
            dx = g @ w if need[0] else None
        elif need[0]:
            dx = g @ w
            if gh is not None:  # into the product's output: addmm(gh @ a, g, w) first copies gh @ a
                dx.addmm_(gh, a)
        dw = g.t() @ x2 if need[3] else None
        db = g.sum(0) if need[4] else None
        da = gh.t() @ xl if need[5] else None
        dbl = (g.t() @ h) * ctx.scaling if need[6] else None
        return dx, None, dx_lora, dw, db, da, dbl, None, None


def compute_dtype(device: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a fused node computes in for a ``dtype`` weight or input on ``device``: as
    autocast casts a matrix product's inputs, the autocast dtype for floating point other than
    float64 when autocast is on; else ``dtype``."""
    if torch.is_autocast_enabled(device) and dtype.is_floating_point and dtype != torch.float64:
        return torch.get_autocast_dtype(device)
    return dtype


def fused_linear(
    x: torch.Tensor,
    x_lora: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """``x W^T + b + s (x_lora A^T) B^T`` (``x_lora`` None: ``x``; no LoRA branch when ``lora_a``
    is None) as one autograd node, in ``compute_dtype``. The node works on 2-D rows and the
    result is reshaped outside it, so in-place operations on the output stay allowed."""
    device = x.device.type
    dtype = compute_dtype(device, weight.dtype)
    rows = x.reshape(-1, x.shape[-1])
    rows_lora = None if x_lora is None else x_lora.reshape(-1, x.shape[-1])
    cast = None if x.dtype == dtype else _cast_once(x, dtype).reshape(-1, x.shape[-1])
    with torch.autocast(device, enabled=False):
        y = FusedLinear.apply(rows, cast, rows_lora, weight, bias, lora_a, lora_b, scaling, dtype)
    return y.view(*x.shape[:-1], y.shape[-1])


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A plain ``nn.Linear`` as the node where autocast would cast its input or weight (q, k and
    v then share one copy of their input, and no copy of the weight is kept for the backward
    pass); its own forward everywhere else."""
    device = x.device.type
    if not torch.is_autocast_enabled(device) or hooked(self):
        return nn.Linear.forward(self, x)
    dtype = compute_dtype(device, self.weight.dtype)
    if x.dtype == dtype and self.weight.dtype == dtype:  # nothing to cast (or float64)
        return nn.Linear.forward(self, x)
    return fused_linear(x, None, self.weight, self.bias, None, None, 1.0)


def fuse_linear(model: nn.Module) -> int:
    """Make every plain ``nn.Linear`` of ``model`` but its output embedding (whose input the
    objectives handle themselves) run as the node under autocast; returns how many have it."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return install_forward(model, _linear_forward, lambda m: type(m) is nn.Linear and m is not head)
