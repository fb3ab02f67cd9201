"""What prefix-tuning and prompt-tuning share: n virtual tokens in front of every sequence.

Both methods work on the model's inputs, not on its weights, so they hook the backbone
(``model.base_model``, the module every task calls) instead of wrapping layers:

* a forward pre-hook rewrites the call's keyword arguments: it puts the virtual tokens in front
  (as key/value cache entries for prefix-tuning, as input embeddings for prompt-tuning), extends
  a given attention mask by n ones and shifts given position ids by n;
* a forward hook (prompt-tuning only) cuts the n virtual positions off the output, so callers
  see exactly one hidden state per real token and objectives need no method-specific code.

Positions follow PEFT: the real tokens sit at positions n, n+1, ... after the virtual ones, with
or without a key/value cache, so generation with the cache equals generation without it and PEFT
computes the same logits from the saved artifact.

A packed row holds several examples, but the virtual tokens sit only in front of the row, so these
methods refuse packing (``packing_ok = False``; ``data.packing: auto`` turns it off).

Artifacts use PEFT's prompt-learning layout: ``adapter_config.json`` and
``adapter_model.safetensors`` holding ``prompt_embeddings`` (n, dim); a trained task head, if any,
is stored beside it as ``base_model.<head>.weight`` (PEFT's key for ``modules_to_save`` of a
prompt-learning model, whose ``base_model`` is the transformers model itself).
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.methods.base import toggled

PEFT_PREFIX = "base_model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def backbone_of(model: nn.Module) -> nn.Module:
    """The decoder every task calls (``LlamaModel`` inside ``LlamaForCausalLM`` and friends)."""
    backbone = getattr(model, "base_model", model)
    if not hasattr(backbone, "get_input_embeddings"):
        raise TunesmithError(
            f"{type(model).__name__} has no backbone with input embeddings to put virtual tokens in front of."
        )
    return backbone


def cache_argument(backbone: nn.Module) -> str:
    """Name of the backbone's key/value cache argument (``cache`` in transformers 5.x)."""
    params = inspect.signature(backbone.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def real_cache(kwargs: dict[str, Any], key: str) -> Any:
    """The call's key/value cache, unless it is a scratch cache prefix-tuning made for an earlier
    call that asked for none (generation without cache passes it back: it is no real past)."""
    cache = kwargs.get(key)
    return None if getattr(cache, "tunesmith_scratch", False) else cache


def is_fresh(cache: Any) -> bool:
    """Does this call start a sequence (nothing cached before it)?"""
    return cache is None or cache.get_seq_length() == 0


def batch_size(kwargs: dict[str, Any]) -> int:
    x = kwargs.get("input_ids")
    return (x if x is not None else kwargs["inputs_embeds"]).shape[0]


def shift_positions(kwargs: dict[str, Any], n: int, prepend: bool) -> None:
    """Make room for n virtual tokens in a given attention mask, position ids and token types.

    The mask always covers the virtual tokens (they are in the cache or in the input); positions
    move up by n, and when the virtual tokens are part of this call's input (``prepend``) they
    take positions 0..n-1 themselves.
    """
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        ones = torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device)
        kwargs["attention_mask"] = torch.cat([ones, mask], dim=1)  # (B, n + T)
    types = kwargs.get("token_type_ids")
    if types is not None and prepend:  # virtual tokens belong to the first segment (PEFT's rule)
        zeros = torch.zeros(types.shape[0], n, dtype=types.dtype, device=types.device)
        kwargs["token_type_ids"] = torch.cat([zeros, types], dim=1)  # (B, n + T)
    pos = kwargs.get("position_ids")
    if pos is not None:
        shifted = pos + n
        if prepend:
            head = torch.arange(n, device=pos.device).expand(pos.shape[0], n)
            shifted = torch.cat([head, shifted], dim=1)  # (B, n + T)
        kwargs["position_ids"] = shifted


def attach(backbone: nn.Module, name: str, module: nn.Module) -> None:
    """Register ``module`` on the backbone as ``name`` (``name_2``, ... when several methods sit
    on one model), so its parameters are the model's and train, save and move with it."""
    k, free = 1, name
    while hasattr(backbone, free):
        k += 1
        free = f"{name}_{k}"
    backbone.add_module(free, module)


class BackboneHooks:
    """Pre- and post-forward hooks on the backbone that can be switched off (``disable``)."""

    def __init__(
        self,
        backbone: nn.Module,
        before: Callable[[dict[str, Any]], bool],
        after: Callable[[Any], Any] | None = None,
    ) -> None:
        self.enabled = True
        self._trim: list[bool] = []  # one entry per call in flight: cut the output?
        self._before, self._after = before, after

        def pre(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
            if args:  # positional input_ids (the backbone's first parameter)
                kwargs = {"input_ids": args[0], **kwargs}
                args = ()
            self._trim.append(self.enabled and self._before(kwargs))
            return args, kwargs

        def post(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
            trim = self._trim.pop()
            return self._after(output) if trim and self._after else output

        self.handles = [
            backbone.register_forward_pre_hook(pre, with_kwargs=True),
            backbone.register_forward_hook(post, with_kwargs=True),
        ]

    def disable(self) -> contextlib.AbstractContextManager[None]:
        return toggled([self], "enabled", False)


def head_tensors(method_params: set[int], trainable: list[tuple[str, nn.Parameter]]) -> dict:
    """Trained weights that are not the method's own (a reward head), in PEFT's key style."""
    return {
        PEFT_PREFIX + n: p.detach().contiguous() for n, p in trainable if id(p) not in method_params
    }


def save_prompt_learning(
    directory: str | Path, embeddings: torch.Tensor, peft_config: dict, extra: dict
) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"prompt_embeddings": embeddings.detach().float().contiguous(), **extra}
    save_file(tensors, directory / WEIGHTS, metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(peft_config, indent=2))


def load_prompt_learning(
    directory: str | Path, model: nn.Module, peft_type: str, expected: tuple[int, int]
) -> torch.Tensor:
    """The saved ``prompt_embeddings`` of a ``peft_type`` artifact, checked against the
    ``expected`` (virtual tokens, width); a saved task head is copied into ``model`` directly."""
    config, path = Path(directory) / CONFIG, Path(directory) / WEIGHTS
    if not config.exists() or not path.exists():
        raise TunesmithError(f"{directory}: no {CONFIG} and {WEIGHTS} to load.")
    saved = json.loads(config.read_text())
    if saved.get("peft_type") != peft_type:
        raise TunesmithError(f"{config}: peft_type is {saved.get('peft_type')}, not {peft_type}.")
    if saved.get("num_virtual_tokens") != expected[0]:
        raise TunesmithError(
            f"{config}: saved with {saved.get('num_virtual_tokens')} virtual tokens; set "
            f"method.virtual_tokens={saved.get('num_virtual_tokens')} to load it."
        )
    state = load_file(str(path))
    emb = state.pop("prompt_embeddings", None)
    if emb is None or tuple(emb.shape) != expected:
        got = None if emb is None else tuple(emb.shape)
        raise TunesmithError(
            f"{path}: prompt_embeddings has shape {got}, this model and config need {expected}."
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            # Older tunesmith artifacts used "base_model.model." (the LoRA-model layout).
            name = key.removeprefix(PEFT_PREFIX + "model.").removeprefix(PEFT_PREFIX)
            if name not in params:
                raise TunesmithError(f"{path}: {key} fits no parameter of this model.")
            params[name].copy_(value)
    return emb


def unmergeable(method: str, what: str) -> TunesmithError:
    return TunesmithError(
        f"method '{method}' adds {what} in front of every sequence, which no weight can express, "
        "so it cannot be merged; load the run folder itself (tunesmith generate RUN)."
    )
