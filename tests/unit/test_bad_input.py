"""Hostile and real-world-shaped data files: each ends in data that loads, or one line naming the
file:line (or config key) and the fix. docs/bad-input.md lists these cases with their messages."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import write_jsonl

from tunesmith.builtin.tokenizer import build_tokenizer
from tunesmith.config import DataConfig
from tunesmith.data.dataset import prepare_data
from tunesmith.data.io import read_records
from tunesmith.errors import ConfigError, DataError

CHAT = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def prep(tok, train, **kw):
    return prepare_data(DataConfig(train=str(train), eval=None, **kw), tok, 0)


# ----------------------------------------------------------------------------------------------
# Encodings


@pytest.mark.parametrize(
    "name, body",
    [
        ("d.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n'),
        ("d.json", '[{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]'),
        ("d.csv", "prompt,completion\na,b\nc,d\n"),
    ],
)
def test_utf8_byte_order_mark_loads(tmp_path, name, body):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())  # as Windows tools write UTF-8
    records, _ = read_records(str(path))
    assert [r.fields for r in records] == [
        {"prompt": "a", "completion": "b"},
        {"prompt": "c", "completion": "d"},
    ]


@pytest.mark.parametrize("name", ["bad.jsonl", "bad.csv", "bad.json"])
def test_non_utf8_byte_names_its_line(tmp_path, name):
    lines = [b'{"text": "fine"}' if "json" in name else b"fine" for _ in range(6)]
    lines[4] = b'{"text": "caf\xe9"}' if "json" in name else b"caf\xe9"  # Latin-1, line 5
    head = [] if "json" in name else [b"text"]
    body = b"\n".join(head + lines[len(head) :]) + b"\n"
    if name.endswith(".json"):
        body = b"[\n" + b",\n".join(lines[:-1]) + b"\n]\n"  # line 1 is '[': the record is on 6
    path = tmp_path / name
    path.write_bytes(body)
    line = 6 if name.endswith(".json") else 5
    with pytest.raises(
        DataError,
        match=rf"{name}:{line}: not UTF-8 text \(byte 0xe9 at column \d+\); save the file as UTF-8",
    ):
        read_records(str(path))


def test_lone_surrogate_escape_is_a_data_error(tmp_path, tok):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "ok \\ud83d\\ude00"}\n{"text": "half \\ud83d"}\n')
    with pytest.raises(DataError, match=r"s.jsonl:2: the escape \\ud83d is half of a UTF-16"):
        prep(tok, path)
    data = prep(tok, path, skip_bad_rows=True)  # a whole pair is a character: line 1 loads
    assert len(data.train) == 1 and data.stats.skipped_bad == 1


# ----------------------------------------------------------------------------------------------
# Files that are not there, not readable, not files


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path}: is a folder; give a data file"):
        read_records(str(tmp_path))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    path.chmod(0)
    with pytest.raises(DataError, match="d.jsonl: permission denied; make it readable"):
        read_records(str(path))


def test_unreadable_file_simulated(tmp_path, monkeypatch):
    """Same as above where the tests run as root (who reads any file): open() is refused."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(DataError, match="d.jsonl: permission denied; make it readable"):
        read_records(str(path))


def test_nul_in_file_name():
    with pytest.raises(DataError, match="cannot contain a NUL"):
        read_records("data\x00.jsonl")


# ----------------------------------------------------------------------------------------------
# Malformed contents the parsers reject in their own ways


def test_json_too_deep_or_too_long_a_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON \(nested too deeply\)"):
        read_records(str(path))
    path.write_text('{"text": "ok"}\n{"text": "a", "n": ' + "9" * 5000 + "}\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON \(Exceeds the limit"):
        read_records(str(path))


def test_csv_with_a_long_field(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text\n" + "x" * 200_000 + "\n")  # over the csv module's 128 KiB default
    records, _ = read_records(str(path))
    assert len(records[0].fields["text"]) == 200_000


@pytest.mark.parametrize(
    "row, pattern",
    [
        (
            {"messages": [{"role": "user", "content": 5}, CHAT[1]]},
            r"messages\[0\].content must be a string, got int",
        ),
        ({"messages": [{"role": None, "content": "x"}]}, r"messages\[0\].role must be a string"),
        (
            {"instruction": "i", "input": ["x"], "output": "o"},
            r"field 'input' must be a string or null, got list",
        ),
        (
            {"messages": [{"role": "assistant", "content": "hello"}, *CHAT]},
            r"the conversation starts with an assistant turn.*data.loss_on=all",
        ),
    ],
)
def test_wrong_types_inside_records(tmp_path, tok, row, pattern):
    good = {"instruction": "i", "output": "o"} if "instruction" in row else {"messages": CHAT}
    path = write_jsonl(tmp_path / "d.jsonl", [row, good])
    with pytest.raises(DataError, match=rf"d.jsonl:1: {pattern}"):
        prep(tok, path)
    data = prep(tok, path, skip_bad_rows=True)  # a row that cannot render is skipped, counted
    assert len(data.train) == 1 and data.stats.skipped_bad == 1
    assert any(n.startswith("skipped 1 malformed rows (first: ") for n in data.notes)


# ----------------------------------------------------------------------------------------------
# Empty completions


@pytest.mark.parametrize(
    "row, what",
    [
        ({"prompt": "2+2=", "completion": ""}, "'completion'"),
        ({"instruction": "Add 2 and 2.", "output": "  "}, "'output'"),
        (
            {"messages": [CHAT[0], {"role": "assistant", "content": ""}]},
            r"assistant turn messages\[1\]",
        ),
        ({"text": "\n"}, "'text'"),
    ],
)
def test_empty_completion_warn_drop_error(tmp_path, tok, row, what):
    good = {k: v for k, v in row.items()}
    for key in ("completion", "output", "text"):
        if key in good:
            good[key] = "4"
    if "messages" in good:
        good["messages"] = CHAT
    path = write_jsonl(tmp_path / "d.jsonl", [good, row, good, row, good])
    origin = f"{path}:2"

    data = prep(tok, path)  # warn: trained, counted, one line naming the first
    assert len(data.train) == 5 and data.stats.empty == 2
    notes = [n for n in data.notes if "empty completion" in n]
    assert notes == [
        f"warning: 2 of 5 training records have an empty completion, so only the end token "
        f"trains for them (first: {origin}); fill them in, or set data.empty_completion=drop or error"
    ]

    data = prep(tok, path, empty_completion="drop")
    assert len(data.train) == 3 and data.stats.dropped_empty == 2
    assert (
        f"dropped 2 of 5 training records with an empty completion (first: {origin})" in data.notes
    )

    with pytest.raises(DataError, match=rf"d.jsonl:2: empty {what}, so only the end token"):
        prep(tok, path, empty_completion="error")


def test_empty_completion_in_held_out_split_is_counted_separately(tmp_path, tok):
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "completion": "b"}] * 3)
    held = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "a", "completion": ""}])
    data = prepare_data(DataConfig(train=str(train), eval=str(held)), tok, 0)
    assert data.stats.empty == 0 and data.eval_stats.empty == 1
    assert any(n.startswith("warning: 1 of 1 held-out records") for n in data.notes)


def test_empty_completion_setting_is_validated():
    from tunesmith.config import load_config

    with pytest.raises(
        ConfigError,
        match=r"data.empty_completion: got 'skip'; allowed: one of 'warn', 'drop', 'error'",
    ):
        load_config({"data": {"empty_completion": "skip"}})


# ----------------------------------------------------------------------------------------------
# ShareGPT


SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "2+2?"},
        {"from": "gpt", "value": "4"},
        {"from": "user", "value": "and 3+3?"},
        {"from": "model", "value": "6"},
    ]
}


@pytest.mark.parametrize("fmt", ["auto", "sharegpt"])
def test_sharegpt_loads_as_chat(tmp_path, tok, fmt):
    path = write_jsonl(tmp_path / "s.jsonl", [SHAREGPT, SHAREGPT])
    data = prep(tok, path, format=fmt)
    assert data.format == "chat"
    assert data.train_records[0].fields["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    if fmt == "auto":
        assert (
            "format: auto chose 'sharegpt' (loaded as chat) from the fields ['conversations']"
            in data.notes
        )
    # Exactly the same examples as the same conversation written as chat.
    chat = write_jsonl(
        tmp_path / "c.jsonl", [{"messages": data.train_records[0].fields["messages"]}] * 2
    )
    same = prep(tok, chat)
    assert [e.input_ids.tolist() for e in data.train] == [e.input_ids.tolist() for e in same.train]
    assert [e.labels.tolist() for e in data.train] == [e.labels.tolist() for e in same.train]


def test_sharegpt_unknown_role_names_line_and_allowed_roles(tmp_path, tok):
    bad = {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}
    path = write_jsonl(tmp_path / "s.jsonl", [SHAREGPT, bad])
    with pytest.raises(
        DataError,
        match=r"s.jsonl:2: conversations\[1\] has role 'bot'; allowed: human, user, gpt, assistant, model, system",
    ):
        prep(tok, path)
    data = prep(tok, path, skip_bad_rows=True)
    assert len(data.train) == 1 and data.stats.skipped_bad == 1


def test_sharegpt_empty_reply_is_an_empty_completion(tmp_path, tok):
    empty = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]}
    path = write_jsonl(tmp_path / "s.jsonl", [SHAREGPT, empty])
    with pytest.raises(DataError, match=r"s.jsonl:2: empty assistant turn messages\[1\]"):
        prep(tok, path, empty_completion="error")


def test_sharegpt_rows_in_csv_are_not_guessed(tmp_path, tok):
    """A CSV cell is text, never a list: a 'conversations' column is not silently parsed."""
    path = tmp_path / "s.csv"
    path.write_text(
        'conversations\n"' + json.dumps(SHAREGPT["conversations"]).replace('"', '""') + '"\n'
    )
    with pytest.raises(DataError, match=r"s.csv:2: 'conversations' must be a non-empty list"):
        prep(tok, path)


# ----------------------------------------------------------------------------------------------
# Nothing left


def test_no_usable_examples_says_why(tmp_path, tok):
    rows = [{"prompt": "p", "completion": "x" * 40}, {"prompt": "p", "completion": ""}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(
        DataError,
        match=rf"d.jsonl: no usable examples: 1 longer than data.max_length=20 \(data.truncation=drop; "
        rf"raise data.max_length or set data.truncation=truncate\), 1 with an empty completion "
        rf"\(first: {path}:2; data.empty_completion=drop\)\.$",
    ):
        prep(tok, path, max_length=20, truncation="drop", empty_completion="drop")


def test_csv_row_with_wrong_number_of_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion\na,b\nc,d,e\n")
    with pytest.raises(
        DataError, match=r"d.csv:3: wrong number of columns for header \['prompt', 'completion'\]"
    ):
        read_records(str(path))


def test_eval_fraction_leaving_nothing_to_train(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match=r"data.eval=0.5 leaves no training records out of 1"):
        prepare_data(DataConfig(train=str(path), eval=0.5), tok, 0)


def test_missing_template_file(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}])
    with pytest.raises(
        ConfigError, match=r"data.template: cannot read .*nope.jinja \(No such file"
    ):
        prep(tok, path, template=str(tmp_path / "nope.jinja"))


# ----------------------------------------------------------------------------------------------
# Config files and overrides


def test_config_file_not_utf8_names_its_line(tmp_path):
    from tunesmith.config import load_config

    path = tmp_path / "c.yaml"
    path.write_bytes(b"train:\n  lr: 1e-4\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"c.yaml:3: not UTF-8 text \(byte 0xe9 at column 6\)"):
        load_config(path)
    path.write_bytes(b"\xef\xbb\xbftrain:\n  lr: 1e-4\n")  # a BOM is fine
    assert load_config(path).train.lr == pytest.approx(1e-4)


def test_config_file_with_control_character_is_one_line(tmp_path):
    from tunesmith.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-4\n  seed: \x07\n")
    with pytest.raises(
        ConfigError, match=r"c.yaml:3: not valid YAML \(special characters are not allowed\)\.$"
    ):
        load_config(path)


def test_override_value_that_is_not_yaml(tmp_path):
    from tunesmith.config import load_config

    with pytest.raises(
        ConfigError,
        match=r"override 'method.targets=\[q_proj': the value is not valid YAML .*; write a YAML value",
    ):
        load_config({}, ["method.targets=[q_proj"])
    with pytest.raises(ConfigError, match=r"unknown key 'a\\nb'"):
        load_config({"a\nb": 1})


# ----------------------------------------------------------------------------------------------
# Layouts that Windows tools and spreadsheets write


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv"])
def test_utf16_files_load(tmp_path, name):
    """PowerShell's `>` and Excel's "Unicode text" write UTF-16 with a byte-order mark."""
    rows = [{"prompt": "café", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    body = {
        "d.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows),
        "d.json": json.dumps(rows, ensure_ascii=False),
        "d.csv": "prompt,completion\r\ncafé,b\r\nc,d\r\n",
    }[name]
    path = tmp_path / name
    path.write_bytes(body.encode("utf-16"))  # with its BOM
    records, _ = read_records(str(path))
    assert [r.fields for r in records] == rows
    path.write_bytes(body.encode("utf-16")[:-1])  # cut in the middle of a character
    with pytest.raises(
        DataError, match=rf"{name}: not valid UTF-16 text .*; save the file as UTF-8"
    ):
        read_records(str(path))


def test_json_lines_in_a_json_file_load(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    records, _ = read_records(str(path))
    assert [r.fields for r in records] == [{"text": "a"}, {"text": "b"}]
    assert records[1].origin == f"{path}:2"


@pytest.mark.parametrize("sep", [";", "\t"])
def test_csv_separated_by_semicolons_or_tabs(tmp_path, sep):
    path = tmp_path / "d.csv"
    path.write_bytes(f"\ufeffprompt{sep}completion\na, b{sep}c\n".encode())  # Excel: BOM and ';'
    records, _ = read_records(str(path))
    assert [r.fields for r in records] == [{"prompt": "a, b", "completion": "c"}]
