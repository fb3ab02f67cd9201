"""One autograd node for a gated-SiLU (SwiGLU) MLP whose three projections carry LoRA over frozen
linear layers: the layout of Llama, Qwen2/3, Mistral and most decoders since (Shazeer 2020,
"GLU Variants Improve Transformer", arXiv 2002.05202).

The MLP computes ``y = down(silu(gate(x)) * up(x))``. With each projection ``p`` a frozen weight
``W_p`` (and bias ``b_p``) plus a LoRA update ``s_p B_p A_p`` (Hu et al. 2021, arXiv 2106.09685),
for ``x`` of shape (N, d) and inner width I:

    [a | u] = x [W_g; W_u]^T + [b_g | b_u] + (x [A_g; A_u]^T) diag(s_g B_g, s_u B_u)^T   (N, 2I)
    h       = silu(a) * u                                                               (N, I)
    y       = h W_d^T + b_d + s_d (h A_d^T) B_d^T                                       (N, d)

Gate and up share one product with the weights stacked (and their LoRA updates as one
block-diagonal product), and only ``x``, ``[a | u]`` and the rank-r products are kept for the
backward pass; ``h`` is recomputed there (elementwise, no product). For ``g = dL/dy``:

    dL/dh   = g W_d + (g s_d B_d) A_d
    dL/dA_d = (g s_d B_d)^T h,          dL/dB_d = s_d g^T (h A_d^T)
    dL/da   = silu'(a) * u * dL/dh,     dL/du   = silu(a) * dL/dh
    dL/dx   = [da | du] [W_g; W_u] + ([da | du] diag(s_g B_g, s_u B_u)) [A_g; A_u]

and the gate's and up's A and B gradients as for ``down``. Module by module, autograd keeps
two casts of ``x``, ``a``, ``u``, ``silu(a)`` and ``h``: two (N, d) and four (N, I) tensors per
layer. Here one (N, d) and two (N, I): at the usual I ~ 2.75 d, 0.53x the MLP's activation
memory, which is most of a decoder layer's.

``fuse_swiglu`` installs it on every MLP of that layout whose projections a LoRA wraps; at each
call the MLP falls back to its own forward unless all three are enabled LoRA layers over frozen
plain ``nn.Linear`` layers with no dropout active (several adapters on one base, a disabled
adapter, a merged model and LoRA dropout all take the module-by-module path).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _stack(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``torch.cat(tensors)`` cast to ``dtype`` in one pass (no float32 copy first)."""
    out = torch.empty(
        (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:]),
        dtype=dtype,
        device=tensors[0].device,
    )
    row = 0
    for t in tensors:
        out[row : row + t.shape[0]].copy_(t)
        row += t.shape[0]
    return out


class FusedSwiGLULoRA(torch.autograd.Function):
    """The LoRA SwiGLU MLP as one node (see the module doc for the maths)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        w_gate: torch.Tensor,
        b_gate: torch.Tensor | None,
        a_gate: torch.Tensor,
        lb_gate: torch.Tensor,
        w_up: torch.Tensor,
        b_up: torch.Tensor | None,
        a_up: torch.Tensor,
        lb_up: torch.Tensor,
        w_down: torch.Tensor,
        b_down: torch.Tensor | None,
        a_down: torch.Tensor,
        lb_down: torch.Tensor,
        scales: tuple[float, float, float],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        s_gate, s_up, s_down = scales
        inner = w_gate.shape[0]
        x2 = x.to(dtype)  # (N, d)
        w_gu = _stack([w_gate, w_up], dtype)  # (2I, d)
        a_gu = _stack([a_gate, a_up], dtype)  # (2r, d)
        sb_gu = torch.block_diag(lb_gate * s_gate, lb_up * s_up).to(dtype)  # (2I, 2r)
        h_gu = x2 @ a_gu.t()  # (N, 2r)
        if b_gate is None and b_up is None:
            gu = x2 @ w_gu.t()
        else:
            zeros = torch.zeros(inner, dtype=dtype, device=x.device)
            bias = torch.cat([zeros if b is None else b.to(dtype) for b in (b_gate, b_up)])
            gu = torch.addmm(bias, x2, w_gu.t())
        gu.addmm_(h_gu, sb_gu.t())  # (N, 2I) = [a | u]
        h = F.silu(gu[:, :inner])
        h.mul_(gu[:, inner:])
        w_d, a_d = w_down.to(dtype), a_down.to(dtype)
        sb_d = (lb_down * s_down).to(dtype)
        h_d = h @ a_d.t()  # (N, r)
        y = h @ w_d.t() if b_down is None else torch.addmm(b_down.to(dtype), h, w_d.t())
        y.addmm_(h_d, sb_d.t())
        ctx.save_for_backward(x2, gu, h_gu, h_d, w_gu, a_gu, sb_gu, w_d, a_d, sb_d)
        ctx.scales, ctx.inner, ctx.rank = scales, inner, a_gate.shape[0]
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, gu, h_gu, h_d, w_gu, a_gu, sb_gu, w_d, a_d, sb_d = ctx.saved_tensors
        s_gate, s_up, s_down = ctx.scales
        inner, rank = ctx.inner, ctx.rank
        need = ctx.needs_input_grad
        g = grad.to(w_d.dtype)
        a, u = gu[:, :inner], gu[:, inner:]
        g_hd = g @ sb_d  # (N, r): the gradient at h A_d^T
        silu_a = F.silu(a)
        if need[11] or need[12]:
            h = silu_a * u
            da_down = g_hd.t() @ h if need[11] else None
            del h
        else:
            da_down = None
        db_down = (g.t() @ h_d) * s_down if need[12] else None
        dh = torch.addmm(g_hd @ a_d, g, w_d)  # (N, I)
        d_gu = torch.empty_like(gu)
        torch.ops.aten.silu_backward.grad_input(dh * u, a, grad_input=d_gu[:, :inner])
        torch.mul(dh, silu_a, out=d_gu[:, inner:])
        del dh, silu_a
        g_h = d_gu @ sb_gu  # (N, 2r): the gradient at x [A_g; A_u]^T
        dx = torch.addmm(g_h @ a_gu, d_gu, w_gu) if need[0] else None
        da_gu = g_h.t() @ x2 if need[3] or need[7] else None  # (2r, d)
        db_gate = (d_gu[:, :inner].t() @ h_gu[:, :rank]) * s_gate if need[4] else None
        db_up = (d_gu[:, inner:].t() @ h_gu[:, rank:]) * s_up if need[8] else None
        return (
            dx,
            None,
            None,
            None if da_gu is None or not need[3] else da_gu[:rank],
            db_gate,
            None,
            None,
            None if da_gu is None or not need[7] else da_gu[rank:],
            db_up,
            None,
            None,
            da_down,
            db_down,
            None,
            None,
        )


def _fusable(layer: nn.Module, training: bool) -> bool:
    """A LoRA layer (duck-typed: ``base_layer``, ``lora_A``, ``lora_B``) that is enabled, over a
    frozen plain ``nn.Linear``, with no dropout to apply."""
    base = getattr(layer, "base_layer", None)
    return (
        type(base) is nn.Linear
        and getattr(layer, "enabled", False)
        and not base.weight.requires_grad
        and (base.bias is None or not base.bias.requires_grad)
        and (not training or isinstance(layer.dropout, nn.Identity))
    )


def _fused_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    layers = [getattr(self, p) for p in PROJECTIONS]
    if not all(_fusable(m, m.training) for m in layers):
        return type(self).forward(self, x)
    device = x.device.type
    on = torch.is_autocast_enabled(device)
    gate = layers[0]
    if not on and gate.base_layer.weight.dtype != gate.lora_A.weight.dtype:
        return type(self).forward(self, x)  # a low-precision base without autocast
    dtype = torch.get_autocast_dtype(device) if on else gate.base_layer.weight.dtype
    args: list[Any] = [x.reshape(-1, x.shape[-1])]
    for m in layers:
        args += [m.base_layer.weight, m.base_layer.bias, m.lora_A.weight, m.lora_B.weight]
    with torch.autocast(device, enabled=False):
        y = FusedSwiGLULoRA.apply(*args, tuple(m.scaling for m in layers), dtype)
    return y.view(*x.shape[:-1], y.shape[-1])


def _plain_swiglu(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """A probe input and what ``down(silu(gate(x)) * up(x))`` gives on it."""
    gate, up, down = (getattr(mlp, p) for p in PROJECTIONS)
    w = gate.weight
    rng = torch.Generator(w.device).manual_seed(0)  # the global generator stays untouched
    probe = torch.randn(2, w.shape[1], dtype=w.dtype, device=w.device, generator=rng)
    with torch.no_grad():
        return probe, down(F.silu(gate(probe)) * up(probe))


def is_swiglu(mlp: nn.Module) -> bool:
    """Whether ``mlp`` computes ``down_proj(silu(gate_proj(x)) * up_proj(x))``: it has the three
    projections and a SiLU ``act_fn``, and its own forward agrees with that formula on a probe
    (so an MLP of the same names that computes something else is left alone)."""
    if not all(hasattr(mlp, p) for p in PROJECTIONS) or not hasattr(mlp, "act_fn"):
        return False
    if not isinstance(mlp.act_fn, nn.SiLU) and type(mlp.act_fn).__name__ != "SiLUActivation":
        return False
    if any(p.is_meta for p in mlp.parameters()):
        return False
    probe, expected = _plain_swiglu(mlp)
    with torch.no_grad():
        got = type(mlp).forward(mlp, probe)
    return torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


def fuse_swiglu(model: nn.Module) -> int:
    """Install the one-node forward on every SwiGLU MLP whose three projections a LoRA wraps;
    returns how many MLPs it fused."""
    count = 0
    for module in model.modules():
        if (
            isinstance(module.forward, types.MethodType)
            and module.forward.__func__ is _fused_forward
        ):
            count += 1
            continue
        if all(hasattr(getattr(module, p, None), "lora_A") for p in PROJECTIONS) and is_swiglu(
            module
        ):
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
