"""Rollouts for online RL: sample responses from the current policy, and score given responses.

``rollout`` is a plain sampling loop over the root model's forward with the key/value cache:

    step 0:  logits, cache = model(prompt ids, mask, positions)           # (B, P) left-padded
    step k:  logits, cache = model(y_k, mask, position P_b + k, cache)    # one token per row

so input-side methods (prefix, prompt) act exactly as in training: they hook the backbone and the
cache, and see the same attention mask and positions a full forward pass gives them. Positions
count real tokens only (``cumsum(mask) - 1``), so a left-padded prompt is computed as it would be
alone.

Sampling draws its randomness as one uniform number per row and step from a ``torch.Generator``
on the CPU, and inverts the (temperature-scaled, top-p-filtered) distribution's CDF with it. The
numbers drawn never depend on the model's outputs or the device, so a rollout is reproducible from
the generator's state alone (``generator.get_state()``: save it with the checkpoint for an exact
resume), and the cached and uncached loops draw the same tokens.

A response ends at the first end token (``end_token_ids(tokenizer)``), which belongs to the
response (it is what teaches the policy to stop); positions after it are padding, masked out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tunesmith.data.dataset import end_token_ids
from tunesmith.methods.virtual_tokens import cache_argument


@dataclass
class Rollout:
    """B sampled responses and what the update needs of them.

    ``prompt_ids`` (B, P) is left-padded (``prompt_mask`` 0 on padding); ``response_ids`` (B, R)
    is right-padded with the pad id after each response's end token; ``response_mask`` (B, R) is 1
    up to and including the end token (or on all R tokens of a response that never ended).
    ``logps`` (B, R) are log pi(y_t | x, y_<t) of the sampled tokens under the policy's
    distribution at ``temperature`` (before top-p filtering; temperature 1 for greedy rollouts),
    0 off the mask: what ``response_logps`` computes in one forward pass; ``ended`` (B,) whether the response produced an end token,
    ``completions`` the decoded responses without special tokens.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    logps: torch.Tensor | None
    ended: torch.Tensor
    completions: list[str]

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)  # (B, P + R)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask.to(self.prompt_mask.dtype)], dim=1)

    def select(self, rows: torch.Tensor | list[int]) -> Rollout:
        """The rollout of some rows only (a mini-batch), in the order given."""
        idx = torch.as_tensor(rows, dtype=torch.long)

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx.to(t.device)]

        return Rollout(
            pick(self.prompt_ids),
            pick(self.prompt_mask),
            pick(self.response_ids),
            pick(self.response_mask),
            pick(self.logps),
            pick(self.ended),
            [self.completions[i] for i in idx.tolist()],
        )


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = -sum_v p_v log p_v over the last dimension: (..., V) -> (...)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counting real tokens only: (B, T) -> (B, T), 0 on left padding."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def encode_prompts(
    tokenizer: Any, prompts: list[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, P), mask (B, P)) of rendered prompts, left-padded, no special tokens added
    (a rendered chat prompt already holds the ones its template wants)."""
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if any(len(r) == 0 for r in rows):
        raise ValueError("rollout: an empty prompt has nothing to condition on.")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = torch.tensor(r)
        mask[b, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def sample_tokens(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float
) -> torch.Tensor:
    """One token per row: inverse-CDF sampling with the given uniforms (B,), from softmax(logits /
    temperature) restricted to the smallest set of most likely tokens holding mass >= top_p
    (Holtzman et al. 2020, arXiv 1904.09751); temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass of the more likely tokens
    sorted_p = sorted_p * (before < top_p)  # always keeps the most likely token
    cdf = sorted_p.cumsum(-1)  # (B, V)
    target = uniforms.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]
    k = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[-1] - 1)  # (B, 1)
    return order.gather(-1, k).squeeze(-1)


def _forward(model: nn.Module, cache_key: str, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """(last position's logits (B, V), cache) of one call of the root model."""
    out = model(**kwargs, logits_to_keep=1)
    return out.logits[:, -1].float(), getattr(out, cache_key, None)


@torch.no_grad()
def rollout(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    use_cache: bool = True,
    return_logps: bool = True,
    end_ids: set[int] | None = None,
    all_done: Callable[[bool], bool] | None = None,
) -> Rollout:
    """Sample one response per rendered prompt from ``model`` (in eval mode: no dropout).

    Rows are independent: each draws its own uniform per step, so a prompt's response does not
    depend on its batch neighbours beyond floating-point effects of padding. Sampling stops when
    every row has ended or after ``max_new_tokens``. ``generator`` (a CPU generator) makes the
    draw reproducible; without one a fresh generator seeded from torch's global RNG is used. A
    list of generators, one per row, gives each row its own stream (row b's uniform at step k is
    element k of a ``max_new_tokens``-long draw from ``generator[b]``), so a row's response
    depends on its own seed only, not on which batch or process sampled it (what the RL source
    uses under torchrun).

    ``all_done(local)`` decides when to stop given whether every local row has ended (default:
    ``local``); under torchrun it is an all-reduce, so every process runs the same number of
    decode steps and the collectives of a sharded (FSDP2) forward stay matched. Rows that ended
    only add padding columns.
    """
    if max_new_tokens < 1:
        raise ValueError("rollout: max_new_tokens must be >= 1.")
    device = next(model.parameters()).device
    if isinstance(generator, list) and len(generator) != len(prompts):
        raise ValueError("rollout: one generator per prompt, or a single generator.")
    if generator is None:
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
    stops = torch.tensor(sorted(end_ids if end_ids is not None else end_token_ids(tokenizer)))
    stops = stops.to(device)
    pad = tokenizer.pad_token_id
    ids, mask = encode_prompts(tokenizer, prompts, device)
    B = ids.shape[0]
    cache_key = cache_argument(model)
    was_training = model.training
    model.eval()
    try:
        seq, seq_mask = ids, mask  # (B, P + k) grow by one column per step
        logits, cache = _forward(
            model,
            cache_key,
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions_from_mask(mask),
            use_cache=use_cache,
        )
        next_pos = mask.sum(-1, keepdim=True)  # (B, 1) the first response token's position
        tokens, logps = [], []
        # Per-row streams: each row's uniforms for every decode step in one draw (a Python call
        # per row and step made sampling 2-3x slower at 64 rows).
        per_row = (
            torch.stack([torch.rand(max_new_tokens, generator=g) for g in generator])
            if isinstance(generator, list)
            else None
        )
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for k in range(max_new_tokens):
            u = (  # drawn every step, for every row
                per_row[:, k] if per_row is not None else torch.rand(B, generator=generator)
            )
            tok = sample_tokens(logits, u, temperature, top_p)  # (B,)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            if return_logps:
                scaled = logits / (temperature if temperature > 0 else 1.0)
                lp = torch.log_softmax(scaled, -1).gather(-1, tok[:, None]).squeeze(-1)
                logps.append(torch.where(done, torch.zeros_like(lp), lp))
            tokens.append(tok)
            live = ~done
            done = done | torch.isin(tok, stops)
            finished = bool(done.all())
            if all_done is not None:
                finished = all_done(finished)
            if finished or k == max_new_tokens - 1:
                break
            # Padding after the end stays out of every later token's attention.
            seq = torch.cat([seq, tok[:, None]], dim=1)
            seq_mask = torch.cat([seq_mask, live[:, None].long()], dim=1)
            if use_cache:
                logits, cache = _forward(
                    model,
                    cache_key,
                    input_ids=tok[:, None],
                    attention_mask=seq_mask,
                    position_ids=next_pos,
                    use_cache=True,
                    **{cache_key: cache},
                )
            else:
                logits, _ = _forward(
                    model,
                    cache_key,
                    input_ids=seq,
                    attention_mask=seq_mask,
                    position_ids=positions_from_mask(seq_mask),
                    use_cache=False,
                )
            next_pos = next_pos + 1
    finally:
        model.train(was_training)
    response = torch.stack(tokens, dim=1)  # (B, R)
    is_end = torch.isin(response, stops)
    # Tokens up to and including the first end token: nothing ended strictly before them.
    ended_before = (is_end.long().cumsum(-1) - is_end.long()) > 0
    response_mask = (~ended_before).long()  # (B, R)
    response = torch.where(response_mask.bool(), response, torch.full_like(response, pad))
    return Rollout(
        prompt_ids=ids,
        prompt_mask=mask,
        response_ids=response,
        response_mask=response_mask,
        logps=torch.stack(logps, dim=1) * response_mask if return_logps else None,
        ended=is_end.any(-1),
        completions=tokenizer.batch_decode(response, skip_special_tokens=True),
    )


def response_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_len: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log pi(y_t | x, y_<t) (B, R), entropy of pi at each of those steps (B, R) or None), for
    the last ``response_len`` tokens of ``input_ids`` (B, P + R): one forward pass of the root
    model over prompt and response, logits only where a response token is predicted.

    For the reference, call it inside ``method.disable()`` (the frozen base, no second copy).
    Differentiable: the PPO / GRPO update calls it with gradients on.
    """
    R = response_len
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions_from_mask(attention_mask),
        use_cache=False,
        logits_to_keep=R + 1,
    )
    logits = out.logits[:, :-1].float()  # (B, R, V): position P - 1 + t predicts y_t
    if temperature > 0:
        logits = logits / temperature
    targets = input_ids[:, -R:]  # (B, R)
    logps = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    entropy = entropy_from_logits(logits) if with_entropy else None
    return logps, entropy
