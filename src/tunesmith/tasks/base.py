"""The Task contract: what a task is, declared in one place, and the registry of tasks.

A task says what is learned. It declares the kind of record it trains on, the head its model
carries, how to build its objective, how to build its batch source, which loop runs it, its own
config section, extra held-out metrics, and what a comparison shows. Shared code (the run
pipeline, ``tunesmith eval``, ``compare``, ``data preview``, config validation) reads these
declarations and never tests a task's name. Adding a task is one file that calls ``register``
plus its import in ``tunesmith/tasks/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.config import Config, register_task_settings
from tunesmith.console import say
from tunesmith.data.batching import Batches, BatchSource
from tunesmith.data.dataset import PreparedData
from tunesmith.data.kinds import RecordKind
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.methods import Method
from tunesmith.objectives.sft import scores_shared_rows
from tunesmith.training.loop import Objective


@dataclass
class Context:
    """What a task's factories may use: the prepared pieces of a run (or of an evaluation)."""

    cfg: Config
    model: nn.Module
    tokenizer: Any
    method: Method | None
    """The method applied to ``model``; None for a whole model loaded back (a full run)."""
    device: torch.device
    data: PreparedData
    training: bool
    """True while setting up training; False when scoring a finished run."""
    starting_model: Callable[[], nn.Module]
    """Loads a fresh copy of the model training started from (a frozen reference, a teacher)."""
    out: Path | None = None
    shared: dict[str, Any] = field(default_factory=dict)
    """Objects a task's factories build once and share (a reward model, a reference policy)."""
    resume_source: dict[str, Any] | None = None
    """The batch source's state in the checkpoint a resumed run continues; None: a fresh run."""


def replayable(ctx: Context) -> BatchSource:
    """The default batch source: the training split, reshuffled every epoch, resumable."""
    d, t = ctx.cfg.data, ctx.cfg.train
    kind = TASKS[ctx.cfg.task].records
    share, possible = share_prompt(ctx)
    batches = Batches(
        ctx.data.train,
        t.batch_size,
        d.max_length,
        ctx.tokenizer.pad_token_id,
        resolve_packing(d.packing, ctx.method, kind),
        t.seed,
        group=kind.group,
        group_by_length=d.group_by_length,
        share_prefix=share,
        shareable=possible,
    )
    if share and ctx.training:
        say(
            f"data.share_prompt: {kind.unit} laid one per row with the prompt once, "
            f"{100 * batches.tokens_saved():.0f}% fewer tokens to compute"
        )
    return batches


def held_out(ctx: Context) -> Batches | None:
    """The held-out split as batches in a fixed order (similar lengths together), or None."""
    if not ctx.data.eval:
        return None
    kind = TASKS[ctx.cfg.task].records
    return Batches(
        ctx.data.eval,
        ctx.cfg.train.batch_size,
        ctx.cfg.data.max_length,
        ctx.tokenizer.pad_token_id,
        False,
        0,
        shuffle=False,
        group=kind.group,
        share_prefix=share_prompt(ctx)[0],
    )


AUTO_SHARE_DEVICES = ("cpu",)
"""Devices where ``data.share_prompt: auto`` lays pairs one per row: where it was measured faster
(bench/IDEAS.md); GPUs keep separate rows until it is measured there."""


def share_prompt(ctx: Context) -> tuple[bool, bool]:
    """``data.share_prompt`` resolved for this run: (whether pairs are laid one per row, whether
    they could be). They could when the task scores its records' rows only by their
    log-probabilities (``Task.shares_prompt``), the method leaves rows to the data, and the model
    scores a shared row as it scores separate rows (``sft.scores_shared_rows``, checked once).
    ``auto`` lays them so on CPU (``AUTO_SHARE_DEVICES``), and a resumed run as its checkpoint
    laid them, so that its batches, its cached reference and its held-out batches continue
    as they were (``auto`` may resolve otherwise on another device)."""
    setting, task = ctx.cfg.data.share_prompt, TASKS[ctx.cfg.task]
    if setting is False:
        return False, False
    if not task.shares_prompt or task.records.group < 2:
        if setting is True:
            raise ConfigError(
                f"data.share_prompt: task '{task.name}' does not score its rows by their "
                "log-probabilities alone, so rows cannot share a prompt; set it to auto or false."
            )
        return False, False
    if "share_prompt" not in ctx.shared:
        method_ok = ctx.method is None or ctx.method.packing_ok
        ctx.shared["share_prompt"] = method_ok and scores_shared_rows(
            ctx.model, ctx.cfg.data.max_length
        )
    possible = ctx.shared["share_prompt"]
    if setting is True and not possible:
        why = (
            f"method '{ctx.method.name}' puts virtual tokens in front of each row"
            if ctx.method is not None and not ctx.method.packing_ok
            else "this model does not score a row with its own 4-D mask as it scores separate "
            "rows (or limits attention to a window shorter than data.max_length)"
        )
        if ctx.resume_source is not None:  # the setting cannot change on resume
            raise TunesmithError(
                f"--resume: data.share_prompt is true, but {why} here; resume the run where it "
                "started (the same device, model and library versions)."
            )
        raise ConfigError(f"data.share_prompt: {why}; set it to auto or false.")
    chosen = setting is True or ctx.device.type in AUTO_SHARE_DEVICES
    saved = (ctx.resume_source or {}).get("share_prefix")
    if setting == "auto" and saved is not None:
        if bool(saved) != chosen and "share_prompt_resumed" not in ctx.shared:
            ctx.shared["share_prompt_resumed"] = True
            say(
                "--resume: data.share_prompt: auto keeps the checkpoint's layout ("
                + ("one row" if saved else "two rows")
                + " per pair), so the batches continue exactly"
            )
        chosen = bool(saved)  # shared but impossible here: Batches.load_state_dict says why
    return possible and chosen, possible


def record_counts(data: PreparedData, kind: RecordKind) -> tuple[int, int]:
    """(train, held-out) records of ``kind`` that training uses: tokenised groups, or the records
    themselves for kinds whose rows are produced while training."""
    if kind.tokenized:
        return len(data.train) // kind.group, len(data.eval) // kind.group
    return len(data.train_records), len(data.eval_records)


def resolve_packing(setting: bool | str, method: Method | None, kind: RecordKind) -> bool:
    """``data.packing`` for this method and record kind. ``auto`` does not pack: length-grouped
    batches of one example per row were faster and leaner than packed rows on every workload
    of bench/IDEAS.md (packed rows attend over the whole row, and fill ``batch_size`` rows of
    ``max_length`` tokens)."""
    allowed = kind.packable and (method is None or method.packing_ok)
    if setting == "auto":
        return False
    if setting and method is not None and not method.packing_ok:
        raise ConfigError(
            f"data.packing: method '{method.name}' puts virtual tokens in front of each row, so a row "
            "cannot hold several examples; set data.packing=false (or auto)."
        )
    return bool(setting) and allowed


@dataclass(frozen=True)
class Task:
    name: str
    about: str
    """One line for the CLI and the README's table."""
    records: RecordKind
    """What one training record is (examples, preference pairs, ...)."""
    head: str
    """The model's head, a name in ``tunesmith.models.HEADS``."""
    objective: Callable[[Context], Objective]
    """Builds the loss (bringing a reference, a teacher or a reward source if it needs one)."""
    section: type | None = None
    """The task's own config section, a dataclass found in YAML under the task's name."""
    check: Callable[[Config], None] | None = None
    """Validation across sections, run when a config naming this task is loaded."""
    source: Callable[[Context], BatchSource] = replayable
    """Builds the training batch source: the data set (default) or a producer such as rollouts."""
    evals: Callable[[Context], Any] = held_out
    """Builds the held-out batches the objective scores (``one_pass()``, ``examples``), or None:
    the held-out split (default) or, for RL, held-out prompts answered by the policy."""
    loop: str = "supervised"
    """The loop that runs it, a name in ``tunesmith.training.loop.LOOPS``."""
    extra_eval: Callable[[Context, int], dict[str, Any]] | None = None
    """Held-out metrics beyond the objective's (e.g. exact match of generations), given a
    sample budget; None for none."""
    compare_metrics: tuple[str, ...] = ("eval_loss",)
    """Held-out metrics a comparison of methods shows, besides the measurements of the run."""
    base_comparable: bool = False
    """Whether the untrained starting model can be scored too (a baseline row in comparisons)."""
    report_series: tuple[str, ...] = ()
    """Logged metrics the run report plots, one panel each, beside the loss curve."""
    rising: tuple[str, ...] = ()
    """Logged held-out metrics that rise as the task is learned (``eval_loss`` always falls)."""
    shares_prompt: bool = False
    """Whether the objective reads each row of a record only through its summed token
    log-probabilities (``sft.sequence_logps``), so the rows of a record (a pair's responses) may
    share one row with their common prompt computed once (``data.share_prompt``)."""
    batch_is_global: bool = False
    """Whether ``train.batch_size`` is already the global batch under torchrun (the RL producers
    split each rollout batch's prompts between processes), rather than a per-process batch that
    the number of processes multiplies."""
    prepare: Callable[[Config], None] | None = None
    """Fills settings that come from the data before anything is saved or loaded (classify: the
    class list, which sizes the head); None for none."""
    report: Callable[[Context], tuple[dict[str, Any], str]] | None = None
    """After training: held-out metrics over the whole split and a Markdown section for
    ``report.md`` (classify: macro-F1 and the confusion matrix); None for none."""


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Make ``task`` available as ``task: NAME`` in configs (and its section as ``NAME:``)."""
    TASKS[task.name] = task
    register_task_settings(task.name, task.section, task.check)
    return task


def get_task(name: str) -> Task:
    return TASKS[name]


def task_names() -> list[str]:
    return list(TASKS)


def matrix_markdown() -> str:
    """The task x method table (README, ``tunesmith tasks``), from the two registries: each cell
    is what a run of that pair saves. The matrix test runs every cell."""
    from tunesmith.methods.base import method_class, method_names
    from tunesmith.models import HEADS

    methods = method_names()
    lines = [
        "| task | trains on | " + " | ".join(methods) + " |",
        "| --- | --- | " + " | ".join("---" for _ in methods) + " |",
    ]
    for task in TASKS.values():
        whole = HEADS[task.head].saved_whole
        cells = []
        for name in methods:
            cls = method_class(name)
            cells.append("merged model" if whole and cls.mergeable else cls.artifact)
        lines.append(f"| `{task.name}` | {task.records.unit} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
