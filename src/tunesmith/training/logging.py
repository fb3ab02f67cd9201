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
        if not self.path.exists():
            return []
        return _records(self.path.read_text())


def progress(total: int, initial: int, enabled: bool, desc: str) -> tqdm:
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not enabled,
        dynamic_ncols=True,
        file=sys.stderr,
        unit="step",
    )


def plot_loss(records: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Training loss per step and eval loss at its steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        xs, ys = zip(*train)
        ax.plot(xs, ys, lw=1, alpha=0.5, label="train loss")
        if len(ys) >= 10:  # a moving average makes the trend readable
            k = max(2, len(ys) // 20)
            smooth = [
                sum(ys[max(0, i - k + 1) : i + 1]) / len(ys[max(0, i - k + 1) : i + 1])
                for i in range(len(ys))
            ]
            ax.plot(xs, smooth, lw=2, label=f"train loss (avg of {k})")
    if evals:
        xs, ys = zip(*evals)
        ax.plot(xs, ys, "o-", lw=2, label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / supervised token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_series(
    records: list[dict[str, Any]], keys: list[str], path: Path, title: str = ""
) -> None:
    """One small panel per logged metric (its value at every step that logged it), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), dpi=100, squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in records if key in r]
        xs, ys = zip(*points)
        ax.plot(xs, ys, "o-" if len(xs) < 20 else "-", lw=1.5, ms=3)
        ax.set_title(key, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
