"""Prefix-tuning (Li & Liang 2021, arXiv 2101.00190).

Every attention layer l gets n trainable key and value vectors P_k^l, P_v^l in front of the keys
and values of the real tokens, so each token attends over

    softmax(q [P_k^l ; K^l]^T / sqrt(d)) [P_v^l ; V^l]

while every weight of the model stays frozen. The prefixes enter through the model's key/value
cache (a ``DynamicCache`` already holding n entries per layer), so the attention code is the
model's own, with any attention kernel, and generation simply continues after them.

Reparameterisation: optimising P directly is unstable (the paper, section 4.3), so during
training P = MLP(E) = W_2 tanh(W_1 E + b_1) + b_2 with E (n, h) trainable; saving folds the MLP
away and stores P itself, which is all inference needs.

Initialisation (``init``): ``vocab`` starts P at the keys and values the frozen model computes for
n randomly sampled vocabulary tokens (the paper, section 7.2: real-word activations train better
than random ones); ``random`` uses N(0, 1) as PEFT does.

Artifacts are PEFT's ``PREFIX_TUNING`` layout: ``prompt_embeddings`` of shape
(n, num_layers * 2 * kv_heads * head_dim), laid out per virtual token as
[layer 0 keys, layer 0 values, layer 1 keys, ...], each (kv_heads, head_dim), so
``peft.PeftModel.from_pretrained`` computes the same logits.
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


@dataclass
class PrefixConfig:
    name: ClassVar[str] = "prefix"
    virtual_tokens: int = 16
    """Number n of prefix positions per layer."""
    projection: bool = True
    """Train the prefix through an MLP reparameterisation (folded away when saved)."""
    projection_hidden: int | None = None
    """Hidden width of that MLP; null uses the model's hidden size."""
    init: Literal["vocab", "random"] = "vocab"
    """Start from the keys/values of sampled vocabulary tokens, or from N(0, 1)."""

    def check(self, prefix: str) -> None:
        if self.virtual_tokens < 1:
            raise ConfigError(f"{prefix}.virtual_tokens: got {self.virtual_tokens}; must be >= 1.")
        if self.projection_hidden is not None and self.projection_hidden < 1:
            raise ConfigError(
                f"{prefix}.projection_hidden: got {self.projection_hidden}; must be >= 1."
            )


def kv_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a decoder's attention."""
    c = model.config.get_text_config()
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return c.num_hidden_layers, kv_heads, head_dim


class PrefixEncoder(nn.Module):
    """P (n, L * 2 * kv_heads * head_dim): a free tensor, or P_0 + MLP(E) while training.

    The MLP's output layer starts at zero, so training starts exactly at the initial prefix P_0
    (a frozen buffer) and the reparameterisation only shapes how P moves.
    """

    def __init__(self, init: torch.Tensor, hidden: int, projection: int | None) -> None:
        super().__init__()
        self.tunesmith_owned = True
        n, width = init.shape
        self.prefix: nn.Parameter | None = None
        self.mlp: nn.Sequential | None = None
        if projection is None:
            self.prefix = nn.Parameter(init.clone())
            return
        self.register_buffer("start", init.clone(), persistent=False)
        self.embedding = nn.Parameter(torch.randn(n, hidden, device=init.device))
        self.mlp = nn.Sequential(
            nn.Linear(hidden, projection, device=init.device),
            nn.Tanh(),
            nn.Linear(projection, width, device=init.device),
        )
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self) -> torch.Tensor:
        if self.prefix is not None:
            return self.prefix
        return self.start + self.mlp(self.embedding)  # (n, L * 2 * kv_heads * head_dim)

    def fold(self) -> None:
        """Replace the reparameterisation by its output (inference needs nothing else)."""
        if self.prefix is not None:
            return
        with torch.no_grad():
            folded = self.forward().detach().clone()
        trainable = self.embedding.requires_grad
        del self.embedding, self.mlp, self.start
        self.mlp = None
        self.prefix = nn.Parameter(folded, requires_grad=trainable)


class Prefix(MethodBase):
    name: ClassVar[str] = "prefix"
    packing_ok: ClassVar[bool] = False

    def __init__(self, config: PrefixConfig) -> None:
        super().__init__(config)
        self.encoder: PrefixEncoder | None = None
        self.hooks: BackboneHooks | None = None

    def apply(self, model: nn.Module) -> nn.Module:
        freeze(model)
        c = self.config
        backbone = backbone_of(model)
        layers, kv_heads, head_dim = kv_shape(model)
        self.shape = (layers, kv_heads, head_dim)
        self.cache_key = cache_argument(backbone)
        init = self._initial_prefix(model, backbone)
        hidden = model.config.get_text_config().hidden_size
        self.encoder = PrefixEncoder(
            init, hidden, (c.projection_hidden or hidden) if c.projection else None
        )
        attach(backbone, "prefix_encoder", self.encoder)
        self.hooks = BackboneHooks(backbone, self._before)
        self.model = model
        return model

    def _initial_prefix(self, model: nn.Module, backbone: nn.Module) -> torch.Tensor:
        n = self.config.virtual_tokens
        layers, kv_heads, head_dim = self.shape
        device = next(model.parameters()).device
        if self.config.init == "random":
            return torch.randn(n, layers * 2 * kv_heads * head_dim, device=device)
        from transformers import DynamicCache

        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.randint(0, vocab, (1, n), device=device)
        # A cache handed in is filled by decoders and encoders alike (BERT ignores use_cache).
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            backbone(input_ids=ids, use_cache=True, **{self.cache_key: cache})
        parts = []
        for layer in range(layers):
            k, v = cache.layers[layer].keys, cache.layers[layer].values  # (1, H, n, D)
            parts += [t[0].transpose(0, 1).reshape(n, -1).float() for t in (k, v)]
        return torch.cat(parts, dim=1)  # (n, L * 2 * H * D)

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each (batch, kv_heads, n, head_dim)."""
        layers, kv_heads, head_dim = self.shape
        n = self.config.virtual_tokens
        p = self.encoder().to(dtype).view(n, layers * 2, kv_heads, head_dim).permute(1, 2, 0, 3)
        p = p.unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (2L, B, H, n, D)
        return [(p[2 * i], p[2 * i + 1]) for i in range(layers)]

    def _before(self, kwargs: dict[str, Any]) -> bool:
        from transformers import DynamicCache

        cache = real_cache(kwargs, self.cache_key)
        if is_fresh(cache):  # a fresh sequence: start it with P
            if cache is None:
                cache = DynamicCache(config=self.model.config)
                cache.tunesmith_scratch = not kwargs.get("use_cache")
            dtype = self.model.get_input_embeddings().weight.dtype
            for layer, (k, v) in enumerate(self.key_values(batch_size(kwargs), dtype)):
                cache.update(k, v, layer)
            kwargs[self.cache_key] = cache
        shift_positions(kwargs, self.config.virtual_tokens, prepend=False)
        return False

    def peft_config(self, base_model: str) -> dict:
        layers, kv_heads, head_dim = self.shape
        return {
            "peft_type": "PREFIX_TUNING",
            "task_type": self.task_type,
            "base_model_name_or_path": base_model,
            "num_virtual_tokens": self.config.virtual_tokens,
            "num_layers": layers,
            "num_attention_heads": kv_heads,  # PEFT reshapes with these (its GQA convention)
            "token_dim": kv_heads * head_dim,
            "num_transformer_submodules": 1,
            "encoder_hidden_size": self.config.projection_hidden or kv_heads * head_dim,
            "prefix_projection": False,  # folded: the file holds P itself
            "inference_mode": True,
            "modules_to_save": head_modules(self.model),
        }

    def save(self, directory: str | Path, base_model: str) -> None:
        own = {id(p) for p in self.encoder.parameters()}
        extra = head_tensors(own, self.trainable_parameters())
        with torch.no_grad():
            prefix = self.encoder()
        save_prompt_learning(directory, prefix, self.peft_config(base_model), extra)

    def load(self, directory: str | Path) -> None:
        layers, kv_heads, head_dim = self.shape
        width = layers * 2 * kv_heads * head_dim
        n = self.config.virtual_tokens
        prefix = load_prompt_learning(directory, self.model, "PREFIX_TUNING", (n, width))
        self.encoder.fold()
        with torch.no_grad():
            self.encoder.prefix.copy_(prefix)

    def disable(self) -> contextlib.AbstractContextManager[None]:
        return self.hooks.disable()

    def merge(self) -> nn.Module:
        raise unmergeable("prefix", "key/value positions")


register(PrefixConfig, Prefix)
