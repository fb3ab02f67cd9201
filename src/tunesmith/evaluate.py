"""``tunesmith eval``: held-out loss, perplexity and exact match for a run or a config's base model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunesmith.config import load_config
from tunesmith.data.batching import Batches
from tunesmith.data.dataset import prepare_data
from tunesmith.errors import TunesmithError
from tunesmith.generate import exact_match
from tunesmith.models import is_run_dir, load_for_inference, pick_device, resolve_model_path
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
        raise TunesmithError(
            f"tunesmith eval scores sft runs; a {cfg.task} run's held-out metrics are in its metrics.jsonl and report.md."
        )
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
