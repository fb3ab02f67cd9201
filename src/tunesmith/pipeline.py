"""From a config to a trained run: set up (run folder, model, method, data, objective, batch
source), then the task's loop, then the artifacts and the report.

Every task goes through the same two functions; what differs between tasks is read from the
task's declaration (``tunesmith.tasks``), never from its name. ``tunesmith.train`` is
``ensure_model`` then ``run_training``: ``setup_run`` -> the task's loop -> ``finish_run``.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from tunesmith.config import Config, load_config, save_config
from tunesmith.console import say
from tunesmith.data.batching import Batches, BatchSource
from tunesmith.data.dataset import prepare_data
from tunesmith.data.provenance import provenance
from tunesmith.errors import SaveError, TunesmithError
from tunesmith.methods import Method, build_method
from tunesmith.models import (
    HEADS,
    apply_method,
    head_kwargs,
    load_model,
    load_tokenizer,
    pick_device,
    resolve_model_path,
)
from tunesmith.paths import share_weights
from tunesmith.report import write_report
from tunesmith.tasks import Context, Task, get_task
from tunesmith.tasks.base import record_counts
from tunesmith.training import distributed
from tunesmith.training.checkpoint import (
    io_reason,
    latest_complete,
    latest_complete_name,
    list_checkpoints,
)
from tunesmith.training.distributed import launched_world, local_device, on_main
from tunesmith.training.guard import ADVICE, NonFiniteError
from tunesmith.training.loop import LOOPS, LoopResult, Objective
from tunesmith.training.memory import PRELOADED, cap_kernel_caches, set_cpu_malloc
from tunesmith.training.precision import settle_precision


@dataclass
class RunResult:
    output_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """A run ready for its loop."""

    task: Task
    ctx: Context
    objective: Objective
    source: BatchSource
    evals: Batches | None
    base_path: str
    trainable: int
    total: int
    resume_from: Path | None = None
    """The verified checkpoint the loop continues from (None: from step 0)."""


RESUME_MAY_CHANGE = frozenset(
    f"train.{k}"
    for k in (
        "progress",
        "strategy",
        "fsdp_cpu_offload",
        "lr",
        "max_grad_norm",
        "precision",
        "nan_policy",
        "max_nan_steps",
        "save_every",
        "keep_checkpoints",
        "log_every",
        "eval_every",
        "eval_batches",
    )
)
"""Settings a resumed run may change: how it logs and saves, and the remedies a stop on NaN/inf
suggests (a lower peak lr, fp32, clipping). Anything else must match the checkpoint's run."""


def _at(d: dict[str, Any], dotted: str) -> Any:
    section, key = dotted.split(".", 1)
    return d.get(section, {}).get(key)


def prepare_output_dir(cfg: Config, resume: bool) -> tuple[Path, Path | None]:
    """Create the run folder (refusing to overwrite a run); with ``resume``, pick the newest
    complete checkpoint and check the config is the run's. Returns (folder, checkpoint or None).

    ``--resume`` on a folder with no complete checkpoint yet starts from step 0 and says so, so a
    scheduler can relaunch the same command after a preemption whenever it happened.
    """
    out = Path(cfg.output_dir)
    saved = out / "config.yaml"
    if resume:
        start = latest_complete(out / "checkpoints", say)
        if start is None:
            if (out / "run.json").exists():
                raise TunesmithError(
                    f"--resume: {out} holds a finished run (run.json) and no checkpoint to continue; "
                    f"nothing to do. Choose another output_dir to train again."
                )
            say(
                f"--resume: no complete checkpoint in {out / 'checkpoints'} yet; starting from step 0."
            )
            out.mkdir(parents=True, exist_ok=True)
            _write_config(cfg, saved)
            return out, None
        before = load_config(saved).to_dict()
        now = cfg.to_dict()
        diff = [
            f"{s}.{k}"
            for s in now
            if isinstance(now[s], dict)
            for k in now[s]
            if before.get(s, {}).get(k) != now[s][k]
        ]
        diff += [s for s in now if not isinstance(now[s], dict) and before.get(s) != now[s]]
        fixed = [k for k in diff if k not in RESUME_MAY_CHANGE]
        _check_global_batch(cfg, start)
        if fixed:
            fixed = [k for k in fixed if k not in ("train.batch_size", "train.grad_accum")]
        if fixed:
            raise TunesmithError(
                f"--resume: the config differs from the run's saved config at {', '.join(fixed)}; "
                f"resume with the same config (only {', '.join(sorted(RESUME_MAY_CHANGE))} may change)."
            )
        changed = [k for k in diff if k != "train.progress"]
        if changed:
            say(
                "resuming with changed "
                + ", ".join(f"{k} ({_at(before, k)} -> {_at(now, k)})" for k in changed)
                + "; the run's config.yaml now says so."
            )
            _write_config(cfg, saved)
        return out, start
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
    _write_config(cfg, saved)
    return out, None


def _checkpoint_state(start: Path) -> dict[str, Any]:
    """The ``state.json`` of the checkpoint a resumed run continues (step, loop, scheduler)."""
    return json.loads((start / "state.json").read_text())


def _saved_source(start: Path | None) -> dict[str, Any] | None:
    """The batch source's state in the checkpoint a resumed run continues (None: a fresh run)."""
    return None if start is None else _checkpoint_state(start)["loop"].get("source", {})


def _check_global_batch(cfg: Config, start: Path) -> None:
    """A resumed run may split its global batch differently (another number of processes) but
    must keep it: train.batch_size x train.grad_accum x processes as the checkpoint's run had
    (x 1 for a task whose ``train.batch_size`` is already global: the RL producers)."""
    saved = _checkpoint_state(start)
    before = load_config(start.parent.parent / "config.yaml").train
    per_process = not get_task(cfg.task).batch_is_global
    world_before = saved["loop"].get("world_size", 1) if per_process else 1
    world_now = launched_world() if per_process else 1
    was = before.batch_size * before.grad_accum * world_before
    now = cfg.train.batch_size * cfg.train.grad_accum * world_now
    if was != now:
        raise TunesmithError(
            f"--resume: train.batch_size x train.grad_accum x processes is {cfg.train.batch_size} x "
            f"{cfg.train.grad_accum} x {world_now} = {now}, but the run trained with "
            f"{before.batch_size} x {before.grad_accum} x {world_before} = {was}; keep the global "
            f"batch the same (e.g. double train.batch_size or train.grad_accum on half the "
            f"processes)."
        )


def _write_config(cfg: Config, path: Path) -> None:
    """``config.yaml``, replaced in one rename so a crash never leaves half of it."""
    tmp = path.with_name(path.name + ".tmp")
    save_config(cfg, tmp)
    os.replace(tmp, path)


def setup_model(
    cfg: Config, head: str = "lm", device: torch.device | None = None
) -> tuple[nn.Module, Any, Method, str]:
    """(model with the method applied, tokenizer, method, resolved base path).

    A new head module (a reward model's score) always trains, whatever the method: the method
    decides which *backbone* weights change.
    """
    device = device or pick_device(cfg.train.device)
    base_path = resolve_model_path(cfg.model.name)
    tokenizer = load_tokenizer(cfg.model, base_path)
    torch.manual_seed(cfg.train.seed)  # new parameters (LoRA A, heads) start the same every run
    model = load_model(cfg.model, device, base_path, head, head_kwargs(cfg, head))
    method = build_method(cfg.method)
    return apply_method(model, method, head, tokenizer), tokenizer, method, base_path


def parameter_counts(model: nn.Module, method: Method) -> tuple[int, int]:
    trainable = sum(p.numel() for _, p in method.trainable_parameters())
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def setup_run(cfg: Config, resume: bool = False) -> Run:
    """Everything the loop needs, built from the task's declaration."""
    task = get_task(cfg.task)
    if task.prepare is not None:
        task.prepare(cfg)
    out, start = on_main(lambda: prepare_output_dir(cfg, resume))  # rank 0 writes, all agree
    device = local_device(pick_device(cfg.train.device))
    set_cpu_malloc(device, cfg.train.cpu_memory)
    cap_kernel_caches(device, cfg.train.cpu_memory)  # before the first bf16 product (module doc)
    if device.type == "cpu" and (library := os.environ.get(PRELOADED)):
        mode = cfg.train.cpu_memory
        under = "" if mode == "fast" else f" by the parent (train.cpu_memory: {mode} cannot apply)"
        say(f"cpu memory: {library} preloaded{under}")
    model, tokenizer, method, base_path = setup_model(cfg, task.head, device)
    settle_precision(cfg.train, device, model)
    data = prepare_data(cfg.data, tokenizer, cfg.train.seed, task.records)
    for note in data.notes:
        say(note)
    ctx = Context(
        cfg,
        model,
        tokenizer,
        method,
        device,
        data,
        training=True,
        starting_model=lambda: load_model(
            cfg.model, device, base_path, task.head, head_kwargs(cfg, task.head)
        ),
        out=out,
        resume_source=_saved_source(start),
    )
    trainable, total = parameter_counts(model, method)
    unit = task.records.unit
    n_train, n_eval = record_counts(data, task.records)
    tokens = (  # kinds whose rows are made while training (sampled responses) have none yet
        f"{data.stats.tokens:,} tokens ({100 * data.stats.supervised / max(data.stats.tokens, 1):.0f}% scored), "
        if task.records.tokenized
        else ""
    )
    say(
        f"{cfg.task} with {cfg.method.name} on {cfg.model.name}: {trainable:,} of {total:,} parameters train "
        f"({100 * trainable / total:.2f}%); {n_train} train / {n_eval} eval {unit}, {tokens}device {device}"
    )
    wrapped = method.wrapped_modules()
    if wrapped:
        kinds = sorted({name.rsplit(".", 1)[-1] for name in wrapped})
        say(f"{method.name} wraps {len(wrapped)} modules ({', '.join(kinds)})")
    objective = task.objective(ctx)
    source = task.source(ctx)
    return Run(task, ctx, objective, source, task.evals(ctx), base_path, trainable, total, start)


def run_training(cfg: Config, resume: bool = False) -> RunResult:
    """Set up the run of ``cfg`` (whose model must be loadable), train it, save it.

    ``resume`` continues from the newest complete checkpoint in ``output_dir`` (or starts from
    step 0 when there is none yet). A SIGTERM / SIGINT during training ends in
    :class:`~tunesmith.training.guard.Interrupted` after a checkpoint is written.
    """
    distributed.setup(cfg.train)
    try:
        run = setup_run(cfg, resume)
        c = run.ctx
        result = LOOPS[run.task.loop](
            c.model,
            c.method,
            run.objective,
            run.source,
            run.evals,
            cfg.train,
            c.out,
            c.device,
            run.resume_from or False,
        )
        main = distributed.current().is_main
        if result.gather is not None:  # FSDP: rank 0 gets a whole model to save
            whole = None
            if main:  # loaded again as training started (the frozen weights are those on disk)
                whole, _, method, _ = setup_model(cfg, run.task.head, c.device)
                c.model, c.method = whole, method
            result.gather(whole)
        if not main:  # rank 0 saves the artifacts and the report
            return RunResult(c.out, {"steps": result.steps, "train_loss": result.final_train_loss})
        return finish_run(run, result)
    finally:
        distributed.teardown()


def finish_run(run: Run, result: LoopResult) -> RunResult:
    """Save the artifacts and the report; return the run's measurements."""
    ctx, task = run.ctx, run.task
    info = {
        "steps": result.steps,
        "train_loss": result.final_train_loss,
        **result.eval,
        "tokens_per_s": result.tokens_per_s,
        "train_seconds": result.train_seconds,
        "peak_memory_mb": result.peak_memory_mb,
        "trainable_params": run.trainable,
        "total_params": run.total,
        f"train_{task.records.unit}": record_counts(ctx.data, task.records)[0],
        "truncated": ctx.data.stats.truncated,
    }
    if isinstance(run.source, Batches):
        info["packing_efficiency"] = run.source.packing_efficiency()
    bad = next(
        (k for k, t in ctx.method.state_dict().items() if not bool(torch.isfinite(t).all())), None
    )
    if bad is not None:  # never write NaN/inf weights as the run's result
        last = latest_complete_name(ctx.out / "checkpoints")
        raise NonFiniteError(
            f"final weights: {bad} holds NaN/inf, so the run was not saved"
            f"{f'; the last good checkpoint {last} is intact' if last else ''}; {ADVICE}."
        )
    section = ""
    if task.report is not None and ctx.data.eval:
        metrics, section = task.report(ctx)
        info.update(metrics)
    try:
        save_artifacts(ctx, task, run.base_path, info)
        write_report(ctx.out, ctx.cfg, info, result.history, section, series=task.report_series)
    except (OSError, SafetensorError) as e:
        last = latest_complete_name(ctx.out / "checkpoints")
        kept = (
            f"the last checkpoint {last} is intact: free space and run the same command with "
            f"--resume to save again"
            if last
            else "no checkpoint was written (set train.save_every to keep one)"
        )
        (ctx.out / "run.json.tmp").unlink(missing_ok=True)
        where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
        raise SaveError(
            f"final save to {ctx.out} failed{where} ({io_reason(e)}); {kept}."
        ) from None
    shown = ", ".join(f"{k} {v:.4f}" for k, v in result.eval.items())
    speed = (
        f"{result.tokens_per_s:,.0f} tokens/s" if result.tokens_per_s else "no step left to train"
    )
    say(
        f"done in {result.train_seconds:.0f}s ({speed}); {shown or 'no eval split'}; saved to {ctx.out}"
    )
    return RunResult(ctx.out, info)


def environment(device: torch.device) -> dict[str, str]:
    """The versions and device a run was made with, so a number can be traced to its install."""
    from importlib.metadata import PackageNotFoundError, version

    env = {"device": str(device), "python": platform.python_version()}
    for package in ("tunesmith", "torch", "transformers", "peft"):
        try:
            env[package] = version(package)
        except PackageNotFoundError:
            continue
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def save_artifacts(ctx: Context, task: Task, base_path: str, info: dict[str, Any]) -> None:
    """Final model / adapter, tokenizer (with chat template) and ``run.json``.

    A head declared ``saved_whole`` is saved as a whole model with the method merged in (when the
    method is mergeable), so transformers loads it on its own; otherwise the method writes its
    own artifact (a whole model for ``full``, an adapter for the others).
    """
    out, method = ctx.out, ctx.method
    if HEADS[task.head].saved_whole and method.mergeable:
        if method.artifact == "adapter":  # the PEFT layout too (task type, head alongside)
            method.save(out / "adapter", base_path)
        method.merge().save_pretrained(out, safe_serialization=True)
        artifact = "model"
    else:
        if HEADS[task.head].saved_whole:
            say(
                f"method '{method.name}' cannot be merged; saving its weights and the head in the method's layout."
            )
        method.save(out, base_path)
        artifact = method.artifact
    if ctx.data.template:
        ctx.tokenizer.chat_template = ctx.data.template
    ctx.tokenizer.save_pretrained(out)
    share_weights(out)
    run = {
        "task": task.name,
        "head": task.head,
        "method": method.name,
        "artifact": artifact,
        "base_model": base_path,
        **info,
        "data": provenance(ctx.cfg),  # fingerprints: `tunesmith eval` warns when they change
        "environment": environment(ctx.device),
    }
    # Written last and in one rename: run.json marks a run whose artifacts are complete.
    tmp = out / "run.json.tmp"
    tmp.write_text(json.dumps(run, indent=2))
    os.replace(tmp, out / "run.json")
