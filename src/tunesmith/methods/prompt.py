"""Prompt-tuning (Lester et al. 2021, arXiv 2104.08691).

n trainable embeddings P (n, d) are put in front of every input's token embeddings,

    h_0 = [P ; E[x_1], ..., E[x_T]]

and every weight of the model stays frozen. Only the outputs at the real tokens are returned, so
tasks see one hidden state per real token, as without the method.

Initialisation (``init``), the paper's section 3: ``vocab`` copies the embeddings of n sampled
vocabulary tokens; ``text`` those of ``init_text``'s tokens (repeated or cut to n); ``random``
draws N(0, s^2) with s the embedding matrix's own standard deviation (PEFT draws N(0, 1), which is
far off the scale of a trained embedding).

Artifacts are PEFT's ``PROMPT_TUNING`` layout (``prompt_embeddings`` (n, d)), which
``peft.PeftModel.from_pretrained`` loads with the same logits.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from tunesmith.errors import ConfigError
from tunesmith.methods.base import MethodBase, freeze, head_modules, register
from tunesmith.methods.virtual_tokens import (
    BackboneHooks,
    attach,
    backbone_of,
    batch_size,
    cache_argument,
    head_tensors,
    is_fresh,
    load_prompt_learning,
    real_cache,
    save_prompt_learning,
    shift_positions,
    unmergeable,
)

PEFT_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


@dataclass
class PromptConfig:
    name: ClassVar[str] = "prompt"
    virtual_tokens: int = 16
    """Number n of soft-prompt embeddings."""
    init: Literal["vocab", "text", "random"] = "vocab"
    """Start from sampled vocabulary embeddings, from ``init_text``, or at random."""
    init_text: str | None = None
    """Text whose token embeddings start the prompt (with ``init: text``)."""

    def check(self, prefix: str) -> None:
        if self.virtual_tokens < 1:
            raise ConfigError(f"{prefix}.virtual_tokens: got {self.virtual_tokens}; must be >= 1.")
        if self.init == "text" and not self.init_text:
            raise ConfigError(
                f"{prefix}.init_text: init is 'text', so give the text to start from "
                f"(e.g. {prefix}.init_text='Answer the arithmetic question.')."
            )


class SoftPrompt(nn.Module):
    def __init__(self, init: torch.Tensor) -> None:
        super().__init__()
        self.tunesmith_owned = True
        self.weight = nn.Parameter(init.clone())  # (n, d)


class Prompt(MethodBase):
    name: ClassVar[str] = "prompt"
    packing_ok: ClassVar[bool] = False

    def __init__(self, config: PromptConfig) -> None:
        super().__init__(config)
        self.prompt: SoftPrompt | None = None
        self.hooks: BackboneHooks | None = None

    def apply(self, model: nn.Module) -> nn.Module:
        freeze(model)
        backbone = backbone_of(model)
        self.cache_key = cache_argument(backbone)
        self.embed = backbone.get_input_embeddings()
        self.prompt = SoftPrompt(self._initial_prompt(model))
        attach(backbone, "soft_prompt", self.prompt)
        self.hooks = BackboneHooks(backbone, self._before, self._after)
        self.model = model
        return model

    def _initial_prompt(self, model: nn.Module) -> torch.Tensor:
        c, table = self.config, self.embed.weight.detach()  # (V, d)
        n = c.virtual_tokens
        # Drawn from the run's seed alone, not from wherever the global generator stands: a task
        # whose head drew first (PPO's value head) would otherwise start from another prompt.
        g = torch.Generator().manual_seed(torch.initial_seed())
        if c.init == "random":
            return (
                torch.randn(n, table.shape[1], generator=g).to(table.device) * table.float().std()
            )
        if c.init == "vocab":
            ids = torch.randint(0, table.shape[0], (n,), generator=g).to(table.device)
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model.name_or_path)
            text_ids = tok(c.init_text, add_special_tokens=False)["input_ids"]
            if not text_ids:
                raise ConfigError("method.init_text: the text has no tokens.")
            ids = torch.tensor((text_ids * n)[:n], device=table.device)
        return table[ids].float()

    def _before(self, kwargs: dict[str, Any]) -> bool:
        n = self.config.virtual_tokens
        fresh = is_fresh(real_cache(kwargs, self.cache_key))
        if fresh:  # the prompt is part of this call's input (later calls find it in the cache)
            batch = batch_size(kwargs)
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                embeds = self.embed(kwargs.pop("input_ids"))  # (B, T, d)
            p = self.prompt.weight.to(embeds.dtype).expand(batch, -1, -1)  # (B, n, d)
            kwargs["inputs_embeds"] = torch.cat([p, embeds], dim=1)  # (B, n + T, d)
            kwargs["input_ids"] = None
        shift_positions(kwargs, n, prepend=fresh)
        return fresh

    def _after(self, output: Any) -> Any:
        n = self.config.virtual_tokens
        output.last_hidden_state = output.last_hidden_state[:, n:]  # (B, T, d): real tokens only
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(h[:, n:] for h in output.hidden_states)
        return output

    def peft_config(self, base_model: str) -> dict:
        c = self.model.config.get_text_config()
        return {
            "peft_type": "PROMPT_TUNING",
            "task_type": self.task_type,
            "base_model_name_or_path": base_model,
            "num_virtual_tokens": self.config.virtual_tokens,
            "token_dim": self.prompt.weight.shape[1],
            "num_transformer_submodules": 1,
            "num_attention_heads": c.num_attention_heads,
            "num_layers": c.num_hidden_layers,
            "prompt_tuning_init": PEFT_INIT[self.config.init],
            "prompt_tuning_init_text": self.config.init_text,
            "tokenizer_name_or_path": base_model,
            "inference_mode": True,
            "modules_to_save": head_modules(self.model),
        }

    def save(self, directory: str | Path, base_model: str) -> None:
        extra = head_tensors({id(self.prompt.weight)}, self.trainable_parameters())
        save_prompt_learning(directory, self.prompt.weight, self.peft_config(base_model), extra)

    def load(self, directory: str | Path) -> None:
        shape = tuple(self.prompt.weight.shape)
        weights = load_prompt_learning(directory, self.model, "PROMPT_TUNING", shape)
        with torch.no_grad():
            self.prompt.weight.copy_(weights)

    def disable(self) -> contextlib.AbstractContextManager[None]:
        return self.hooks.disable()

    def merge(self) -> nn.Module:
        raise unmergeable("prompt", "soft-prompt embeddings")


register(PromptConfig, Prompt)
