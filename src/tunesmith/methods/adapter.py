"""Bottleneck adapters (Houlsby et al. 2019, arXiv 1902.00751; Pfeiffer et al. 2021, arXiv 2005.00247).

A small residual block is inserted after a sublayer's output h (before the layer's own residual
addition):

    h' = h + W_up f(W_down h),   W_down: (m, d), W_up: (d, m), m << d

with f a non-linearity and W_up zero at initialisation, so the adapted model starts equal to the
base. ``placement: houlsby`` puts one after the attention block and one after the feed-forward
block of every layer; ``pfeiffer`` only after the feed-forward block. The base stays frozen.

The block is non-linear, so it cannot be folded into the base weights (``merge`` refuses).

Artifact layout (PEFT has no bottleneck adapters; this keeps the same shape under its own file
names, so PEFT and transformers do not mistake it for a PEFT adapter):
``bottleneck_config.json`` = ``{"tunesmith_method": "adapter", "placement", "bottleneck",
"activation", "base_model_name_or_path", "targets": [wrapped module names]}`` and
``bottleneck_model.safetensors`` with keys ``<wrapped module>.adapter.down.weight`` / ``.up.weight``
(and biases), e.g. ``model.layers.0.mlp.adapter.up.weight``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.methods.base import MethodBase, freeze, register, replace_module, toggled

CONFIG, WEIGHTS = "bottleneck_config.json", "bottleneck_model.safetensors"
ATTENTION = ("self_attn", "attention", "attn")
FEED_FORWARD = ("mlp", "feed_forward", "ffn")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


@dataclass
class AdapterConfig:
    name: ClassVar[str] = "adapter"
    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    """``houlsby``: after attention and feed-forward blocks; ``pfeiffer``: after feed-forward only."""
    bottleneck: int | None = None
    """Bottleneck size m; null derives it from ``reduction``."""
    reduction: float = 16.0
    """m = hidden size / reduction, when ``bottleneck`` is null."""
    activation: Literal["relu", "gelu", "silu"] = "relu"
    """The non-linearity f."""

    def check(self, prefix: str) -> None:
        if self.bottleneck is not None and self.bottleneck < 1:
            raise ConfigError(f"{prefix}.bottleneck: got {self.bottleneck}; must be >= 1.")
        if self.reduction <= 0:
            raise ConfigError(f"{prefix}.reduction: got {self.reduction}; must be > 0.")


class Bottleneck(nn.Module):
    def __init__(self, hidden: int, size: int, activation: str, device: torch.device) -> None:
        super().__init__()
        self.tunesmith_owned = True
        self.down = nn.Linear(hidden, size, device=device)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(size, hidden, device=device)
        nn.init.zeros_(self.up.weight)  # the adapted model starts as the base
        nn.init.zeros_(self.up.bias)
        nn.init.zeros_(
            self.down.bias
        )  # no unit starts dead: each is active on about half the inputs

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        w = self.down.weight
        return h + self.up(self.act(self.down(h.to(w.dtype)))).to(h.dtype)  # (..., d)


class WithAdapter(nn.Module):
    """A sublayer whose output (or the first element of its output tuple) passes an adapter."""

    def __init__(self, module: nn.Module, adapter: Bottleneck) -> None:
        super().__init__()
        self.base_layer = module
        self.adapter = adapter
        self.enabled = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        if not self.enabled:
            return out
        if isinstance(out, tuple):
            return (self.adapter(out[0]), *out[1:])
        return self.adapter(out)


def _has(layer: nn.Module, path: str) -> bool:
    try:
        layer.get_submodule(path)
    except AttributeError:
        return False
    return True


def _layer_sublayers(layer: nn.Module, placement: str) -> list[str]:
    """The sublayers of one transformer layer whose output an adapter follows.

    Pre-norm decoders (Llama, Qwen, ...) and DistilBERT return each block's output before the
    residual addition, so the adapter follows the block itself (``self_attn``, ``mlp``). BERT's
    post-norm layers end each block with ``dense -> dropout -> LayerNorm(h + x)``, so the adapter
    follows the projections ``attention.output.dense`` and ``output.dense``: between the
    sublayer and its residual addition, where Houlsby et al. put it."""
    if _has(layer, "output.dense") and _has(layer, "intermediate"):  # BERT, RoBERTa, MiniLM
        post = ["output.dense"]
        if placement == "houlsby":
            post.insert(0, "attention.output.dense")
        return [p for p in post if _has(layer, p)]
    leaves = FEED_FORWARD if placement == "pfeiffer" else FEED_FORWARD + ATTENTION
    return [leaf for leaf in leaves if isinstance(getattr(layer, leaf, None), nn.Module)]


def _find_sublayers(model: nn.Module, placement: str) -> list[str]:
    """Names of the feed-forward / attention sublayers of every transformer layer."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            for i, layer in enumerate(module):
                names += [f"{name}.{i}.{p}" for p in _layer_sublayers(layer, placement)]
    if not names:
        raise ConfigError(
            "method: found no transformer layers with attention / feed-forward blocks to put adapters after."
        )
    return names


class Adapter(MethodBase):
    name: ClassVar[str] = "adapter"

    def __init__(self, config: AdapterConfig) -> None:
        super().__init__(config)
        self.wrapped: dict[str, WithAdapter] = {}

    def apply(self, model: nn.Module) -> nn.Module:
        freeze(model)
        c = self.config
        hidden = model.config.get_text_config().hidden_size
        size = c.bottleneck or max(1, round(hidden / c.reduction))
        device = next(model.parameters()).device
        for name in _find_sublayers(model, c.placement):
            wrapper = WithAdapter(
                model.get_submodule(name), Bottleneck(hidden, size, c.activation, device)
            )
            replace_module(model, name, wrapper)
            self.wrapped[name] = wrapper
        self.model = model
        return model

    def save(self, directory: str | Path, base_model: str) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            n: v.contiguous() for n, v in self.state_dict().items()
        }  # model.layers.0.mlp.adapter.up.weight
        save_file(tensors, directory / WEIGHTS, metadata={"format": "pt"})
        c = self.config
        size = next(iter(self.wrapped.values())).adapter.down.out_features
        meta = {
            "tunesmith_method": "adapter",
            "placement": c.placement,
            "bottleneck": size,
            "activation": c.activation,
            "base_model_name_or_path": base_model,
            "targets": sorted(self.wrapped),
        }
        (directory / CONFIG).write_text(json.dumps(meta, indent=2))

    def load(self, directory: str | Path) -> None:
        self.load_state_dict(load_file(str(Path(directory) / WEIGHTS)))

    def wrapped_modules(self) -> list[str]:
        return list(self.wrapped)

    def disable(self) -> contextlib.AbstractContextManager[None]:
        return toggled(list(self.wrapped.values()), "enabled", False)

    def merge(self) -> nn.Module:
        raise TunesmithError(
            "method 'adapter' adds a non-linear block after each sublayer, so it cannot be folded into "
            "the base weights; load the run folder itself (tunesmith generate RUN) instead."
        )


register(AdapterConfig, Adapter)
