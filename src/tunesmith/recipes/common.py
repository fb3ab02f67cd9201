"""What every recipe shares: the run folder, model set-up and the final artifacts."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.config import Config, load_config, save_config
from tunesmith.data.batching import Batches
from tunesmith.data.dataset import PreparedData, prepare_data
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.methods import Method, build_method
from tunesmith.models import load_model, load_tokenizer, pick_device, resolve_model_path
from tunesmith.report import write_report
from tunesmith.training.checkpoint import list_checkpoints
from tunesmith.training.loop import Objective, train_loop


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


HEADS = ("score", "classifier")  # task heads of *ForSequenceClassification models


def setup_model(cfg: Config, head: str = "lm") -> tuple[nn.Module, Any, Method, torch.device, str]:
    """(model with the method applied, tokenizer, method, device, resolved base path).

    A new task head (``head="reward"``) always trains, whatever the method: the method decides
    which *backbone* weights change.
    """
    device = pick_device(cfg.train.device)
    base_path = resolve_model_path(cfg.model.name)
    tokenizer = load_tokenizer(cfg.model, base_path)
    torch.manual_seed(cfg.train.seed)  # new parameters (LoRA A, heads) start the same every run
    model = load_model(cfg.model, device, base_path, head)
    if head != "lm":
        model.config.pad_token_id = tokenizer.pad_token_id
    method = build_method(cfg.method)
    model = method.apply(model)
    for name in HEADS:
        if head != "lm" and hasattr(model, name):
            getattr(model, name).requires_grad_(True)
    return model, tokenizer, method, device, base_path


def resolve_packing(setting: bool | str, method: Method) -> bool:
    """``data.packing`` for this method: ``auto`` packs when the method allows it."""
    if setting == "auto":
        return method.packing_ok
    if setting and not method.packing_ok:
        raise ConfigError(
            f"data.packing: method '{method.name}' puts virtual tokens in front of each row, so a row "
            "cannot hold several examples; set data.packing=false (or auto)."
        )
    return bool(setting)


def parameter_counts(model: nn.Module, method: Method) -> tuple[int, int]:
    trainable = sum(p.numel() for _, p in method.trainable_parameters())
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


@dataclass
class Context:
    """What a recipe's objective may need: the prepared pieces of the run."""

    cfg: Config
    model: nn.Module
    tokenizer: Any
    method: Method
    device: torch.device
    data: PreparedData
    out: Path


def train_task(
    cfg: Config,
    resume: bool,
    make_objective: Callable[[Context], Objective],
    pairs: bool = False,
    head: str = "lm",
) -> RunResult:
    """The shared supervised pipeline: set up, prepare data, train, save, report.

    A recipe supplies its objective (and whether its data are preference pairs, and which head
    the model carries); everything else is the same for sft, reward and dpo.
    """
    out = prepare_output_dir(cfg, resume)
    model, tokenizer, method, device, base_path = setup_model(cfg, head)
    data = prepare_data(cfg.data, tokenizer, cfg.train.seed, pairs=pairs)
    for note in data.notes:
        say(note)
    d, t = cfg.data, cfg.train
    pad = tokenizer.pad_token_id
    packing = resolve_packing(d.packing, method)
    train = Batches(data.train, t.batch_size, d.max_length, pad, packing, t.seed, pairs=pairs)
    evals = (
        Batches(
            data.eval, t.batch_size, d.max_length, pad, False, t.seed, shuffle=False, pairs=pairs
        )
        if data.eval
        else None
    )
    trainable, total = parameter_counts(model, method)
    unit = "pairs" if pairs else "examples"
    n_train, n_eval = (
        (len(data.train) // 2, len(data.eval) // 2) if pairs else (len(data.train), len(data.eval))
    )
    say(
        f"{cfg.task} with {cfg.method.name} on {cfg.model.name}: {trainable:,} of {total:,} parameters train "
        f"({100 * trainable / total:.2f}%); {n_train} train / {n_eval} eval {unit}, {data.stats.tokens:,} tokens "
        f"({100 * data.stats.supervised / max(data.stats.tokens, 1):.0f}% scored), device {device}"
    )
    objective = make_objective(Context(cfg, model, tokenizer, method, device, data, out))
    result = train_loop(model, method, objective, train, evals, t, out, device, resume)
    info = {
        "steps": result.steps,
        "train_loss": result.final_train_loss,
        **result.eval,
        "tokens_per_s": result.tokens_per_s,
        "train_seconds": result.train_seconds,
        "peak_memory_mb": result.peak_memory_mb,
        "trainable_params": trainable,
        "total_params": total,
        f"train_{unit}": n_train,
        "truncated": data.stats.truncated,
        "packing_efficiency": train.packing_efficiency(),
    }
    save_artifacts(out, cfg, model, tokenizer, method, base_path, data.template, info, head)
    write_report(out, cfg, info, result.history)
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result.eval.items())
    say(
        f"done in {result.train_seconds:.0f}s ({result.tokens_per_s:,.0f} tokens/s); {shown or 'no eval split'}; saved to {out}"
    )
    return RunResult(out, info)


def save_artifacts(
    out: Path,
    cfg: Config,
    model: nn.Module,
    tokenizer: Any,
    method: Method,
    base_path: str,
    template: str | None,
    info: dict[str, Any],
    head: str = "lm",
) -> None:
    """Final model / adapter, tokenizer (with chat template) and ``run.json``.

    A model with a new task head is saved whole (the method merged into it), so transformers
    loads it as a sequence-classification model on its own.
    """
    if head == "lm":
        method.save(out, base_path)
        artifact = "model" if cfg.method.name == "full" else "adapter"
    else:
        try:
            method.merge().save_pretrained(out, safe_serialization=True)
            artifact = "model"
        except TunesmithError as e:  # a method that cannot be folded in: keep its own layout
            say(
                f"{e} Saving the {cfg.method.name} weights and the head in the method's layout instead."
            )
            method.save(out, base_path)
            artifact = "adapter"
    if template:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(out)
    run = {
        "task": cfg.task,
        "head": head,
        "method": cfg.method.name,
        "artifact": artifact,
        "base_model": base_path,
        **info,
    }
    (out / "run.json").write_text(json.dumps(run, indent=2))
