"""``tunesmith eval``: held-out metrics of a run (or of a config's base model, for sft).

sft: loss, perplexity and exact match. reward: Bradley-Terry loss and pairwise accuracy. dpo:
the preference loss, implicit rewards, margin and accuracy against the run's reference (the base
with the method switched off, or the base model itself for full runs)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from tunesmith.config import Config, load_config
from tunesmith.data.batching import Batches
from tunesmith.data.dataset import prepare_data
from tunesmith.errors import TunesmithError
from tunesmith.generate import exact_match
from tunesmith.models import (
    is_run_dir,
    load_for_inference,
    load_model,
    pick_device,
    resolve_model_path,
)
from tunesmith.objectives.sft import SFTObjective
from tunesmith.training.loop import evaluate


def evaluate_target(
    target: str, overrides: Sequence[str] = (), samples: int = 200
) -> dict[str, Any]:
    """Metrics on the held-out split of the run's (or config's) data."""
    if is_run_dir(target):
        cfg = load_config(Path(target) / "config.yaml", overrides)
        model, tokenizer, _ = load_for_inference(target, pick_device(cfg.train.device))
    elif Path(target).is_file():
        cfg = load_config(target, overrides)
        model, tokenizer, _ = load_for_inference(
            resolve_model_path(cfg.model.name), pick_device(cfg.train.device)
        )
    else:
        raise TunesmithError(f"{target}: neither a tunesmith run folder nor a config file.")
    if cfg.task != "sft":
        if not is_run_dir(target):
            raise TunesmithError(
                f"{target}: a {cfg.task} config's base model has nothing to compare yet; evaluate a {cfg.task} run folder."
            )
        return _evaluate_pairs(cfg, model, tokenizer)
    data = prepare_data(cfg.data, tokenizer, cfg.train.seed)
    if not data.eval:
        raise TunesmithError(
            "data.eval: the config has no held-out split to evaluate on; set data.eval to a fraction or a file."
        )
    device = next(model.parameters()).device
    batches = Batches(
        data.eval,
        cfg.train.batch_size,
        cfg.data.max_length,
        tokenizer.pad_token_id,
        False,
        0,
        shuffle=False,
    )
    out: dict[str, Any] = {
        "eval_examples": len(data.eval),
        **evaluate(model, SFTObjective(), batches, device, cfg.train.precision),
    }
    if samples and data.format != "text":
        em = exact_match(model, tokenizer, data.eval_records, data.format, data.template, samples)
        out["exact_match"] = em.score
        out["exact_match_n"] = em.n
    return out


def _evaluate_pairs(cfg: Config, model: nn.Module, tokenizer: Any) -> dict[str, Any]:
    """Held-out preference metrics of a reward or DPO run, with its training objective."""
    from tunesmith.objectives.dpo import REFERENCE_FREE, DPOObjective
    from tunesmith.objectives.reward import RewardObjective

    data = prepare_data(cfg.data, tokenizer, cfg.train.seed, pairs=True)
    if not data.eval:
        raise TunesmithError("data.eval: the run's config has no held-out pairs to evaluate on.")
    device = next(model.parameters()).device
    if cfg.task == "reward":
        objective: Any = RewardObjective(cfg.reward.margin)
    elif cfg.dpo.loss in REFERENCE_FREE:
        objective = DPOObjective(cfg.dpo, None)
    else:
        from tunesmith.recipes.dpo import disabled_reference, model_reference

        method = getattr(model, "tunesmith_method", None)
        reference = (  # a parameter-efficient run: the base under it; a full run: its base model
            disabled_reference(method) if method else model_reference(load_model(cfg.model, device))
        )
        objective = DPOObjective(cfg.dpo, reference)
    pad = tokenizer.pad_token_id
    batches = Batches(
        data.eval,
        cfg.train.batch_size,
        cfg.data.max_length,
        pad,
        False,
        0,
        shuffle=False,
        pairs=True,
    )
    metrics = evaluate(model, objective, batches, device, cfg.train.precision)
    return {"eval_pairs": len(data.eval) // 2, **metrics}
