"""``tunesmith quickstart``: the main job on the built-in default, offline, in minutes on a CPU.

1. build (first time) or load the built-in base model;
2. measure its held-out exact match on the built-in arithmetic instruction task;
3. fine-tune it with LoRA on the task's training split;
4. measure again, show generations before and after side by side, and write the run report.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import load_config
from tunesmith.console import say
from tunesmith.data.io import read_records
from tunesmith.generate import ExactMatch, exact_match
from tunesmith.models import (
    load_for_inference,
    load_model,
    load_tokenizer,
    pick_device,
)
from tunesmith.paths import require_new_folder
from tunesmith.prepare import ensure_model

QUICKSTART = {
    "model": "builtin:tiny",
    "task": "sft",
    "method": {"name": "lora", "rank": 16, "alpha": 32, "targets": "all-linear"},
    "data": {
        "train": "builtin:arith",
        "eval": "builtin:arith:eval",
        "max_length": 128,
        "packing": True,
    },
    "train": {
        "epochs": 12,
        "batch_size": 8,
        "lr": 3e-3,
        "warmup": 0.05,
        "schedule": "cosine",
        "eval_every": 50,
        "seed": 0,
    },
}
SHOW = 6  # generations shown side by side
MARK = ".tunesmith-quickstart"  # in the folders a quickstart made: the ones it may replace


def _measure(model: Any, tokenizer: Any, records: list, template: str | None) -> ExactMatch:
    return exact_match(model, tokenizer, records, "chat", template, max_new_tokens=8)


def claim_folder(out: Path) -> None:
    """Make ``out`` an empty folder marked as the quickstart's: one an earlier quickstart made
    (it holds ``MARK``) is emptied, any other must be new or empty (a one-line error otherwise,
    nothing touched). A link to a folder stays a link; what it points to is emptied."""
    if not (out / MARK).is_file():
        require_new_folder(out, "--output-dir", " (quickstart replaces only a folder it made)")
    out.mkdir(parents=True, exist_ok=True)
    for entry in out.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (out / MARK).write_text(
        "made by `tunesmith quickstart`, which replaces this folder when run again\n"
    )


def quickstart(
    output_dir: str | Path = "runs/quickstart", overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Run the demo end to end; return the before/after metrics."""
    t0 = time.perf_counter()
    out = Path(output_dir)
    claim_folder(out)
    cfg = load_config({**QUICKSTART, "output_dir": str(out)}, overrides)
    device = pick_device(cfg.train.device)
    base_path = ensure_model(cfg.model.name)  # builds the base model the first time
    tokenizer = load_tokenizer(cfg.model, base_path)
    held_out, _ = read_records(cfg.data.eval)

    say(f"measuring the base model on {len(held_out)} held-out questions ({cfg.data.eval})")
    base = load_model(cfg.model, device, base_path).eval()
    before = _measure(base, tokenizer, held_out, tokenizer.chat_template)
    del base
    say(f"base model exact match: {100 * before.score:.1f}%")

    import tunesmith

    run = tunesmith.train(cfg)
    tuned, tok, _ = load_for_inference(str(out), device)
    after = _measure(tuned, tok, held_out, tok.chat_template)
    seconds = time.perf_counter() - t0

    questions = [r.fields["messages"][0]["content"] for r in held_out[:SHOW]]
    shown = list(zip(questions, before.samples, after.samples))
    width = max(len(q) for q in questions) + 2
    table = [f"{'held-out question':<{width}}{'reference':<11}{'base model':<18}after LoRA SFT"]
    table += [
        f"{q:<{width}}{ref:<11}{_short(b):<18}{_short(a)}" for q, (_, ref, b), (_, _, a) in shown
    ]
    summary = [
        "",
        *table,
        "",
        f"held-out exact match: {100 * before.score:.1f}% (base) -> {100 * after.score:.1f}% (after LoRA SFT) on {after.n} questions",
        f"eval loss {run.metrics.get('eval_loss', float('nan')):.4f}; {run.metrics['trainable_params']:,} trainable parameters "
        f"({100 * run.metrics['trainable_params'] / run.metrics['total_params']:.1f}%); {run.metrics['train_seconds']:.0f}s training; "
        f"{seconds:.0f}s in all",
        f"run folder: {out} (report.md, loss.svg, metrics.jsonl, adapter in PEFT layout)",
        f'try it:     tunesmith generate {out} --prompt "What is 7 plus 8?"',
    ]
    print("\n".join(summary))
    rows = "\n".join(
        f"| {q} | {ref} | `{_short(b)}` | `{_short(a)}` |" for q, (_, ref, b), (_, _, a) in shown
    )
    section = (
        "## Quickstart: before and after\n\n"
        f"Held-out exact match: **{100 * before.score:.1f}%** (base) -> **{100 * after.score:.1f}%** (after) on {after.n} questions.\n\n"
        f"| question | reference | base model | after LoRA SFT |\n| --- | --- | --- | --- |\n{rows}\n\n"
    )
    report = out / "report.md"
    text = report.read_text()
    report.write_text(text.replace("## Config", section + "## Config", 1))
    torch.set_grad_enabled(True)
    return {
        "before": before.score,
        "after": after.score,
        "n": after.n,
        "seconds": seconds,
        **run.metrics,
    }


def _short(text: str, n: int = 16) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= n else text[: n - 1] + "…"
