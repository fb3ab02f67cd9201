"""What every recipe shares: the run folder, model set-up and the final artifacts."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.config import Config, load_config, save_config
from tunesmith.errors import TunesmithError
from tunesmith.methods import Method, build_method
from tunesmith.models import load_model, load_tokenizer, pick_device, resolve_model_path
from tunesmith.training.checkpoint import list_checkpoints


@dataclass
class RunResult:
    output_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)


def say(msg: str) -> None:
    """Progress lines for people (stderr, so stdout stays clean for piping)."""
    print(f"tunesmith: {msg}", file=sys.stderr, flush=True)


def prepare_output_dir(cfg: Config, resume: bool) -> Path:
    """Create the run folder; refuse to overwrite a run, and check a resumed run's config."""
    out = Path(cfg.output_dir)
    saved = out / "config.yaml"
    if resume:
        if not list_checkpoints(out / "checkpoints"):
            raise TunesmithError(
                f"--resume: {out} has no checkpoint to resume from (set train.save_every to write them)."
            )
        before = load_config(saved).to_dict()
        now = cfg.to_dict()
        diff = [
            f"{s}.{k}"
            for s in now
            if isinstance(now[s], dict)
            for k in now[s]
            if before.get(s, {}).get(k) != now[s][k] and k != "progress"
        ]
        diff += [s for s in now if not isinstance(now[s], dict) and before.get(s) != now[s]]
        if diff:
            raise TunesmithError(
                f"--resume: the config differs from the run's saved config at {', '.join(diff)}; resume with the same config."
            )
        return out
    if (
        (out / "run.json").exists()
        or list_checkpoints(out / "checkpoints")
        or (out / "metrics.jsonl").exists()
    ):
        raise TunesmithError(
            f"output_dir: {out} already holds a run; pass --resume to continue it, or choose another "
            f"output_dir (e.g. output_dir={out}-2). Nothing was changed."
        )
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, saved)
    return out


def setup_model(cfg: Config) -> tuple[nn.Module, Any, Method, torch.device, str]:
    """(model with the method applied, tokenizer, method, device, resolved base path)."""
    device = pick_device(cfg.train.device)
    base_path = resolve_model_path(cfg.model.name)
    tokenizer = load_tokenizer(cfg.model, base_path)
    torch.manual_seed(cfg.train.seed)  # new parameters (LoRA A, heads) start the same every run
    model = load_model(cfg.model, device, base_path)
    method = build_method(cfg.method)
    model = method.apply(model)
    return model, tokenizer, method, device, base_path


def parameter_counts(model: nn.Module, method: Method) -> tuple[int, int]:
    trainable = sum(p.numel() for _, p in method.trainable_parameters())
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def save_artifacts(
    out: Path,
    cfg: Config,
    model: nn.Module,
    tokenizer: Any,
    method: Method,
    base_path: str,
    template: str | None,
    info: dict[str, Any],
) -> None:
    """Final model / adapter, tokenizer (with chat template) and ``run.json``."""
    method.save(out, base_path)
    if template:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(out)
    artifact = "model" if cfg.method.name == "full" else "adapter"
    run = {
        "task": cfg.task,
        "method": cfg.method.name,
        "artifact": artifact,
        "base_model": base_path,
        **info,
    }
    (out / "run.json").write_text(json.dumps(run, indent=2))
