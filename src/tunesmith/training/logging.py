"""Metrics to JSONL, a progress bar, and the loss-curve plot."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


def _records(text: str) -> list[dict[str, Any]]:
    """The complete lines of a metrics file; a last line cut short by a crash is dropped."""
    out = []
    for ln in text.splitlines():
        try:
            out.append(json.loads(ln))
        except ValueError:
            continue
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a run's ``metrics.jsonl`` (none if it is missing), complete lines only."""
    return _records(path.read_text()) if path.exists() else []


class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per logged step or evaluation."""

    def __init__(self, path: Path, resume_step: int | None = None, enabled: bool = True) -> None:
        """``enabled`` False (ranks other than 0 under torchrun): neither touch nor write the file."""
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        if resume_step is not None and path.exists():
            # Drop lines from after the checkpoint we resume from (they will be redone) and any
            # line a crash cut short; replace the file in one rename, so a crash here loses
            # nothing either.
            kept = [r for r in _records(path.read_text()) if r.get("step", 0) <= resume_step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, path)
        elif path.exists():
            path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)


def progress(total: int, initial: int, enabled: bool, desc: str) -> tqdm:
    """A progress bar on stderr: redrawn as it goes on a terminal or in a notebook, a line every
    30 s into a log file or pipe (where each redraw would add a line)."""
    notebook = any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)  # tqdm.auto's pick
    to_log = not sys.stderr.isatty() and not notebook
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not enabled,
        dynamic_ncols=True,
        file=sys.stderr,
        unit="step",
        mininterval=30.0 if to_log else 0.1,
    )


def plot_loss(records: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Training loss per step (and its moving average when there are 10 steps or more) and eval
    loss at its steps, as an SVG chart."""
    from tunesmith.charts import Line, Panel, write_svg

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    lines = []
    if train:
        xs, ys = zip(*train)
        lines.append(Line("train loss", xs, ys, width=1, opacity=0.5))
        if len(ys) >= 10:  # a moving average makes the trend readable
            k = max(2, len(ys) // 20)
            smooth = [sum(ys[max(0, i - k + 1) : i + 1]) / min(k, i + 1) for i in range(len(ys))]
            lines.append(Line(f"train loss (avg of {k})", xs, smooth, width=2))
    if evals:
        xs, ys = zip(*evals)
        lines.append(Line("eval loss", xs, ys, width=2, dots=True))
    panel = Panel(title, lines, xlabel="step", ylabel="loss (nats / supervised token)")
    write_svg(path, [panel], columns=1)


def plot_series(
    records: list[dict[str, Any]], keys: list[str], path: Path, title: str = ""
) -> None:
    """One small panel per logged metric (its value at every step that logged it), as SVG."""
    from tunesmith.charts import Line, Panel, write_svg

    panels = []
    for key in keys:
        xs, ys = zip(*[(r["step"], r[key]) for r in records if key in r])
        panels.append(Panel(key, [Line(key, xs, ys, dots=len(xs) < 20)], xlabel="step"))
    write_svg(path, panels, title=title)
