"""The run report: a Markdown summary and the loss curve, written into the run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tunesmith.config import Config
from tunesmith.training.logging import plot_loss, plot_series


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def write_report(
    out: Path,
    cfg: Config,
    info: dict[str, Any],
    history: list[dict[str, Any]],
    extra: str = "",
    series: tuple[str, ...] = (),
) -> Path:
    """report.md with the loss curve, and one panel per logged metric in ``series`` (rl.svg)."""
    title = f"{cfg.task} / {cfg.method.name} on {cfg.model.name}"
    plot_loss(history, out / "loss.svg", title=title)
    shown = [k for k in series if any(k in r for r in history)]
    if shown:
        plot_series(history, shown, out / "rl.svg", title=title)
        extra = f"![training metrics](rl.svg)\n\n{extra}"
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in info.items())
    text = (
        f"# tunesmith run: {cfg.task} with {cfg.method.name}\n\n"
        f"Model `{cfg.model.name}`, data `{cfg.data.train}`, output `{out}`.\n\n"
        f"| metric | value |\n| --- | --- |\n{rows}\n\n"
        f"![loss curve](loss.svg)\n\n{extra}"
        f"## Config\n\n```yaml\n{yaml.safe_dump(cfg.to_dict(), sort_keys=False)}```\n"
    )
    path = out / "report.md"
    path.write_text(text)
    return path
