"""The Method protocol: which parameters of a model train, and how they are saved.

A method is a small object built from its config. ``apply(model)`` injects its parameters by
module name (never by subclassing model classes) and freezes what it does not train. Shared
code (loops, recipes, tasks) only talks to this protocol, so it never branches on a method's
name: LoRA-DPO or prefix-SFT are configurations, not new code paths.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from tunesmith.errors import TunesmithError


@runtime_checkable
class Method(Protocol):
    """What every fine-tuning method provides."""

    name: ClassVar[str]
    packing_ok: ClassVar[bool]
    """Whether a row may hold several packed examples (not for methods that prepend to rows)."""
    frozen_base: ClassVar[bool]
    """Whether ``disable()`` gives back the starting model (a free reference, no second copy)."""
    mergeable: ClassVar[bool]
    """Whether ``merge()`` folds the method into plain weights."""
    artifact: ClassVar[str]
    """What ``save`` writes: ``model`` (a whole transformers model) or ``adapter`` (the method's
    weights only, loaded on top of the base)."""
    task_type: str
    """PEFT's task type the artifact declares (``CAUSAL_LM``, ``SEQ_CLS``): set from the model's
    head before saving."""
    config: Any

    def apply(self, model: nn.Module) -> nn.Module:
        """Inject the method's parameters into ``model``, freeze the rest; return the model."""

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The (name, parameter) pairs the optimiser updates."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The method's own weights only (for checkpoints), keyed by model parameter name."""

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_dict`."""

    def save(self, directory: str | Path, base_model: str) -> None:
        """Write the final artifact (HF or PEFT layout) into ``directory``."""

    def load(self, directory: str | Path) -> None:
        """Load the weights written by :meth:`save` into the applied model."""

    def disable(self) -> contextlib.AbstractContextManager[None]:
        """Context in which the model computes as the frozen base (a free reference model)."""

    def merge(self) -> nn.Module:
        """Fold the method into the base weights where the maths allows; return the plain model."""

    def wrapped_modules(self) -> list[str]:
        """Names of the model's modules the method wrapped (empty for methods that wrap none:
        full changes weights in place, prefix and prompt act on the inputs)."""


_REGISTRY: dict[str, tuple[type, type]] = {}


def register(config_cls: type, method_cls: type) -> None:
    """Make a method available by ``config_cls.name`` in configs and the CLI."""
    _REGISTRY[config_cls.name] = (config_cls, method_cls)


def method_class(name: str) -> type:
    """The method class registered as ``name`` (its capabilities are class attributes)."""
    return _REGISTRY[name][1]


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def method_config(name: str, **kwargs: Any) -> Any:
    """A method's config object with defaults (plus ``kwargs``)."""
    return _REGISTRY[name][0](**kwargs)


def build_method(config: Any) -> Method:
    """The method object for a validated method config."""
    return _REGISTRY[config.name][1](config)


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def named_trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


WRAPPED = "base_layer"
"""Attribute under which every tunesmith wrapper keeps the module it wraps (PEFT's name)."""


def canonical(name: str) -> str:
    """A parameter or module name as if no wrapper stood in the way.

    With several methods on one model (``tunesmith.MultiAdapter``) wrappers nest, e.g. LoRA on
    a feed-forward block that a bottleneck adapter already wraps: ``mlp.base_layer.down_proj``.
    Saved artifacts always use the plain names (``mlp.down_proj``).
    """
    return ".".join(part for part in name.split(".") if part != WRAPPED)


def owned_by_methods(model: nn.Module) -> list[str]:
    """Names of the modules methods added (marked ``tunesmith_owned``): never targets themselves."""
    return [n for n, m in model.named_modules() if getattr(m, "tunesmith_owned", False)]


def head_modules(model: nn.Module) -> list[str] | None:
    """Names of the task-head modules that train whole (PEFT's ``modules_to_save``), or None."""
    names = [n for n, m in model.named_modules() if getattr(m, "tunesmith_head", False)]
    return [canonical(n) for n in names] or None


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` (dotted path) was: injection by name."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


class MethodBase:
    """What every method shares (the one level of inheritance): after ``apply``, its weights are
    exactly the model's trainable parameters, the method's own plus any task head trained whole,
    so checkpoints and the optimiser need nothing method-specific."""

    name: ClassVar[str]
    packing_ok: ClassVar[bool] = True
    frozen_base: ClassVar[bool] = True
    mergeable: ClassVar[bool] = False
    artifact: ClassVar[str] = "adapter"

    def __init__(self, config: Any) -> None:
        self.config = config
        self.model: nn.Module | None = None
        self.task_type = "CAUSAL_LM"

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return named_trainable(self.model)

    def wrapped_modules(self) -> list[str]:
        return []

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {canonical(n): p.detach() for n, p in named_trainable(self.model)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = {canonical(n): p for n, p in named_trainable(self.model)}
        if set(state) != set(params):
            differ = sorted(set(params) ^ set(state))[:3]
            raise TunesmithError(f"{self.name} weights do not fit this model (e.g. {differ}).")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name])


@contextlib.contextmanager
def toggled(modules: list[Any], attr: str, value: Any) -> Iterator[None]:
    """Temporarily set ``attr`` on every module (used by ``disable()`` implementations)."""
    old = [getattr(m, attr) for m in modules]
    for m in modules:
        setattr(m, attr, value)
    try:
        yield
    finally:
        for m, v in zip(modules, old):
            setattr(m, attr, v)
