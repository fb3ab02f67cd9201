"""The training loop, shared by every task: a task hands it a batch source and an objective.

The loop owns the optimiser, accumulation, precision, evaluation, checkpoints, logging and
progress. The source is a replayable data set or a producer (rollouts); both resume exactly from
the state saved in each checkpoint. It also decides how a run stops early (``training.guard``): a
SIGTERM / SIGINT finishes the current step, writes a checkpoint and raises ``Interrupted``; a
step with a non-finite loss or gradient norm is never applied (skipped and counted, or the run
stops, per ``train.nan_policy``). An objective is any object with

    count(batch) -> int                        # normaliser contribution (tokens, pairs, ...)
    __call__(model, batch) -> (loss_sum, metrics)

and one optimiser step minimises ``sum_micro loss_sum / sum_micro count`` over its micro-batches.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from tunesmith.config import TrainConfig
from tunesmith.console import say
from tunesmith.data.batching import Batch, Batches, BatchSource
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.methods.base import Method
from tunesmith.training.checkpoint import latest_complete, load_checkpoint, save_checkpoint
from tunesmith.training.compile import compile_layers
from tunesmith.training.distributed import Parallel, all_max, all_sum, current, raise_agreed
from tunesmith.training.guard import Interrupted, NanGuard, SignalGuard
from tunesmith.training.logging import MetricsLog, progress
from tunesmith.training.optim import build_optimizer, build_scheduler
from tunesmith.training.precision import autocast


class Objective(Protocol):
    def count(self, batch: Batch) -> int: ...
    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]: ...


@dataclass
class LoopResult:
    steps: int
    final_train_loss: float
    eval: dict[str, float]
    tokens_per_s: float
    train_seconds: float
    peak_memory_mb: float
    history: list[dict[str, Any]] = field(default_factory=list)
    gather: Callable[[nn.Module | None], None] | None = None
    """FSDP: a collective that copies the trained weights, gathered whole, into rank 0's plain
    model (None on other ranks); None when the model itself holds them whole."""


def total_steps(cfg: TrainConfig, micro_batches_per_epoch: int | None) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    if micro_batches_per_epoch is None:
        raise ConfigError(
            "train.max_steps: this task produces its batches while it trains (no epochs); set train.max_steps."
        )
    return max(1, math.ceil(cfg.epochs * micro_batches_per_epoch / cfg.grad_accum))


def _add(total: dict[str, float], part: dict[str, float]) -> None:
    for k, v in part.items():
        total[k] = total.get(k, 0.0) + v


@dataclass
class StepResult:
    loss: float
    metrics: dict[str, float]
    grad_norm: float
    tokens: int
    applied: bool = True
    """False when the loss or the gradient norm was NaN/inf: the update was dropped."""


def train_step(
    model: nn.Module,
    objective: Objective,
    micro: list[Batch],
    opt: torch.optim.Optimizer,
    sched: Any,
    params: list[nn.Parameter],
    cfg: TrainConfig,
    device: torch.device,
    par: Parallel | None = None,
    count: int | None = None,
) -> StepResult:
    """One optimiser step over ``micro``: forward, loss, backward, clip, step.

    Each micro-batch's summed loss is divided by the count of the *whole* step, so the gradient
    is that of one big batch whatever the split into micro-batches. Objectives report metrics as
    sums over their rows; they are averaged by the same count. Under torchrun (``par``) the
    count, loss and metrics are sums over every rank's micro-batches (``count`` is given,
    already summed) and the loss is scaled by the number of ranks, whose gradients DDP / FSDP
    average (``training.distributed``).
    """
    if count is None:
        count = sum(objective.count(b) for b in micro)
    count = max(count, 1)
    scale = 1.0 if par is None else par.loss_scale
    loss_sum, metrics = 0.0, {}
    for k, batch in enumerate(micro):
        with contextlib.nullcontext() if par is None else par.sync(k == len(micro) - 1):
            with autocast(device, cfg.precision):
                part, m = objective(model, batch.to(device))
            ((part * scale if scale != 1.0 else part) / count).backward()
        loss_sum += float(part.detach())
        _add(metrics, m)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf")))
    tokens = sum(b.n_tokens for b in micro)
    if par is not None and par.dist.active:  # every rank logs and decides on the same numbers
        keys = sorted(metrics)
        total = all_sum([loss_sum, float(tokens), *(metrics[k] for k in keys)])
        loss_sum, tokens = total[0], int(total[1])
        metrics = dict(zip(keys, total[2:]))
    applied = NanGuard.finite(loss_sum, grad_norm)
    if applied:
        opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return StepResult(
        loss_sum / count,
        {k: v / count for k, v in metrics.items()},
        grad_norm,
        tokens,
        applied,
    )


def next_step_batches(
    stream: Iterator[Batch], objective: Objective, n: int
) -> tuple[list[Batch], int]:
    """The step's micro-batches and their count summed over ranks. A rank that cannot make its
    batches makes every rank raise its error (``raise_agreed``), so none waits forever for the
    others in a collective."""
    micro: list[Batch] = []
    error: BaseException | None = None
    try:
        micro = [next(stream) for _ in range(n)]
    except TunesmithError as e:
        error = e
    if not current().active:
        if error is not None:
            raise error
        return micro, sum(objective.count(b) for b in micro)
    local = sum(objective.count(b) for b in micro)
    count, failed = all_sum([float(local), float(error is not None)])
    if failed:
        raise_agreed(error)
    return micro, int(count)


def agreed_signal(guard: SignalGuard) -> int | None:
    """The signal that stops the run, agreed by every rank (a signal on any rank stops all)."""
    if not current().active:
        return guard.signum
    signum = int(all_max([float(guard.signum or 0)])[0])
    return signum or None


def retarget_lr(opt: torch.optim.Optimizer, sched: Any, lr: float) -> None:
    """Give a restored optimiser and schedule the peak lr ``lr`` (the checkpoint carries the one
    it was written with): a resumed run may lower it. Same lr: nothing changes, bit for bit."""
    if all(base == lr for base in sched.base_lrs):
        return
    sched.base_lrs = [lr for _ in sched.base_lrs]
    factors = [f(sched.last_epoch) for f in sched.lr_lambdas]
    for group, f in zip(opt.param_groups, factors):
        group["initial_lr"], group["lr"] = lr, lr * f
    sched._last_lr = [g["lr"] for g in opt.param_groups]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    objective: Objective,
    batches: Iterable[Batch],
    device: torch.device,
    precision: str,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Mean loss and metrics per counted unit over the held-out batches (plus perplexity for
    token losses)."""
    was_training = model.training
    model.eval()
    loss_sum, count, metrics = 0.0, 0, {}
    for k, batch in enumerate(batches):
        if max_batches is not None and k >= max_batches:
            break
        batch = batch.to(device)
        with autocast(device, precision):
            loss, m = objective(model, batch)
        loss_sum += float(loss)
        count += objective.count(batch)
        _add(metrics, m)
    model.train(was_training)
    mean = loss_sum / max(count, 1)
    out = {"eval_loss": mean, **{f"eval_{k}": v / max(count, 1) for k, v in metrics.items()}}
    if not metrics:  # token-level cross-entropy: perplexity is meaningful
        out["eval_ppl"] = math.exp(min(mean, 50.0))
    return out


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def train_loop(
    model: nn.Module,
    method: Method,
    objective: Objective,
    source: BatchSource,
    evals: Batches | None,
    cfg: TrainConfig,
    output_dir: Path,
    device: torch.device,
    resume: bool | Path = False,
) -> LoopResult:
    """Run the optimisation; checkpoints go to ``output_dir/checkpoints``.

    ``resume`` is a checkpoint folder to continue from, or True for the newest complete one
    under ``output_dir/checkpoints`` (with none, the run starts at step 0 and says so).
    """
    d = current()
    if d.active:
        shard = getattr(source, "shard", None)
        if shard is None:
            raise ConfigError(
                f"train.strategy: this task's batches ({type(source).__name__}) are made while "
                f"it trains and cannot be split between {d.world} processes (it has no "
                f"shard(rank, world)); run it in one process (without torchrun)."
            )
        shard(d.rank, d.world)
    steps = total_steps(cfg, source.micro_batches_per_epoch())
    if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    trainable = sum(p.numel() for _, p in method.trainable_parameters())
    par = Parallel(model, cfg, device, trainable)  # DDP / FSDP2 under torchrun, else the model
    if d.active:
        describe = getattr(source, "global_batch", None)  # a producer says what a step holds
        say(
            f"{d.world} processes, {par.strategy}: "
            + (
                describe(d.world)
                if describe is not None
                else f"global batch {cfg.batch_size} x {cfg.grad_accum} x {d.world} = "
                f"{cfg.batch_size * cfg.grad_accum * d.world} "
                f"(train.batch_size x train.grad_accum x processes)"
            )
        )
    if cfg.compile:  # after wrapping: FSDP2 shards each layer first
        n = compile_layers(model)
        say(f"train.compile: {n} modules go through torch.compile (the first steps compile them)")
    # Built after wrapping: FSDP2 replaces the parameters by sharded ones.
    params = [p for _, p in method.trainable_parameters()]
    opt = build_optimizer(method.trainable_parameters(), cfg, device)
    sched = build_scheduler(opt, cfg, steps)
    ckpt_root = output_dir / "checkpoints"
    state: dict[str, Any] = {
        "step": 0,
        "micro_batches": 0,
        "tokens": 0,
        "train_seconds": 0.0,
        "nan_steps": 0,
        "nan_consecutive": 0,
    }
    start = resume if isinstance(resume, Path) else None
    if resume is True:
        start = latest_complete(ckpt_root, say)
        if start is None:
            say(f"--resume: no complete checkpoint in {ckpt_root} yet; starting from step 0.")
    if start is not None:
        state |= load_checkpoint(start, method, opt, sched, par)
        source.load_state_dict(state["source"])
        retarget_lr(opt, sched, cfg.lr)
        say(f"resuming from {start} (step {state['step']} of {steps}).")
    last_saved, saved_at = (str(start), state["step"]) if start is not None else (None, -1)
    nan = NanGuard(cfg.nan_policy, cfg.max_nan_steps, state["nan_steps"])
    nan.consecutive = state["nan_consecutive"]
    log = MetricsLog(
        output_dir / "metrics.jsonl",
        resume_step=state["step"] if start is not None else None,
        enabled=d.is_main,
    )
    stream = source.stream()
    model.train()
    bar = progress(steps, state["step"], cfg.progress and d.is_main, "train")
    eval_metrics: dict[str, float] = {}
    loss = float("nan")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_start, tokens_start = time.perf_counter(), state["tokens"]
    t_mark = t_start

    def run_eval() -> dict[str, float]:
        return evaluate(
            par.model, objective, evals.one_pass(), device, cfg.precision, cfg.eval_batches
        )

    def checkpoint(step: int) -> None:
        """Save at ``step``; the time spent writing is not training time."""
        nonlocal last_saved, saved_at, t_mark
        state["train_seconds"] += time.perf_counter() - t_mark
        loop_state = {k: v for k, v in state.items() if k != "step"}
        loop_state["source"] = source.state_dict()
        loop_state["world_size"] = d.world
        path = save_checkpoint(
            ckpt_root, step, method, opt, sched, loop_state, cfg.keep_checkpoints, par
        )
        last_saved, saved_at, t_mark = str(path), step, time.perf_counter()

    if evals is not None and cfg.eval_every and state["step"] == 0:
        log.write({"step": 0, **run_eval()})
    with SignalGuard() as guard:
        for step in range(state["step"], steps):
            if agreed_signal(guard):  # arrived while a checkpoint or an evaluation ran
                break
            micro, count = next_step_batches(stream, objective, cfg.grad_accum)
            result = train_step(
                par.model, objective, micro, opt, sched, params, cfg, device, par, count
            )
            done = step + 1
            nan.check(done, result.loss, result.grad_norm, last_saved)  # raises when it stops
            if not result.applied:
                say(
                    f"step {done}: non-finite loss ({result.loss}) or gradient norm "
                    f"({result.grad_norm}); step skipped ({nan.skipped} so far; "
                    f"train.max_nan_steps={cfg.max_nan_steps} in a row stop the run)."
                )
            loss = result.loss
            state.update(
                step=done,
                tokens=state["tokens"] + result.tokens,
                micro_batches=state["micro_batches"] + cfg.grad_accum,
                nan_steps=nan.skipped,
                nan_consecutive=nan.consecutive,
            )
            elapsed = state["train_seconds"] + time.perf_counter() - t_mark
            tok_s = (state["tokens"] - tokens_start) / max(time.perf_counter() - t_start, 1e-9)
            record = {
                "step": done,
                "epoch": round(source.epoch_of(state["micro_batches"] - 1), 4),
                "loss": loss,
                **result.metrics,
                "lr": sched.get_last_lr()[0],
                "grad_norm": result.grad_norm,
                "tokens": state["tokens"],
                "tokens_per_s": tok_s,
                "elapsed_s": elapsed,
                **({"nan_steps": nan.skipped} if nan.skipped else {}),
                **({"skipped": True} if not result.applied else {}),
            }
            if evals is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < steps:
                record.update(run_eval())
                eval_metrics = {k: v for k, v in record.items() if k.startswith("eval_")}
            if (
                done % cfg.log_every == 0
                or done == steps
                or "eval_loss" in record
                or not result.applied
            ):
                log.write(record)
            bar.set_postfix(
                loss=f"{loss:.4f}",
                **(
                    {"acc": f"{result.metrics['accuracy']:.2f}"}
                    if "accuracy" in result.metrics
                    else {}
                ),
                tok_s=f"{tok_s:,.0f}",
                **({"eval": f"{eval_metrics['eval_loss']:.4f}"} if eval_metrics else {}),
                refresh=False,  # shown at the bar's next redraw (its interval: see progress)
            )
            bar.update(1)
            if cfg.save_every and done % cfg.save_every == 0 and done < steps:
                checkpoint(done)
            if guard.requested and not d.active:  # ranks agree at the top of the next step
                break
        signum = agreed_signal(guard)
        if signum:
            bar.close()
            at = state["step"]
            if saved_at != at:
                checkpoint(at)
            raise Interrupted(
                f"stopped by {signal.Signals(signum).name} after step {at} of {steps}; checkpoint {last_saved} written",
                signum,
            )
        bar.close()
        train_seconds = state["train_seconds"] + time.perf_counter() - t_mark
        if evals is not None and evals.examples:
            eval_metrics = run_eval()
            log.write({"step": steps, **eval_metrics})
        if cfg.save_every:
            t_mark = time.perf_counter()
            checkpoint(steps)
    return LoopResult(
        steps=steps,
        final_train_loss=loss,
        eval=eval_metrics,
        tokens_per_s=(state["tokens"] - tokens_start) / max(time.perf_counter() - t_start, 1e-9),
        train_seconds=train_seconds,
        peak_memory_mb=peak_memory_mb(device),
        history=log.read() if d.is_main else [],
        gather=par.gather_into if par.strategy == "fsdp" else None,
    )


LOOPS = {"supervised": train_loop}
"""The loops a task may name (``Task.loop``): the supervised loop takes any batch source, a
replayable data set or a producer."""
