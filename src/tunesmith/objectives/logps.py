"""Log-probabilities of target tokens without holding the whole (N, V) logit matrix.

For N supervised positions with final hidden states h_i (H,), an output head W (V, H) and
targets y_i, the log-probability of each target is

    log p_i = z_i[y_i] - logsumexp_v z_i[v],    z_i = W h_i.

Computed at once, z is N x V floats (at a 151,936-entry vocabulary and N = 2,000 that is 1.2 GB
in fp32, plus as much again for the softmax and for its gradient). ``chunked_logps`` walks the
rows in chunks of about ``chunk_elements / V`` rows, so at most one chunk's logits exist at a
time, in the forward and in the backward pass.

Gradients, with g_i = dL/d log p_i and p_i = softmax(z_i):

    dL/dz_i = g_i (onehot(y_i) - p_i)
    dL/dh_i = g_i (onehot(y_i) - p_i) W            (a per-row scale of D_i = (onehot(y_i) - p_i) W)
    dL/dW   = sum_i g_i (onehot(y_i) - p_i)^T h_i

D_i does not depend on g, so the forward pass computes it while the chunk's logits are at hand
(the same matrix products a normal backward pass would do) and the backward pass only scales
it. dL/dW does depend on g; when every g_i is the same (the SFT loss: a sum over tokens divided
by their count) it is that number times A = sum_i (onehot(y_i) - p_i)^T h_i, which the forward
pass accumulates too (only when W is trained). For any other g (DPO's per-sequence weights) the
backward pass recomputes each chunk's logits. This is the "fused linear cross-entropy" idea
(e.g. Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models",
arXiv 2411.09009) written here for log-probabilities, so one routine serves SFT and DPO.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 2**24
"""Logits held at once (rows x vocabulary): 64 MB in fp32."""


def _chunk_rows(vocab: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // vocab)


class _ChunkedLogps(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,  # (N, H)
        weight: torch.Tensor,  # (V, H)
        targets: torch.Tensor,  # (N,)
        rows: int,
        grad: bool,  # grad mode of the caller (inside forward it is always off)
    ) -> torch.Tensor:
        n = hidden.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        want_h, want_w = grad and ctx.needs_input_grad[0], grad and ctx.needs_input_grad[1]
        d_hidden = torch.empty_like(hidden) if want_h else None
        a_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        )
        for s in range(0, n, rows):
            h, y = hidden[s : s + rows], targets[s : s + rows]
            z = F.linear(h, weight).float()  # (r, V)
            lse[s : s + rows] = torch.logsumexp(z, dim=-1)
            out[s : s + rows] = z.gather(-1, y[:, None]).squeeze(-1) - lse[s : s + rows]
            if want_h or want_w:
                dz = torch.exp(z.sub_(lse[s : s + rows, None])).neg_()  # -p
                dz[torch.arange(len(y), device=y.device), y] += 1.0  # onehot - p
                dz = dz.to(h.dtype)
                if want_h:
                    d_hidden[s : s + rows] = dz @ weight.to(h.dtype)
                if want_w:
                    a_weight += (dz.t() @ h).float()
        ctx.rows = rows
        ctx.save_for_backward(hidden, weight, targets, lse, d_hidden, a_weight)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: torch.Tensor):  # type: ignore[override]
        hidden, weight, targets, lse, d_hidden, a_weight = ctx.saved_tensors
        grad_h = grad_w = None
        if d_hidden is not None:
            grad_h = d_hidden * g[:, None].to(d_hidden.dtype)
        if a_weight is not None:
            if bool((g == g[0]).all()):  # one weight for every token (SFT)
                grad_w = (a_weight * g[0]).to(weight.dtype)
            else:  # per-row weights (DPO): recompute the chunks
                grad_w = torch.zeros_like(weight, dtype=torch.float32)
                rows = ctx.rows
                for s in range(0, hidden.shape[0], rows):
                    h, y = hidden[s : s + rows], targets[s : s + rows]
                    z = F.linear(h, weight.to(h.dtype)).float()
                    dz = torch.exp(z.sub_(lse[s : s + rows, None])).neg_()
                    dz[torch.arange(len(y), device=y.device), y] += 1.0
                    dz.mul_(g[s : s + rows, None])
                    grad_w += dz.t() @ h.float()
                grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None


def chunked_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """log p(targets) (N,) under logits ``hidden @ weight.T``, in chunks of rows (see module doc)."""
    rows = _chunk_rows(weight.shape[0], chunk_elements)
    return _ChunkedLogps.apply(hidden, weight, targets, rows, torch.is_grad_enabled())


def full_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) (N,) from whole (N, V) logits, in fp32."""
    return -F.cross_entropy(logits.float(), targets, reduction="none")
