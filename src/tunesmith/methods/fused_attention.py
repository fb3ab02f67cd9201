"""Causal attention for short rows on CPU, as one autograd node of batched matrix products over
query blocks (after FlashAttention, Dao et al. 2022, arXiv 2205.14135, with whole key rows per
block instead of an online softmax, and ``P`` kept rather than recomputed for short rows).

For one head, queries ``Q`` (T, d), keys ``K`` and values ``V`` (T, d), scale ``c`` and the
causal mask ``M`` (``M_ij`` true where ``j <= i``, and the key is not padding):

    S = c Q K^T,   S_ij = -inf where not M_ij
    P = softmax(S) row by row
    O = P V

and, for the upstream gradient ``dO``:

    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - D) with D_i = sum_j P_ij dP_ij,
    dQ = c dS K,   dK = c dS^T Q

Since a block holds whole key rows, ``P`` is one fused softmax over them (maximum, exponential,
sum and division in one pass; no running maximum, no log-sum-exp), and ``dS`` is one fused
softmax-backward pass in the inputs' dtype whose ``D`` (equal to ``dO_i . O_i``, the flash
kernels' form) is summed in float32 from the same ``P`` and ``dP`` the block uses, so each row of
``dS`` sums to zero up to its rounding.

What the backward pass reads: ``Q``, ``K``, ``V``, the mask (when it is not row lengths) and, in
a bf16 call that trains on rows up to ``KEEP_TOKENS`` (512), ``P`` itself as the forward pass
rounded it for its product: ``B H T (T + 64)`` elements per layer (19 MB at 8 rows x 512 tokens
x 8 heads). Recomputing ``P`` costs the scores' float32 product again, the masking and the
softmax: about a quarter of the node's time (8 x 427 tokens: 30.8 vs 42.1 ms forward and
backward), 5-15% of a short-workload LoRA step, for ~115 MB more peak memory there. In float32
``P`` would take twice the bytes and, measured, saves nothing (short workload, SFT LoRA: 1.93 vs
1.98 s per step for 1.50 vs 1.25 GB peak), so float32 calls recompute it, as do longer rows,
where ``P`` grows with the square of the length. A row that holds a pair sharing its prompt (a
mask read as ``spans``) keeps ``P`` up to twice ``KEEP_TOKENS``: half as many rows, each about
twice as long, hold about the ``P`` of the pair's two rows (short DPO workload, measured: 1.17 GB
peak against 1.14 GB for separate rows, and a step ~15% faster than recomputing).

Rows that share a prompt (``batching.collate_shared``: the prompt once, then each response,
which may not see the one before) come as a mask that is causal with right padding except for
one rectangle per row, the second response's queries against the first response's keys; it is
read as row lengths plus that rectangle (``spans``), which is filled like the padding, so the
node computes those scores and masks them (about ``C R`` entries per row for responses of ``C``
and ``R`` tokens).

Why: PyTorch's CPU flash kernel works in key blocks of 512, so below ~512 tokens it computes
every query against every key, masked, with small per-head products. Here the queries of one
block of ``BLOCK`` positions meet only the keys up to the block's end (about half the work of
the full square on long rows), the query heads that share a key/value head (grouped-query
attention) are stacked into one product, and all rows and heads go through one batched product
per step. Scores and the softmax are computed in float32 (float64 for float64 inputs), ``P`` and
``dS`` are rounded to the inputs' dtype (bf16) for their products, as the flash kernel does;
``P`` is normalised before its product, and ``dP`` is rounded to bf16 by its product. Against
float64 attention on the same bf16 inputs (logits of spread 1 to 16), the output's error is
1.7-2.3e-3 of its norm and the gradients' 2.6-5.1e-3 (the flash kernel: 1.4-2.0e-3 and
2.5-7.0e-3, its gradients' growing with the logits).

Measured (``bench/IDEAS.md``), forward and backward against the flash kernel, bf16, 2 cores,
8 heads over 2 KV heads x 64: 29 vs 70 ms at 8 rows x 427 tokens (2.4x), 1.9-2.8x from 24 to 512
tokens where ``P`` is kept, 1.3-1.6x from 640 to 1,024 where it is recomputed; rows past 1,024
keep the flash kernel. In float32 the flash kernel is faster or as fast on short rows (16 rows x
24 tokens: 0.3 vs 0.5 ms; 16 x 64: 1.4 vs 1.3; 8 x 128: 6.8 vs 5.8) and clearly slower from ~256
tokens (27.7 vs 18.1 ms at 8 x 256, 73 vs 47 ms at 8 x 427), so float32 work takes the node from
``DTYPES[torch.float32]`` = 256 tokens, bf16 work from 2.

``fuse_attention`` makes this the attention of a model that uses transformers' ``sdpa``: each
call takes this node where it applies (CPU, bf16 or long enough float32 rows, causal
self-attention without a cache, no dropout, no soft-capping or attention sinks, no sliding window
shorter than the row, a boolean mask that is causal, rows up to ``MAX_TOKENS``), and ``sdpa``
everywhere else. Encoders (no module declares ``is_causal``) keep ``sdpa``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from tunesmith.methods.fused_lora import compute_dtype

NAME = "tunesmith_sdpa"  # the name it is registered under with transformers
BLOCK = 64  # query positions per block
MAX_TOKENS = 1024  # longer rows: the flash kernel is faster
# the dtypes the node takes, each with the shortest row it takes (module doc)
DTYPES = {torch.bfloat16: 2, torch.float32: 256}
# per dtype, the longest row whose P is kept for the backward pass; others recompute it (module doc)
KEEP_TOKENS = {torch.bfloat16: 512}


def _blocks(length: int) -> list[tuple[int, int]]:
    return [(s, min(s + BLOCK, length)) for s in range(0, length, BLOCK)]


def _causal_bias(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(BLOCK, BLOCK): 0 on and below the diagonal, -inf above; its top-left (n, n) corner, added
    to a block's diagonal scores, masks the causal triangle (several times faster than
    ``masked_fill_`` on the strided block). Built once per call, not cached across calls (a
    tensor kept from a call under a fake or meta tensor mode would poison later calls). A
    non-finite key makes the earlier rows of its diagonal block NaN too (``inf - inf``); its own
    row and every later one are NaN with any kernel, and so is the loss."""
    upper = torch.ones(BLOCK, BLOCK, dtype=torch.bool, device=device).triu_(1)
    return torch.zeros(BLOCK, BLOCK, dtype=dtype, device=device).masked_fill_(upper, float("-inf"))


Span = tuple[int, int, int, int, int]  # (row, first query, end query, first key, end key)


def _probability_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    blocked: torch.Tensor | None,
    lengths: tuple[int, ...] | None,
    scale: float,
    spans: tuple[Span, ...] | None = None,
) -> Iterator[torch.Tensor]:
    """``P = softmax(c Q K^T)`` for each query block of ``_blocks`` in turn, rounded to the
    inputs' dtype for its products, (B*Hkv, g*n, e). The scores are computed in float32 (float64
    for float64 inputs) from ``c Q`` and ``K`` cast once, -inf where masked (the causal triangle
    of the block's diagonal part, the keys at or past each row's ``lengths`` (right padding) and
    the rectangles of ``spans`` (a row's queries ``[q0, q1)`` that may not see its keys ``[k0,
    k1)``, with ``k1 <= q0``), or else ``blocked``, True where forbidden), then one fused softmax
    pass (maximum, exponential, sum and division); rows that see no key are set to zero."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    acc = torch.promote_types(q.dtype, torch.float32)
    qs = (q.to(acc) * scale).reshape(b * hkv, g, t, d)
    ks = k.to(acc).reshape(b * hkv, t, d)
    empty, bias = _empty_rows(blocked), _causal_bias(acc, q.device)
    for s, e in _blocks(t):
        n = e - s
        scores = torch.bmm(qs[:, :, s:e].reshape(b * hkv, g * n, d), ks[:, :e].transpose(1, 2))
        rows = scores.view(b, hkv, g, n, e)
        if blocked is None:
            rows[..., s:e].add_(bias[:n, :n])
            for row, length in enumerate(lengths or ()):  # only the padded keys' columns
                if length < e:
                    (rows if len(lengths) == 1 else rows[row])[..., length:].fill_(float("-inf"))
            for row, q0, q1, k0, k1 in spans or ():  # only the hidden rectangle's entries
                first, end = max(q0, s), min(q1, e)
                if first < end:
                    rows[row][..., first - s : end - s, k0:k1].fill_(float("-inf"))
        else:  # (B or 1, 1, n, e) -> over (B, Hkv, g, n, e)
            rows.masked_fill_(blocked[:, :, s:e, :e].unsqueeze(2), float("-inf"))
        p = torch.softmax(scores, -1)
        if empty is not None:
            p.view(b, hkv, g, n, e).masked_fill_(empty[:, :, s:e].unsqueeze(2), 0.0)
        yield p.to(q.dtype)


class BlockCausalAttention(torch.autograd.Function):
    """Causal attention over query blocks (see the module doc). ``q`` (B, H, T, d), ``k`` and
    ``v`` (B, Hkv, T, d); the mask is ``blocked``, bool (B or 1, 1, T, T) True where a query may
    not see a key, or else causal with the keys at or past ``lengths[b]`` (one per row, or one for
    all, each at least 1) hidden, and with ``lengths`` the rectangles of ``spans`` too (rows that
    share a prompt), or causal alone (both None); ``keep``: keep ``P`` (in the inputs' dtype)
    for the backward pass instead of recomputing it. Returns (B, T, H, d)."""

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        blocked: torch.Tensor | None,
        lengths: tuple[int, ...] | None,
        scale: float,
        keep: bool = True,
        spans: tuple[Span, ...] | None = None,
    ) -> torch.Tensor:
        b, h, t, d = q.shape
        hkv = k.shape[1]
        g = h // hkv
        vs = v.contiguous().reshape(b * hkv, t, d)
        out = q.new_empty(b, t, h, d)  # the layout the caller reads: no copy after
        o_view = out.view(b, t, hkv, g, d).permute(0, 2, 3, 1, 4)
        kept = []
        blocks = _probability_blocks(q, k, blocked, lengths, scale, spans)
        for (s, e), p in zip(_blocks(t), blocks):
            o_view[:, :, :, s:e] = torch.bmm(p, vs[:, :e]).view(b, hkv, g, e - s, d)
            if keep:
                kept.append(p)
        ctx.save_for_backward(q, k, vs, blocked, *kept)
        ctx.scale, ctx.lengths, ctx.spans = scale, lengths, spans
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, vs, blocked, *kept = ctx.saved_tensors
        scale = ctx.scale
        b, h, t, d = q.shape
        hkv = k.shape[1]
        g = h // hkv
        acc = torch.promote_types(q.dtype, torch.float32)
        probabilities = kept or _probability_blocks(q, k, blocked, ctx.lengths, scale, ctx.spans)
        q_low = q.reshape(b * hkv, g, t, d)
        k_low = k.reshape(b * hkv, t, d)
        grad = grad.to(q.dtype)
        d_out = grad.view(b, t, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b * hkv, g, t, d)
        dq = torch.empty(b * hkv, g, t, d, dtype=q.dtype, device=q.device)
        dk = torch.zeros(b * hkv, t, d, dtype=acc, device=q.device)
        dv = torch.zeros(b * hkv, t, d, dtype=acc, device=q.device)
        for (s, e), p in zip(_blocks(t), probabilities):
            n = e - s
            do_block = d_out[:, :, s:e].reshape(b * hkv, g * n, d)
            dv[:, :e] += torch.bmm(p.transpose(1, 2), do_block)
            dp = torch.bmm(do_block, vs[:, :e].transpose(1, 2))
            # dS = P * (dP - D), D_i = sum_j P_ij dP_ij: one fused pass, float32 inside
            ds = torch._softmax_backward_data(dp, p, -1, q.dtype)
            dq[:, :, s:e] = torch.bmm(ds, k_low[:, :e]).view(b * hkv, g, n, d)
            dk[:, :e] += torch.bmm(ds.transpose(1, 2), q_low[:, :, s:e].reshape(b * hkv, g * n, d))
        dq = dq.mul_(scale).view(b, h, t, d)
        dk = (dk * scale).to(k.dtype).view(b, hkv, t, d)
        return dq, dk, dv.to(k.dtype).view(b, hkv, t, d), None, None, None, None, None


def _empty_rows(blocked: torch.Tensor | None) -> torch.Tensor | None:
    """The query rows that see no key at all (left padding), (B or 1, 1, T, 1), or None if
    there are none: their softmax is 0/0, and they are set to zero."""
    if blocked is None:
        return None
    empty = blocked.all(-1, keepdim=True)
    return empty if bool(empty.any()) else None


_NodeMask = tuple[bool, torch.Tensor | None, tuple[int, ...] | None, tuple[Span, ...] | None]
_last_mask: tuple[weakref.ref, tuple[int, int], _NodeMask] | None = None


def _node_mask(mask: torch.Tensor | None, length: int) -> _NodeMask:
    """(whether the node can take ``mask``, the mask as True-where-forbidden, or as the lengths
    of right-padded rows when it is exactly causal with padding keys hidden: then only the
    padded keys' columns are filled, not the whole block). The model hands every layer the same
    mask: it is read once (a weak reference and its version tell it again; like any version
    check, it does not see a change made through ``.data``, and transformers builds a new mask
    for every forward)."""
    global _last_mask
    if mask is None:
        return True, None, None, None
    last = _last_mask
    versioned = not mask.is_inference()  # inference tensors have no version to check
    if versioned and last is not None and last[0]() is mask and last[1] == (mask._version, length):
        return last[2]
    result = _read_mask(mask, length)
    if versioned:
        _last_mask = (weakref.ref(mask), (mask._version, length), result)
    return result


def _read_mask(mask: torch.Tensor, length: int) -> _NodeMask:
    """``_node_mask`` without the memory of the last mask."""
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return False, None, None, None
    if tuple(mask.shape[-2:]) != (length, length):
        return False, None, None, None
    if mask.triu(1).any():  # a later key is visible: not causal, blocks would skip it
        return False, None, None, None
    seen = mask[:, 0]
    lengths = seen.any(-2).sum(-1)  # the real keys: those some query sees
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril_()
    real = torch.arange(length, device=mask.device) < lengths[:, None]
    expected = causal & real[:, None, :]
    # (an empty row keeps the mask: no key at all)
    if bool(lengths.all()) and not bool((seen & ~expected).any()):
        hidden = expected & ~seen
        spans = _rectangles(hidden) if bool(hidden.any()) else ()
        if spans is not None:
            return True, None, tuple(lengths.tolist()), spans or None
    return True, ~mask, None, None


def _rectangles(hidden: torch.Tensor) -> tuple[Span, ...] | None:
    """``hidden`` (B, T, T) as at most one rectangle per row, each left of its queries' diagonal
    (rows that share a prompt: a response's queries may not see the responses before it), or
    None if it is not of that form."""
    spans = []
    for row in range(hidden.shape[0]):
        h = hidden[row]
        queries, keys = h.any(-1).nonzero()[:, 0], h.any(-2).nonzero()[:, 0]
        if len(queries) == 0:
            continue
        q0, q1, k0, k1 = int(queries[0]), int(queries[-1]) + 1, int(keys[0]), int(keys[-1]) + 1
        if k1 > q0 or int(h.sum()) != (q1 - q0) * (k1 - k0):
            return None
        spans.append((row, q0, q1, k0, k1))
    return tuple(spans)


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: this node where it applies, ``sdpa``
    elsewhere (see the module doc)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # as SDPA under autocast: all three in the autocast dtype (RoPE leaves q and k in float32)
    dtype = compute_dtype("cpu", query.dtype)
    ok = (
        causal
        and DTYPES.get(dtype, math.inf) <= length <= MAX_TOKENS
        and query.device.type == "cpu"
        and not torch.compiler.is_compiling()  # a graph per row length: sdpa's shapes stay dynamic
        and not (dropout and module.training)
        and key.shape[2] == length
        and query.shape[1] % key.shape[1] == 0
        and query.shape[-1] == key.shape[-1] == value.shape[-1]
        and (torch.is_autocast_enabled("cpu") or query.dtype == key.dtype == value.dtype)
        and all(kwargs.get(k) is None for k in ("softcap", "s_aux"))
        and (kwargs.get("sliding_window") or length) >= length  # a window as long as the row
        and not kwargs.get("output_attentions", False)
        and kwargs.get("position_bias") is None
    )
    if ok:
        ok, blocked, lengths, spans = _node_mask(attention_mask, length)
    if not ok:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    with torch.autocast("cpu", enabled=False):
        query, key, value = (t.to(dtype) for t in (query, key, value))
        per_row = 2 if spans else 1  # sequences a row holds (module doc)
        keep = torch.is_grad_enabled() and length <= per_row * KEEP_TOKENS.get(dtype, 0)
        out = BlockCausalAttention.apply(query, key, value, blocked, lengths, scale, keep, spans)
    return out, None


def register() -> None:
    """Register the attention function and its mask (``sdpa``'s) with transformers, once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def fuse_attention(model: nn.Module) -> bool:
    """Make the node the attention of ``model`` (the transformers model in it, under any wrapper)
    where that uses ``sdpa``: its attention calls then take the node where it applies, ``sdpa``
    elsewhere. Returns whether the model has it. The saved config is unaffected (transformers
    does not write the attention implementation into ``config.json``)."""
    root = next((m for m in model.modules() if hasattr(m, "set_attn_implementation")), None)
    current = getattr(getattr(root, "config", None), "_attn_implementation", None)
    if current == NAME:
        return True
    if root is None or current != "sdpa":
        return False
    if not any(getattr(m, "is_causal", False) is True for m in root.modules()):
        return False  # an encoder (BERT): no causal attention to take over
    register()
    root.set_attn_implementation(NAME)
    return root.config._attn_implementation == NAME
