"""Generation and generation-based metrics (exact match of answers on held-out prompts)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tunesmith.data.dataset import end_token_ids
from tunesmith.data.formats import prompt_and_reference
from tunesmith.data.io import Record


def chat_prompt(tokenizer: Any, prompt: str, raw: bool = False) -> str:
    """Wrap a user prompt in the chat template when the tokenizer has one (unless ``raw``)."""
    if raw or not getattr(tokenizer, "chat_template", None):
        return prompt
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int = 64,
    sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
) -> list[str]:
    """Completions (without the prompt, special tokens removed) for rendered prompts."""
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right
    out: list[str] = []
    try:
        for k in range(0, len(prompts), batch_size):
            enc = tokenizer(
                prompts[k : k + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(device)
            kwargs: dict[str, Any] = {"do_sample": sample}
            if sample:
                kwargs.update(temperature=temperature, top_p=top_p)
            ids = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                eos_token_id=sorted(end_token_ids(tokenizer)),
                pad_token_id=tokenizer.pad_token_id,
                **kwargs,
            )
            new = ids[:, enc["input_ids"].shape[1] :]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return out


@dataclass
class ExactMatch:
    score: float
    n: int
    samples: list[tuple[str, str, str]]  # (prompt, reference, prediction)


def normalise(text: str) -> str:
    return " ".join(text.split())


def exact_match(
    model: nn.Module,
    tokenizer: Any,
    records: list[Record],
    fmt: str,
    template: str | None,
    limit: int | None = None,
    max_new_tokens: int = 32,
) -> ExactMatch:
    """Share of held-out records whose greedy answer equals the reference (whitespace-normalised)."""
    records = records[:limit] if limit else records
    pairs = [prompt_and_reference(r, fmt, tokenizer, template) for r in records]
    preds = generate(model, tokenizer, [p for p, _ in pairs], max_new_tokens=max_new_tokens)
    hits = [normalise(p) == normalise(ref) for (_, ref), p in zip(pairs, preds)]
    samples = [(p, ref, pred) for (p, ref), pred in zip(pairs, preds)]
    return ExactMatch(sum(hits) / max(len(hits), 1), len(hits), samples)
