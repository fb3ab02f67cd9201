"""One autograd node for a gated-SiLU (SwiGLU) MLP: the layout of Llama, Qwen2/3, Mistral and most
decoders since (Shazeer 2020, "GLU Variants Improve Transformer", arXiv 2002.05202).

The MLP computes ``y = down(silu(gate(x)) * up(x))``. Each projection ``p`` is a weight ``W_p``
(and bias ``b_p``), trainable or frozen, optionally plus a LoRA update ``s_p B_p A_p`` over a
frozen ``W_p`` (Hu et al. 2021, arXiv 2106.09685). For ``x`` of shape (N, d) and inner width I:

    a = x W_g^T + b_g (+ s_g (x A_g^T) B_g^T)          (N, I), and u alike with W_u, A_u, B_u
    h = silu(a) * u                                    (N, I)
    y = h W_d^T + b_d (+ s_d (h A_d^T) B_d^T)          (N, d)

Each LoRA update is added inside its projection's product, and only ``x``, ``a``, ``u`` and the
rank-r products are kept for the backward pass; ``h`` is recomputed there (elementwise, no
product). For ``g = dL/dy``:

    dL/dh   = g W_d (+ (g s_d B_d) A_d)
    dL/da   = silu'(a) * u * dL/dh,     dL/du = silu(a) * dL/dh
    dL/dx   = da W_g + du W_u (+ (da s_g B_g) A_g + (du s_u B_u) A_u)
    dL/dW_d = g^T h,   dL/dW_g = da^T x,   dL/dW_u = du^T x,   dL/db = column sums of g, da, du
    dL/dA_d = (g s_d B_d)^T h,   dL/dB_d = s_d g^T (h A_d^T)   (gate and up alike)

each computed only when that input needs it. Module by module, autograd keeps two casts of
``x`` (under autocast), ``a``, ``u``, ``silu(a)`` and ``h``: two (N, d) and four (N, I)
tensors per layer. Here one (N, d) and two (N, I): at the usual I ~ 2.75 d, about half the MLP's
activation memory, which is most of a decoder layer's.

``fuse_swiglu`` installs it on every MLP of that layout (checked on a probe input, not by class
name). At each call the MLP falls back to its own forward unless its three projections are all
plain ``nn.Linear`` layers or all enabled LoRA layers over frozen plain ``nn.Linear`` layers with
no dropout active (several adapters on one base, a disabled adapter, other wrappers and LoRA
dropout take the module-by-module path).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from tunesmith.methods.fused_lora import compute_dtype
from tunesmith.methods.fusing import agrees, hooked, install_forward
from tunesmith.methods.lora import LoRALinear

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class FusedSwiGLU(torch.autograd.Function):
    """The SwiGLU MLP as one node, LoRA optional (see the module doc for the maths)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        w_gate: torch.Tensor,
        b_gate: torch.Tensor | None,
        w_up: torch.Tensor,
        b_up: torch.Tensor | None,
        w_down: torch.Tensor,
        b_down: torch.Tensor | None,
        a_gate: torch.Tensor | None,
        lb_gate: torch.Tensor | None,
        a_up: torch.Tensor | None,
        lb_up: torch.Tensor | None,
        a_down: torch.Tensor | None,
        lb_down: torch.Tensor | None,
        scales: tuple[float, float, float],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        x2 = x.to(dtype)  # (N, d)
        lora = a_gate is not None
        saved: list[torch.Tensor] = []
        outs = []  # a, u (N, I) and y (N, d), each with its LoRA update added in its last GEMM
        for inp, w, b, a, lb, s in (
            (x2, w_gate, b_gate, a_gate, lb_gate, scales[0]),
            (x2, w_up, b_up, a_up, lb_up, scales[1]),
            (None, w_down, b_down, a_down, lb_down, scales[2]),
        ):
            if inp is None:  # down reads h = silu(a) * u
                inp = F.silu(outs[0])
                inp.mul_(outs[1])
            w2 = w.to(dtype)
            out = inp @ w2.t() if b is None else torch.addmm(b.to(dtype), inp, w2.t())
            saved.append(w)  # cast again in the backward pass rather than kept as a copy
            if lora:
                a2, sb = a.to(dtype), (lb * s).to(dtype)
                h_lora = inp @ a2.t()  # (N, r)
                out.addmm_(h_lora, sb.t())
                saved += [a2, sb, h_lora]
            outs.append(out)
        ctx.save_for_backward(x2, outs[0], outs[1], *saved)
        ctx.scales, ctx.lora, ctx.dtype = scales, lora, dtype
        return outs[2]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, a, u, *saved = ctx.saved_tensors
        need, lora = ctx.needs_input_grad, ctx.lora
        per = 4 if lora else 1  # saved tensors per projection: W (and A, s B, x A^T)
        (w_g, *l_g), (w_u, *l_u), (w_d, *l_d) = (saved[i : i + per] for i in (0, per, 2 * per))
        w_g, w_u, w_d = (w.to(ctx.dtype) for w in (w_g, w_u, w_d))
        grads: list[torch.Tensor | None] = [None] * 15
        g = grad.to(w_d.dtype)
        silu_a = F.silu(a)
        dh = g @ w_d  # (N, I)
        if lora:
            a_d, sb_d, h_d = l_d
            g_hd = g @ sb_d  # (N, r): the gradient at h A_d^T
            dh.addmm_(g_hd, a_d)
            if need[12]:
                grads[12] = (g.t() @ h_d) * ctx.scales[2]
        if need[5] or need[11]:
            h = silu_a * u
            grads[5] = g.t() @ h if need[5] else None
            grads[11] = g_hd.t() @ h if need[11] else None
            del h
        if need[6]:
            grads[6] = g.sum(0)
        d_a = torch.ops.aten.silu_backward(dh * u, a)
        d_u = dh.mul_(silu_a)
        del silu_a
        dx = None
        for d_out, w, lora_saved, s, (iw, ib, ia, ilb) in (
            (d_a, w_g, l_g, ctx.scales[0], (1, 2, 7, 8)),
            (d_u, w_u, l_u, ctx.scales[1], (3, 4, 9, 10)),
        ):
            if need[0]:
                dx = d_out @ w if dx is None else dx.addmm_(d_out, w)
            grads[iw] = d_out.t() @ x2 if need[iw] else None
            grads[ib] = d_out.sum(0) if need[ib] else None
            if lora:
                a_l, sb, h_l = lora_saved
                g_h = d_out @ sb  # (N, r)
                if need[0]:
                    dx.addmm_(g_h, a_l)
                grads[ia] = g_h.t() @ x2 if need[ia] else None
                grads[ilb] = (d_out.t() @ h_l) * s if need[ilb] else None
        grads[0] = dx
        return tuple(grads)


def _fusable(layer: nn.Module, device: str) -> bool:
    """An enabled LoRA layer that a fused node can compute, with no dropout to apply."""
    return (
        isinstance(layer, LoRALinear)
        and layer.enabled
        and layer.fusable(device)
        and (not layer.training or isinstance(layer.dropout, nn.Identity))
    )


def _node_inputs(mlp: nn.Module, x: torch.Tensor) -> tuple[list, list, tuple, torch.dtype] | None:
    """The node's inputs for ``mlp`` (base weights and biases, LoRA matrices or Nones, scales,
    compute dtype), or None where the module path must run."""
    layers = [getattr(mlp, p) for p in PROJECTIONS]
    device = x.device.type
    if any(hooked(m) for m in layers):
        return None
    if all(type(m) is nn.Linear for m in layers):
        if not torch.is_autocast_enabled(device) and any(m.weight.dtype != x.dtype for m in layers):
            return None  # the module path says what is wrong
        bases, lora = layers, [None] * 6
    elif all(_fusable(m, device) for m in layers):
        bases = [m.base_layer for m in layers]
        lora = [t for m in layers for t in (m.lora_A.weight, m.lora_B.weight)]
    else:
        return None
    base = [t for m in bases for t in (m.weight, m.bias)]
    scales = tuple(float(getattr(m, "scaling", 1.0)) for m in layers)
    return base, lora, scales, compute_dtype(device, bases[0].weight.dtype)


def _fused_forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    inputs = None if args or kwargs else _node_inputs(self, x)
    if inputs is None:
        return type(self).forward(self, x, *args, **kwargs)
    base, lora, scales, dtype = inputs
    with torch.autocast(x.device.type, enabled=False):
        y = FusedSwiGLU.apply(x.reshape(-1, x.shape[-1]), *base, *lora, scales, dtype)
    return y.view(*x.shape[:-1], y.shape[-1])


def is_swiglu(mlp: nn.Module) -> bool:
    """Whether ``mlp`` computes ``down_proj(silu(gate_proj(x)) * up_proj(x))``: it has the three
    projections and a SiLU ``act_fn``, and its own forward agrees with that formula on a probe
    (so an MLP of the same names that computes something else, or adds dropout, is left alone)."""
    if not all(hasattr(mlp, p) for p in PROJECTIONS) or not hasattr(mlp, "act_fn"):
        return False
    if not isinstance(mlp.act_fn, nn.SiLU) and type(mlp.act_fn).__name__ != "SiLUActivation":
        return False
    gate, up, down = (getattr(mlp, p) for p in PROJECTIONS)
    return agrees(mlp, lambda x: down(F.silu(gate(x)) * up(x)), gate.weight.shape[1])


def fuse_swiglu(model: nn.Module) -> int:
    """Install the one-node forward on every SwiGLU MLP of ``model``; returns how many MLPs have
    it (those fused before included)."""
    return install_forward(model, _fused_forward, is_swiglu)
