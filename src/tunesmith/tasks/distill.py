"""``task: distill`` (causal LMs, SFT-format data) and ``task: distill_classify`` (classifiers,
labelled text): a student learns from a frozen teacher (``objectives/distill.py``).

The teacher is a model folder or a tunesmith run folder sharing the student's tokenizer (a
different vocabulary stops with one line; embedding rows added only as padding are ignored). It
runs in ``no_grad`` on every batch (online), or, with ``teacher_cache: offline``, once per split:
its top-k log-probs are cached on disk (``objectives/teacher_cache.py``), and a later run with
the same teacher, data and k reuses them and never loads the teacher while training. The student
is ``model`` with any method, or is built from the teacher with ``student: {init: from_teacher,
layers: [0, 2, 4]}`` (DistilBERT's recipe, ``tunesmith/student.py``) into
``OUTPUT_DIR/student-init``, which then becomes ``model.name``. For causal LMs only the
supervised tokens are distilled. The report compares teacher and student: parameters, the
held-out metric and inference speed on this machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.config import Config, ModelConfig
from tunesmith.console import say
from tunesmith.data.kinds import EXAMPLES, LABELED
from tunesmith.errors import ConfigError
from tunesmith.models import (
    DTYPES,
    head_kwargs,
    is_run_dir,
    load_for_inference,
    load_model,
    load_tokenizer,
    resolve_model_path,
    weights_fingerprint,
)
from tunesmith.objectives.classify import class_logits
from tunesmith.objectives.distill import (
    DistillConfig,
    DistillObjective,
    check_same_vocabulary,
    vocab_width,
)
from tunesmith.tasks.base import TASKS, Context, Task, held_out, register
from tunesmith.tasks.classify import classification_report, resolve_labels
from tunesmith.tasks.sft import generation_metrics


def section(cfg: Config) -> DistillConfig:
    return cfg.sections[cfg.task]


def teacher_labels(path: str) -> list[str] | None:
    """The class names a classifier teacher was trained with (its config's id2label), if any."""
    config = json.loads((Path(path) / "config.json").read_text())
    names = config.get("id2label") or {}
    if len(names) < 2 or all(str(v).startswith("LABEL_") for v in names.values()):
        return None
    return [names[str(i)] if str(i) in names else names[i] for i in range(len(names))]


def prepare(cfg: Config) -> None:
    """Check the teacher, fix the class list (from a classifier teacher), build the student."""
    from tunesmith.student import build_student

    s = section(cfg)
    if not s.teacher:  # distil ``model`` itself into a student built from its layers
        if s.student is None:
            raise ConfigError(
                f"{cfg.task}.teacher: give the teacher (a model folder or a run folder), or set "
                f"{cfg.task}.student to distil `model` into a student built from its layers."
            )
        s.teacher = cfg.model.name  # saved in config.yaml: a resumed run finds the same teacher
    teacher_path = resolve_model_path(s.teacher, f"{cfg.task}.teacher")
    if not token_level(cfg):
        labels = teacher_labels(teacher_path)
        if labels is not None:
            if cfg.data.labels is not None and list(cfg.data.labels) != labels:
                raise ConfigError(
                    f"data.labels: {cfg.data.labels} differs from the teacher's classes {labels}; "
                    "the student must predict the teacher's classes in the teacher's order."
                )
            cfg.data.labels = labels
        resolve_labels(cfg)
    if s.student is not None:
        out = Path(cfg.output_dir) / "student-init"
        done = out / "student.json"
        same = done.exists() and json.loads(done.read_text()) == {
            "teacher": str(teacher_path),
            "layers": s.student.layers,
        }
        if not same:
            say(
                f"building the student from {s.teacher} (layers {s.student.layers or 'every other'}) in {out}"
            )
            build_student(teacher_path, out, s.student.layers)
            done.write_text(json.dumps({"teacher": str(teacher_path), "layers": s.student.layers}))
        cfg.model.name = str(out)


def token_level(cfg: Config) -> bool:
    """Whether the task distils next-token distributions (else one class distribution per text)."""
    return TASKS[cfg.task].records.token_targets


def load_teacher(ctx: Context) -> tuple[nn.Module, Any]:
    """(frozen teacher on the run's device, its tokenizer)."""
    s, head = section(ctx.cfg), TASKS[ctx.cfg.task].head
    if is_run_dir(s.teacher):
        model, tok, _ = load_for_inference(s.teacher, ctx.device)
    else:
        mcfg = ModelConfig(name=s.teacher, dtype=s.teacher_dtype)
        model = load_model(mcfg, ctx.device, head=head, extra=head_kwargs(ctx.cfg, head))
        if model.tunesmith_fresh:
            raise ConfigError(
                f"{ctx.cfg.task}.teacher: {s.teacher} lacks trained weights for "
                f"{', '.join(model.tunesmith_fresh)} (a new head would teach noise); give a teacher "
                "trained for this task (e.g. a task: classify run folder)."
            )
        tok = load_tokenizer(mcfg)
    if s.teacher_dtype != "auto":
        model = model.to(DTYPES[s.teacher_dtype])
    return model.eval().requires_grad_(False), tok


def make_objective(ctx: Context) -> DistillObjective:
    s = section(ctx.cfg)
    if s.teacher_cache == "offline":
        return offline_objective(ctx)
    teacher, tok = load_teacher(ctx)
    check_same_vocabulary(ctx.tokenizer, tok, s.teacher)
    width = vocab_width(ctx.tokenizer, ctx.model, teacher)
    ctx.teacher = teacher  # the report compares with it without loading it again
    return DistillObjective(s, teacher, width, token_level=token_level(ctx.cfg))


def offline_objective(ctx: Context) -> DistillObjective:
    """The objective against the teacher's cached top-k log-probs (``objectives/teacher_cache.py``):
    each split is looked up in the cache, and the teacher is loaded (and run once over the split)
    only when a split is missing; it is not kept for training."""
    from tunesmith.objectives.teacher_cache import (
        attach_teacher_top_k,
        compute_teacher_top_k,
        teacher_cache_path,
    )

    cfg, s, tokens = ctx.cfg, section(ctx.cfg), token_level(ctx.cfg)
    teacher_tok = load_tokenizer(
        ModelConfig(name=s.teacher), s.teacher if is_run_dir(s.teacher) else None
    )
    check_same_vocabulary(ctx.tokenizer, teacher_tok, s.teacher)
    # The widths vocab_width finds, read from the student alone (a classifier teacher's class
    # list was matched in prepare; a causal teacher's padding rows are cut at the tokenizer).
    width = len(ctx.tokenizer) if tokens else ctx.model.config.num_labels
    # A run folder is what load_teacher loads (an adapter run: its base + the adapter).
    fingerprint = weights_fingerprint(
        s.teacher if is_run_dir(s.teacher) else resolve_model_path(s.teacher)
    )
    teacher: list[nn.Module] = []  # loaded on the first miss

    def compute(examples: list[Any]) -> dict[str, torch.Tensor]:
        if not teacher:
            model = load_teacher(ctx)[0]
            vocab_width(ctx.tokenizer, ctx.model, model)  # a classifier of other classes stops here
            teacher.append(model)
        return compute_teacher_top_k(
            teacher[0], examples, s.top_k, width, tokens, cfg.train.batch_size, ctx.device,
            cfg.train.precision,
        )  # fmt: skip

    splits = [ctx.data.train, ctx.data.eval] if ctx.training else [ctx.data.eval]
    for examples in filter(None, splits):
        path = teacher_cache_path(
            fingerprint, examples, s.top_k, width, tokens, s.teacher_dtype, cfg.train.precision
        )
        reused = attach_teacher_top_k(examples, path, lambda ex=examples: compute(ex))
        say(
            f"teacher top-{min(s.top_k, width)} log-probs of {len(examples)} examples "
            f"{'reused from' if reused else 'computed once and cached in'} {path}"
        )
    teacher.clear()  # training holds no teacher; the report loads it again to compare
    return DistillObjective(s, None, width, token_level=tokens)


def run_forward(model: nn.Module, batch: Any, token_level: bool) -> None:
    if token_level:
        model(**batch.model_inputs(), use_cache=False)
    else:
        class_logits(model, batch)


@torch.no_grad()
def examples_per_second(model: nn.Module, ctx: Context, tokens: bool) -> float:
    """Held-out examples per second through ``model``'s forward on this machine (one warm-up
    batch excluded)."""
    was = model.training
    model.eval()
    batches = [b.to(ctx.device) for b in held_out(ctx).one_pass()]
    timed = batches[1:] or batches  # the first batch warms up (allocations, kernels)
    if len(batches) > 1:
        run_forward(model, batches[0], tokens)
    n, t0 = 0, time.perf_counter()
    for batch in timed:
        run_forward(model, batch, tokens)
        n += batch.input_ids.shape[0]
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    model.train(was)
    return n / max(seconds, 1e-9)


def compare_with_teacher(ctx: Context) -> tuple[dict[str, Any], str]:
    """Held-out metric, parameters and inference speed of the student and the teacher."""
    tokens = token_level(ctx.cfg)
    teacher = getattr(ctx, "teacher", None) or load_teacher(ctx)[0]

    def metric(model: nn.Module) -> dict[str, Any]:
        student_model = ctx.model
        ctx.model = model
        try:
            if tokens:
                return generation_metrics(ctx, 200)
            return classification_report(ctx)[0]
        finally:
            ctx.model = student_model

    rows = {}
    for who, model in (("teacher", teacher), ("student", ctx.model)):
        rows[who] = {
            "params": sum(p.numel() for p in model.parameters()),
            **metric(model),
            "examples_per_s": examples_per_second(model, ctx, tokens),
        }
    keys = [k for k in rows["student"] if k in rows["teacher"]]
    table = "| | " + " | ".join(keys) + " |\n| --- |" + " --- |" * len(keys) + "\n"
    for who, r in rows.items():
        table += (
            f"| {who} | "
            + " | ".join(f"{r[k]:,}" if isinstance(r[k], int) else f"{r[k]:.4g}" for k in keys)
            + " |\n"
        )
    metrics = {f"teacher_{k}": v for k, v in rows["teacher"].items()}
    metrics.update({f"student_{k}": v for k, v in rows["student"].items()})
    metrics.update({k: v for k, v in rows["student"].items() if k.startswith(("eval_", "exact"))})
    extra = ""
    if not tokens:
        _, extra = classification_report(ctx)
    return metrics, f"## Student and teacher (held out)\n\n{table}\n{extra}"


DISTILL = register(
    Task(
        name="distill",
        about="knowledge distillation of a causal LM on SFT data (KL, reverse KL, JSD, hard, hidden)",
        records=EXAMPLES,
        head="lm",
        objective=make_objective,
        section=DistillConfig,
        extra_eval=generation_metrics,
        compare_metrics=("eval_loss", "eval_agreement", "exact_match"),
        rising=("eval_agreement",),
        prepare=prepare,
        report=compare_with_teacher,
    )
)

DISTILL_CLASSIFY = register(
    Task(
        name="distill_classify",
        about="knowledge distillation of a sequence classifier (DistilBERT-style student)",
        records=LABELED,
        head="classifier",
        objective=make_objective,
        section=DistillConfig,
        extra_eval=lambda ctx, samples: classification_report(ctx)[0],
        compare_metrics=("eval_loss", "eval_accuracy", "eval_macro_f1"),
        rising=("eval_agreement",),
        prepare=prepare,
        report=compare_with_teacher,
    )
)
