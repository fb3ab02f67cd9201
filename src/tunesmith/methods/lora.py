"""LoRA: low-rank adaptation (Hu et al. 2021, arXiv 2106.09685).

Each targeted linear layer ``h = W0 x`` becomes

    h = W0 x + s * B A dropout(x),   A: (r, d_in), B: (d_out, r),  s = alpha / r

with ``W0`` frozen, ``A`` Kaiming-uniform and ``B`` zero at initialisation, so the adapted model
starts equal to the base. rsLoRA (Kalajdzievski 2023, arXiv 2312.03732) uses ``s = alpha/sqrt(r)``
so that the update's scale does not shrink as the rank grows. Merging folds the update into the
weight, ``W = W0 + s B A``, which is exact (dropout is the identity at inference).

Artifacts use the PEFT layout: ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module>.lora_A.weight``, so ``peft.PeftModel.from_pretrained`` loads them.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunesmith.errors import ConfigError
from tunesmith.methods.base import (
    WRAPPED,
    MethodBase,
    canonical,
    freeze,
    head_modules,
    owned_by_methods,
    register,
    replace_module,
    toggled,
)
from tunesmith.methods.fused_lora import fused_linear

PEFT_PREFIX = "base_model.model."


@dataclass
class LoRAConfig:
    name: ClassVar[str] = "lora"
    rank: int = 16
    """Rank r of the update B A."""
    alpha: float = 32.0
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input during training."""
    targets: str | list[str] = "all-linear"
    """``all-linear`` (every linear layer but the output head), a list of module-name suffixes
    (``[q_proj, v_proj]``), or one regular expression matched against full module names."""
    rslora: bool = False
    """Use rank-stabilised scaling alpha / sqrt(r)."""

    def check(self, prefix: str) -> None:
        if self.rank < 1:
            raise ConfigError(f"{prefix}.rank: got {self.rank}; must be >= 1.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{prefix}.dropout: got {self.dropout}; must be in [0, 1).")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update (module names follow PEFT)."""

    def __init__(self, base_layer: nn.Linear, rank: int, scaling: float, dropout: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        w = base_layer.weight
        # The adapter trains in fp32 even over a bf16 base: small updates survive rounding.
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False, device=w.device)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False, device=w.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = scaling
        self.enabled = True

    # Shaped like the nn.Linear it wraps, so another LoRA can wrap it (several adapters, one base).
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def fusable(self, device: str) -> bool:
        """Whether a fused node can compute this layer: over a plain ``nn.Linear`` that does not
        train, in the autocast dtype or else the base's (over a bf16/fp16 base without autocast
        the adapter must stay in its own float32)."""
        base = self.base_layer
        return (
            type(base) is nn.Linear
            and not any(p.requires_grad for p in base.parameters())
            and (torch.is_autocast_enabled(device) or base.weight.dtype == self.lora_A.weight.dtype)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if not self.enabled:
            return base(x)
        dropped = (
            None if isinstance(self.dropout, nn.Identity) or not self.training else self.dropout(x)
        )
        a = self.lora_A.weight
        if self.fusable(x.device.type):
            return fused_linear(
                x, dropped, base.weight, base.bias, a, self.lora_B.weight, self.scaling
            )
        # Over another wrapper (several adapters on one base), a base that trains, or a low-precision
        # base without autocast: module by module.
        y = base(x)
        lora_in = x if dropped is None else dropped
        if not torch.is_autocast_enabled(x.device.type):
            lora_in = lora_in.to(a.dtype)
        update = self.lora_B(self.lora_A(lora_in))  # (..., d_out)
        return y + (update * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with ``s B A`` added to its weight."""
        w = self.base_layer.weight
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (d_out, d_in)
        w.add_(delta.to(w.dtype))
        return self.base_layer


def _select_targets(model: nn.Module, targets: str | list[str]) -> dict[str, str]:
    """{plain name: name to wrap} of the linear layers the config targets.

    Names are matched as if no wrapper stood in the way; where another adapter already wraps a
    layer, the outermost wrapper is wrapped, so the layer's adapters add up.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    owned = tuple(n + "." for n in owned_by_methods(model))
    linear: dict[str, str] = {}
    for n, m in model.named_modules():
        plain = canonical(n)
        if (
            isinstance(m, nn.Linear)
            and m is not head
            and not getattr(m, "tunesmith_head", False)  # a new task head trains whole
            and ".lora_" not in n
            and not n.startswith(owned)
        ):
            outer = n
            while outer.endswith("." + WRAPPED):
                outer = outer[: -len(WRAPPED) - 1]
            linear[plain] = outer
    if targets == "all-linear":
        chosen = linear
    elif isinstance(targets, str):
        pattern = re.compile(targets)
        chosen = {p: n for p, n in linear.items() if pattern.fullmatch(p)}
    else:
        chosen = {
            p: n for p, n in linear.items() if any(p == t or p.endswith("." + t) for t in targets)
        }
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ConfigError(
            f"method.targets: {targets!r} matches no linear layer; this model has: {', '.join(leaves)}."
        )
    return chosen


class LoRA(MethodBase):
    name: ClassVar[str] = "lora"
    mergeable: ClassVar[bool] = True

    def __init__(self, config: LoRAConfig) -> None:
        super().__init__(config)
        self.layers: dict[str, LoRALinear] = {}

    def apply(self, model: nn.Module) -> nn.Module:
        freeze(model)
        c = self.config
        for name in _select_targets(model, c.targets).values():
            layer = LoRALinear(model.get_submodule(name), c.rank, c.scaling, c.dropout)
            replace_module(model, name, layer)
            self.layers[name] = layer
        self.model = model
        return model

    def peft_config(self, base_model: str) -> dict:
        c = self.config
        if c.targets == "all-linear":
            targets: str | list[str] = sorted(
                {canonical(n).rsplit(".", 1)[-1] for n in self.layers}
            )
        else:
            targets = c.targets
        return {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": base_model,
            "r": c.rank,
            "lora_alpha": c.alpha,
            "lora_dropout": c.dropout,
            "target_modules": targets,
            "use_rslora": c.rslora,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": head_modules(self.model),
        }

    def save(self, directory: str | Path, base_model: str) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {PEFT_PREFIX + k: v.contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
        (directory / "adapter_config.json").write_text(
            json.dumps(self.peft_config(base_model), indent=2)
        )

    @classmethod
    def config_from_peft(cls, directory: str | Path) -> LoRAConfig:
        """The LoRA config stored in a PEFT-layout folder."""
        pc = json.loads((Path(directory) / "adapter_config.json").read_text())
        return LoRAConfig(
            rank=pc["r"],
            alpha=pc["lora_alpha"],
            dropout=pc.get("lora_dropout", 0.0),
            targets=pc["target_modules"],
            rslora=pc.get("use_rslora", False),
        )

    def load(self, directory: str | Path) -> None:
        """Load weights saved by :meth:`save` (or by PEFT) into the applied layers."""
        state = load_file(str(Path(directory) / "adapter_model.safetensors"))
        # PEFT writes the same keys; strip its prefix (and an adapter name, if any).
        clean = {}
        for k, v in state.items():
            k = k.removeprefix(PEFT_PREFIX).replace(".lora_A.default.", ".lora_A.")
            clean[k.replace(".lora_B.default.", ".lora_B.")] = v
        self.load_state_dict(clean)

    def wrapped_modules(self) -> list[str]:
        return list(self.layers)

    def disable(self) -> contextlib.AbstractContextManager[None]:
        return toggled(list(self.layers.values()), "enabled", False)

    def merge(self) -> nn.Module:
        for name, layer in self.layers.items():
            replace_module(self.model, name, layer.merged())
        self.layers = {}
        return self.model


register(LoRAConfig, LoRA)
