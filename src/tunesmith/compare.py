"""``tunesmith compare``: the same task, data and step budget once per method, side by side.

Each method trains in its own process (so its peak memory is its own) into
``<output_dir>/<method>``; the comparison (Markdown table, PNG chart) is written to
``<output_dir>/compare.md`` and ``compare.svg`` and summarised in the terminal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tunesmith.config import load_config, parse_value
from tunesmith.console import say
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.methods import method_names
from tunesmith.paths import require_new_folder
from tunesmith.tasks import get_task

ARTIFACTS = ("*.safetensors",)
MEASURED = (
    ("method", "method", "{}"),
    ("trainable", "trainable_params", "{:,}"),
    ("% of model", "trainable_pct", "{:.2f}%"),
    ("peak MB", "peak_memory_mb", "{:,.0f}"),
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
    ("wall s", "train_seconds", "{:.1f}"),
)
# How a task's held-out metric is shown (others: their key, four decimals).
METRIC_COLUMNS = {
    "eval_loss": ("eval loss", "{:.4f}"),
    "exact_match": ("exact match", "{:.1%}"),
    "eval_accuracy": ("accuracy", "{:.1%}"),
}
ARTIFACT = ("artifact MB", "artifact_mb", "{:.2f}")


def columns(metrics: Sequence[str]) -> list[tuple[str, str, str]]:
    """The table's columns: what every run measures, the task's metrics, the artifact size."""
    shown = {m: METRIC_COLUMNS.get(m, (m, "{:.4f}")) for m in metrics}
    return [*MEASURED, *((label, m, fmt) for m, (label, fmt) in shown.items()), ARTIFACT]


def _method_spec(name: str, raw: dict[str, Any], options: Sequence[str]) -> dict[str, Any]:
    """The run config for one method: the config's own method settings when it names this
    method, plus ``name.key=value`` (a method setting) and ``name.section.key=value`` (e.g.
    ``full.train.lr=3e-4``: any other setting, for this method's run only)."""
    base = raw["method"]
    spec = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    spec["method"] = dict(base) if base.get("name") == name else {"name": name}
    for opt in options:
        key, _, value = opt.partition("=")
        if "." not in key or "=" not in opt:
            raise ConfigError(
                f"--set {opt}: expected METHOD.KEY=VALUE or METHOD.SECTION.KEY=VALUE, e.g. "
                "lora.rank=4 or full.train.lr=3e-4."
            )
        method, field = key.split(".", 1)
        if method != name:
            continue
        try:
            parsed = parse_value(value)
        except yaml.YAMLError:
            raise ConfigError(
                f"--set {opt}: the value is not valid YAML; quote a string: {key}='\"{value}\"'."
            ) from None
        section, _, sub = field.partition(".")
        if sub and isinstance(spec.get(section), dict):
            spec[section][sub] = parsed
        else:
            spec["method"][field] = parsed
    return spec


def _artifact_mb(run: Path) -> float:
    return sum(f.stat().st_size for pattern in ARTIFACTS for f in run.glob(pattern)) / 2**20


def compare(
    config: str,
    methods: Sequence[str],
    overrides: Sequence[str] = (),
    options: Sequence[str] = (),
    samples: int = 200,
) -> list[dict[str, Any]]:
    """Train once per method and return one row of measurements per method."""
    from tunesmith.evaluate import evaluate_target

    unknown = [m for m in methods if m not in method_names()]
    if unknown:
        raise ConfigError(
            f"--methods: unknown {', '.join(unknown)}; available: {', '.join(method_names())}."
        )
    cfg = load_config(config, overrides)
    task = get_task(cfg.task)
    metrics = task.compare_metrics
    raw = cfg.to_dict()
    for opt in options:  # a setting for a method not compared would be dropped without a word
        method, dot, _ = opt.partition("=")[0].partition(".")
        if dot and method not in methods:
            raise ConfigError(
                f"--set {opt}: '{method}' is not among --methods ({', '.join(methods)})."
            )
    root = require_new_folder(cfg.output_dir, "output_dir")
    specs = {
        name: {**_method_spec(name, raw, options), "output_dir": str(root / name)}
        for name in methods
    }
    for spec in specs.values():  # every --set checked before anything is written
        load_config(spec)
    rows = []
    for name, spec in specs.items():
        run = root / name
        root.mkdir(parents=True, exist_ok=True)
        cfg_path = root / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(spec, sort_keys=False))
        say(f"[{len(rows) + 1}/{len(methods)}] {name}")
        proc = subprocess.run(
            [sys.executable, "-m", "tunesmith.cli", "train", str(cfg_path)], env=os.environ.copy()
        )
        if proc.returncode != 0:
            raise TunesmithError(
                f"compare: the {name} run failed (see above); its config is {cfg_path}."
            )
        info = json.loads((run / "run.json").read_text())
        keys = ("trainable_params", "total_params", "peak_memory_mb", "tokens_per_s")
        row = {"method": name, **{k: info.get(k) for k in (*keys, "train_seconds", *metrics)}}
        row["trainable_pct"] = 100 * info["trainable_params"] / info["total_params"]
        row["artifact_mb"] = _artifact_mb(run)
        if any(row[m] is None for m in metrics) and task.extra_eval is not None and samples:
            scored = evaluate_target(str(run), samples=samples)  # metrics the run did not log
            row.update({m: scored.get(m) for m in metrics if row[m] is None})
        rows.append(row)
    if task.base_comparable and samples:  # where the methods started from
        base = evaluate_target(config, overrides, samples=samples)
        rows.insert(
            0,
            {
                "method": "base (untrained)",
                "trainable_params": 0,
                "trainable_pct": 0.0,
                **{m: base.get(m) for m in metrics},
            },
        )
    write_comparison(root, rows, cfg.task, metrics)
    return rows


def _cell(fmt: str, value: Any) -> str:
    return "n/a" if value is None else fmt.format(value)


def write_comparison(
    root: Path, rows: list[dict[str, Any]], task: str, metrics: Sequence[str] = ("eval_loss",)
) -> None:
    from tunesmith.charts import Panel, write_svg

    cols = columns(metrics)
    header = "| " + " | ".join(c[0] for c in cols) + " |\n|" + " --- |" * len(cols)
    body = "\n".join(
        "| " + " | ".join(_cell(fmt, r.get(key)) for _, key, fmt in cols) + " |" for r in rows
    )
    (root / "compare.md").write_text(
        f"# tunesmith compare: {task}\n\nSame data, settings and step budget for every method.\n\n{header}\n{body}\n\n![comparison](compare.svg)\n"
    )
    cells = [[c[0] for c in cols]]
    cells += [[_cell(fmt, r.get(key)) for _, key, fmt in cols] for r in rows]
    width = max(len(cell) for row in cells for cell in row) + 2
    lines = ["".join(f"{cell:>{width}}" for cell in row) for row in cells]
    print("\n".join(lines))
    print(f"report: {root / 'compare.md'}, chart: {root / 'compare.svg'}")
    names = [r["method"] for r in rows]
    panels = [
        ("trainable_pct", "% of parameters trained"),
        *((m, f"held-out {METRIC_COLUMNS.get(m, (m,))[0]}") for m in metrics),
        ("tokens_per_s", "tokens / s"),
    ]
    panels = [p for p in panels if any(r.get(p[0]) is not None for r in rows)]
    charts = [
        Panel(title, bars={n: r.get(key) or 0 for n, r in zip(names, rows)})
        for key, title in panels
    ]
    write_svg(root / "compare.svg", charts, columns=len(charts))
