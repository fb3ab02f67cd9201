"""Data fingerprints (``tunesmith.data.provenance``): what a run trained on, and what changed."""

from __future__ import annotations

import hashlib
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import write_jsonl

from tunesmith.config import DataConfig
from tunesmith.data.provenance import changed_data, fingerprint, provenance

ROWS = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]


def test_fingerprint_of_each_file_type(tmp_path):
    jsonl = write_jsonl(tmp_path / "d.jsonl", ROWS)
    jsonl.write_text(jsonl.read_text() + "\n\n")  # blank lines are not rows
    (tmp_path / "d.json").write_text(json.dumps({"data": ROWS}))
    (tmp_path / "d.csv").write_text(
        "prompt,completion\n" + "".join(f'p{i},"c\n{i}"\n' for i in range(5))
    )
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    (tmp_path / "utf16.jsonl").write_bytes(jsonl.read_text().encode("utf-16"))
    (tmp_path / "lines.json").write_text(jsonl.read_text())  # JSON Lines named .json
    (tmp_path / "semi.csv").write_text(
        "prompt;completion\n" + "".join(f"p{i};c{i}\n" for i in range(5))
    )
    names = ["d.jsonl", "d.json", "d.csv", "d.parquet", "utf16.jsonl", "lines.json", "semi.csv"]
    for name in names:
        path = tmp_path / name
        fp = fingerprint(str(path))
        assert fp == {
            "source": str(path),
            "path": str(path.resolve()),
            "size": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "rows": 5,
        }, name


def test_sources_that_are_not_files_are_named_only(tmp_path):
    assert fingerprint("builtin:arith") == {"source": "builtin:arith"}
    assert fingerprint("someone/dataset") == {"source": "someone/dataset"}
    assert fingerprint(str(tmp_path)) == {"source": str(tmp_path)}


def test_provenance_covers_train_and_an_eval_file(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", ROWS)
    held = write_jsonl(tmp_path / "e.jsonl", ROWS[:2])
    assert set(provenance(DataConfig(train=str(train), eval=0.1))) == {"train"}
    both = provenance(DataConfig(train=str(train), eval=str(held)))
    assert both["train"]["rows"] == 5 and both["eval"]["rows"] == 2


def test_changed_data_names_each_change(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", ROWS)
    cfg = DataConfig(train=str(train), eval=None)
    saved = provenance(cfg)
    assert changed_data(saved, cfg) == []

    os.utime(train, (0, 0))  # touched, same bytes: not a change
    assert changed_data(saved, cfg) == []

    write_jsonl(train, [*ROWS, {"prompt": "new", "completion": "row"}])
    old, new = saved["train"], fingerprint(str(train))
    assert changed_data(saved, cfg) == [
        f"{train.resolve()}: changed since training (5 -> 6 rows, {old['size']:,} -> "
        f"{new['size']:,} bytes, sha256 {old['sha256'][:12]} -> {new['sha256'][:12]})"
    ]

    write_jsonl(train, [{**ROWS[0], "completion": "cX"}, *ROWS[1:]])  # same size, other bytes
    assert train.stat().st_size == old["size"]
    [line] = changed_data(saved, cfg)
    assert "changed since training (5 -> 5 rows" in line

    train.unlink()
    assert changed_data(saved, cfg) == [
        f"{train.resolve()}: gone since training (it had 5 rows, sha256 {old['sha256'][:12]})"
    ]

    other = write_jsonl(tmp_path / "o.jsonl", ROWS)
    assert changed_data(saved, DataConfig(train=str(other))) == [
        f"data.train: trained on {train}, now {other}"
    ]
