"""``tunesmith eval``: held-out metrics of a run (or of a config's starting model).

Every task is scored the same way, from its declaration: the task's own objective on the held-out
split (with the reference the run trained against, where it has one), plus the task's extra
metrics (for sft, exact match of greedy generations).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunesmith.config import Config, load_config
from tunesmith.console import say
from tunesmith.data.dataset import prepare_data
from tunesmith.data.provenance import changed_data
from tunesmith.errors import TunesmithError
from tunesmith.models import (
    head_kwargs,
    is_run_dir,
    load_for_inference,
    load_model,
    pick_device,
    resolve_model_path,
)
from tunesmith.tasks import Context, get_task
from tunesmith.tasks.base import record_counts
from tunesmith.training.loop import evaluate
from tunesmith.training.precision import settle_precision


def warn_if_data_changed(run: Path, cfg: Config) -> list[str]:
    """Say in one line when the run's data files changed since it trained; return the changes."""
    try:
        saved = json.loads((run / "run.json").read_text()).get("data")
    except (OSError, ValueError):
        return []
    changes = changed_data(saved, cfg) if isinstance(saved, dict) else []
    if changes:
        say(
            f"warning: the data changed since {run} trained, so these metrics are not on the data "
            f"it saw: {'; '.join(changes)}"
        )
    return changes


def evaluate_target(
    target: str, overrides: Sequence[str] = (), samples: int = 200
) -> dict[str, Any]:
    """Metrics on the held-out split of the run's (or config's) data."""
    if is_run_dir(target):
        cfg = load_config(Path(target) / "config.yaml", overrides)
        warn_if_data_changed(Path(target), cfg)
        model, tokenizer, _ = load_for_inference(target, pick_device(cfg.train.device))
    elif Path(target).is_file():
        cfg = load_config(target, overrides)
        if not get_task(cfg.task).base_comparable:
            raise TunesmithError(
                f"{target}: a {cfg.task} config's starting model has nothing to compare yet; evaluate a {cfg.task} run folder."
            )
        model, tokenizer, _ = load_for_inference(
            resolve_model_path(cfg.model.name), pick_device(cfg.train.device)
        )
    else:
        raise TunesmithError(f"{target}: neither a tunesmith run folder nor a config file.")
    task = get_task(cfg.task)
    data = prepare_data(cfg.data, tokenizer, cfg.train.seed, task.records)
    if not record_counts(data, task.records)[1]:
        raise TunesmithError(
            "data.eval: the config has no held-out split to evaluate on; set data.eval to a fraction or a file."
        )
    device = next(model.parameters()).device
    settle_precision(cfg.train, device, model)
    ctx = Context(
        cfg,
        model,
        tokenizer,
        getattr(model, "tunesmith_method", None),
        device,
        data,
        training=False,
        starting_model=lambda: load_model(
            cfg.model, device, head=task.head, extra=head_kwargs(cfg, task.head)
        ),
    )
    batches = task.evals(ctx)
    out: dict[str, Any] = {
        f"eval_{task.records.unit}": record_counts(data, task.records)[1],
        **evaluate(model, task.objective(ctx), batches.one_pass(), device, cfg.train.precision),
    }
    if task.extra_eval is not None:
        out.update(task.extra_eval(ctx, samples))
    return out
