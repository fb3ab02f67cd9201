"""Full fine-tuning: every parameter of the model trains.

The update is plain AdamW on all weights ``W <- W - lr * adam(grad W)``. The artifact is the
whole model in the Hugging Face layout (``save_pretrained``), loadable by ``transformers`` alone.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.methods.base import MethodBase, register


@dataclass
class FullConfig:
    """Full fine-tuning has no settings of its own."""

    name: ClassVar[str] = "full"


class Full(MethodBase):
    name: ClassVar[str] = "full"
    frozen_base: ClassVar[bool] = False
    mergeable: ClassVar[bool] = True
    artifact: ClassVar[str] = "model"

    def apply(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        self.model = model
        return model

    def save(self, directory: str | Path, base_model: str) -> None:
        self.model.save_pretrained(directory, safe_serialization=True)

    def load(self, directory: str | Path) -> None:
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(Path(directory).glob("*.safetensors")):
            state.update(load_file(str(shard)))
        if not state:
            raise TunesmithError(f"{directory}: no .safetensors weights to load.")
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        tied = {n for n, _ in self.model.named_parameters(remove_duplicate=False)} - {
            n for n, _ in self.model.named_parameters()
        }
        if unexpected or set(missing) - tied:
            raise TunesmithError(
                f"{directory}: weights do not fit this model (e.g. {(unexpected or missing)[:3]})."
            )

    def disable(self) -> contextlib.AbstractContextManager[None]:
        raise TunesmithError(
            "method 'full' changes every weight, so there is no frozen base to fall back to; "
            "use a parameter-efficient method or keep a separate reference model."
        )

    def merge(self) -> nn.Module:
        return self.model


register(FullConfig, Full)
