"""Compute precision: what ``train.precision: auto`` means on this machine, and the autocast.

``bf16`` runs the forward and backward under ``torch.autocast`` (matmuls and most kernels in
bfloat16, weights, gradients and optimiser state in float32: mixed precision, Micikevicius et
al. 2018, arXiv 1710.03740, with bfloat16's float32 exponent range, so no loss scaling).

``auto`` picks bf16 where it is faster, else fp32:

- a CUDA GPU that supports bf16: bf16;
- a CPU that multiplies bf16 natively (AVX512_BF16 or AMX, read from ``/proc/cpuinfo``) and a
  model at least ``CPU_BF16_MIN_HIDDEN`` wide: bf16. Measured on a 2-core AVX512_BF16 CPU
  (``bench/sft_vs_trl.py``, SFT + LoRA, loop tokens/s bf16 / fp32): hidden 512 x 6 layers
  1.67x (short examples) and 1.42x (long), hidden 256 x 4 layers 1.29x; builtin:tiny (hidden
  128) 0.60x, where the casts cost more than the small matmuls save. Without native bf16 (AVX2
  only) a bf16 matmul was 47x slower than fp32, so auto never picks it there;
- otherwise fp32.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.config import TrainConfig
from tunesmith.console import say

CPU_BF16_MIN_HIDDEN = 256
"""Narrowest model (hidden size) for which ``auto`` picks bf16 on a CPU with native bf16."""


def bf16_in_flags(cpuinfo: str) -> bool:
    """Whether ``/proc/cpuinfo``'s text lists bf16 dot-product instructions (x86 AVX512_BF16 or
    AMX-BF16) among the CPU flags."""
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (read once per process)."""
    try:
        return bf16_in_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False


def model_width(model: nn.Module) -> int | None:
    """The model's hidden size, from its ``transformers`` config (None when it has none)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "hidden_size", None)


def resolve_precision(precision: str, device: torch.device, model: nn.Module | None = None) -> str:
    """``fp32`` or ``bf16``: ``precision`` itself unless it is ``auto`` (see the module doc).
    On a CPU, ``auto`` needs the model to judge its width; without one it is fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu" and model is not None and cpu_has_native_bf16():
        width = model_width(model)
        if width is not None and width >= CPU_BF16_MIN_HIDDEN:
            return "bf16"
    return "fp32"


def settle_precision(train: TrainConfig, device: torch.device, model: nn.Module) -> None:
    """Resolve ``train.precision`` in place for this machine and model, so that the loop,
    evaluation, references and teachers all compute in the same precision; say so when ``auto``
    picks bf16 on a CPU (not the obvious choice)."""
    chosen = resolve_precision(train.precision, device, model)
    if train.precision == "auto" and chosen == "bf16" and device.type == "cpu":
        say(
            f"precision: auto chose bf16 (this CPU multiplies bf16 natively and the model is "
            f"{model_width(model)} wide); train.precision=fp32 keeps float32"
        )
    train.precision = chosen


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast when ``precision`` (resolved; ``auto`` resolves without a model) says so,
    else nothing."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
