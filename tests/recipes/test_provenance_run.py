"""A run records its data's fingerprints in run.json; ``tunesmith eval`` warns when they change."""

from __future__ import annotations

import hashlib
import json

import torch
import transformers
import yaml
from conftest import base_config, write_jsonl

from tunesmith.cli import main


def test_run_json_records_data_and_eval_warns_on_change(llama, pc_data, tmp_path, capsys):
    out = tmp_path / "run"
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(base_config(llama, pc_data, out, max_steps=1)))
    assert main(["train", str(cfg_path)]) == 0
    run = json.loads((out / "run.json").read_text())
    env = run["environment"]  # the install a number came from
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    assert env["transformers"] == transformers.__version__
    data = run["data"]
    assert data == {
        "train": {
            "source": str(pc_data),
            "path": str(pc_data.resolve()),
            "size": pc_data.stat().st_size,
            "sha256": hashlib.sha256(pc_data.read_bytes()).hexdigest(),
            "rows": 48,
        }
    }
    capsys.readouterr()

    assert main(["eval", str(out), "--samples", "2"]) == 0
    assert "warning" not in capsys.readouterr().err  # unchanged: nothing said

    rows = [json.loads(line) for line in pc_data.read_text().splitlines()]
    write_jsonl(pc_data, rows[:40])
    assert main(["eval", str(out), "--samples", "2"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert f"the data changed since {out} trained" in warnings[0]
    assert f"{pc_data.resolve()}: changed since training (48 -> 40 rows" in warnings[0]
