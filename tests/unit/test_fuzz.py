"""Fuzzing: random data files and random configs only ever end in tunesmith's own one-line errors.

Each property draws inputs with ``hypothesis`` and feeds them through the public entry points
(``prepare_data``, ``read_records``, ``load_config``). Anything raised that is not a
``TunesmithError`` (a ``KeyError``, a ``TypeError`` from the chat template, a ``csv.Error``...) is a
bug: the user would see a traceback instead of a line naming the file:line or config key.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import typing

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tunesmith.builtin.tokenizer import build_tokenizer
from tunesmith.config import Config, DataConfig, load_config
from tunesmith.data.dataset import prepare_data
from tunesmith.data.io import read_records
from tunesmith.data.kinds import EXAMPLES, PAIRS, RecordKind
from tunesmith.errors import TunesmithError

# TUNESMITH_FUZZ_EXAMPLES=5000 fuzzes deeper, with fresh random examples each run.
DEEP = int(os.environ.get("TUNESMITH_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=DEEP or 60,
    deadline=None,
    derandomize=not DEEP,  # the same examples every run: the default suite stays deterministic
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

FIELDS = [
    "text",
    "prompt",
    "completion",
    "instruction",
    "input",
    "output",
    "messages",
    "conversations",
    "chosen",
    "rejected",
]
FORMATS = ["text", "prompt_completion", "alpaca", "chat", "sharegpt", "preference"]
ROLES = ["user", "assistant", "system", "human", "gpt", "model", "tool", ""]

# Any unicode, lone surrogates included (JSON can spell them as \ud800 escapes).
any_text = st.text(st.characters(exclude_categories=()), max_size=20)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | any_text
    | st.sampled_from(["", " ", "\n", "<|im_end|>", "</s>", "{{ x }}"])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | any_text, inner, max_size=4)
    ),
    max_leaves=12,
)
# Mostly the right type, sometimes anything: so the fuzzer gets past reading into rendering.
long_text = st.builds(lambda c, n: c * n, st.text(min_size=1, max_size=3), st.integers(50, 2000))
some_text = st.text(max_size=30) | any_text | long_text | st.sampled_from(["", " ", "<|im_end|>"])
maybe_text = st.one_of(some_text, some_text, some_text, json_values)
message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": maybe_text}),
    st.fixed_dictionaries({"from": st.sampled_from(ROLES), "value": maybe_text}),
    st.dictionaries(st.sampled_from(["role", "content", "from", "value"]), json_values),
)
messages = st.lists(message, max_size=5)
SHAPES = {
    "text": {"text": maybe_text},
    "prompt_completion": {"prompt": maybe_text, "completion": maybe_text},
    "conversational": {"prompt": messages, "completion": messages},
    "alpaca": {"instruction": maybe_text, "input": maybe_text, "output": maybe_text},
    "chat": {"messages": messages},
    "sharegpt": {"conversations": messages},
    "preference": {"prompt": maybe_text, "chosen": maybe_text, "rejected": maybe_text},
    "implicit_preference": {"chosen": messages, "rejected": messages},
}


PAIR_SHAPES = ("preference", "implicit_preference")


@st.composite
def shaped_row(draw, shape: str) -> dict:
    """A row of one known format, with random values, a field dropped or extra fields now and then."""
    row = {k: draw(v) for k, v in SHAPES[shape].items()}
    if draw(st.integers(0, 7)) == 0:
        del row[draw(st.sampled_from(sorted(row)))]
    if draw(st.integers(0, 3)) == 0:
        row.update(draw(st.dictionaries(any_text, json_values, max_size=2)))
    return row


@st.composite
def rows(draw, shape: str) -> list:
    """Rows mostly of one shape (as real files are), some of anything."""
    other = st.dictionaries(st.sampled_from(FIELDS) | any_text, json_values, max_size=4)
    n = draw(st.integers(1, 6))
    return [
        draw(shaped_row(shape) if draw(st.integers(0, 5)) else (other | json_values))
        for _ in range(n)
    ]


def _jsonl(records: list, ensure_ascii: bool) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in records).encode(
        "utf-8", "surrogatepass"
    )


def _csv(records: list) -> bytes:
    keys = sorted({str(k) for r in records if isinstance(r, dict) for k in r}) or ["text"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(keys)
    for r in records:
        r = r if isinstance(r, dict) else {}
        w.writerow([str(r.get(k, "")) for k in keys])
    return buf.getvalue().encode("utf-8", "surrogatepass")


@st.composite
def data_files(draw, shape: str) -> tuple[str, bytes]:
    records = draw(rows(shape))
    kind = draw(st.sampled_from(["jsonl", "json", "csv"]))
    if kind == "jsonl":
        body = _jsonl(records, ensure_ascii=draw(st.integers(0, 3)) > 0)
    elif kind == "json":
        body = json.dumps(records, ensure_ascii=True).encode()
    else:
        body = _csv(records)
    if draw(st.integers(0, 3)) == 0:  # corrupt it: a BOM, a stray byte, a NUL, a cut
        junk = draw(
            st.sampled_from(
                [
                    b"\xef\xbb\xbf",
                    b"\xff\xfe",
                    b"\xff",
                    b"\x00",
                    b"\r",
                    b"\xc3",
                    b"\n\n",
                    b'"',
                    b"{",
                ]
            )
        )
        at = draw(st.integers(0, len(body)))
        body = body[:at] + junk + body[at:]
    elif draw(st.integers(0, 5)) == 0:  # as Windows PowerShell writes it
        body = body.decode("utf-8", "surrogatepass").encode("utf-16", "surrogatepass")
    return kind, body


data_settings = st.fixed_dictionaries(
    {
        "format": st.sampled_from(["auto"] * 8 + FORMATS),
        "eval": st.sampled_from([None, None, 0.0, 0.3]),
        "max_length": st.integers(1, 48),
        "truncation": st.sampled_from(["truncate", "drop", "error"]),
        "loss_on": st.sampled_from(["completion", "all"]),
        "skip_bad_rows": st.booleans(),
        "template": st.sampled_from([None, "chatml", "plain"]),
        "empty_completion": st.sampled_from(["warn", "drop", "error"]),
        "max_examples": st.sampled_from([None, 1, 3]),
    }
)


@pytest.fixture(scope="module")
def toks():
    """Both tokenizer kinds of the test models: character-level and byte-level BPE."""
    from conftest import qwen2_tokenizer

    return {"char": build_tokenizer(), "bpe": qwen2_tokenizer()}


def _one_line(e: TunesmithError) -> None:
    msg = str(e)
    assert msg.strip(), f"{type(e).__name__} with an empty message"
    assert "\n" not in msg, f"a multi-line error: {msg!r}"


@st.composite
def data_cases(draw) -> tuple[list[tuple[str, bytes]], dict, RecordKind, str]:
    """(train file [, held-out file], data settings, record kind, tokenizer): the kind the
    shape's task would read, mostly."""
    shape = draw(st.sampled_from(sorted(SHAPES)))
    kind = PAIRS if shape in PAIR_SHAPES else EXAMPLES
    if draw(st.integers(0, 9)) == 0:
        kind = EXAMPLES if kind is PAIRS else PAIRS
    files = [draw(data_files(shape))]
    if draw(st.integers(0, 3)) == 0:  # a held-out file of its own
        files.append(draw(data_files(shape)))
    return files, draw(data_settings), kind, draw(st.sampled_from(["char", "bpe"]))


@settings(FUZZ, max_examples=DEEP or 120)
@given(data_cases())
def test_prepare_data_only_raises_one_line_errors(tmp_path, toks, case):
    files, options, kind, tok = case
    paths = []
    for i, (suffix, body) in enumerate(files):
        paths.append(tmp_path / f"fuzz{i}.{suffix}")
        paths[-1].write_bytes(body)
    if len(paths) > 1:
        options = {**options, "eval": str(paths[1])}
    try:
        prepare_data(DataConfig(train=str(paths[0]), **options), toks[tok], 0, kind)
    except TunesmithError as e:
        _one_line(e)


@FUZZ
@given(st.binary(max_size=200), st.sampled_from(["jsonl", "json", "csv"]))
def test_read_records_of_random_bytes(tmp_path, data, suffix):
    path = tmp_path / f"bytes.{suffix}"
    path.write_bytes(data)
    try:
        read_records(str(path))
    except TunesmithError as e:
        _one_line(e)


# ----------------------------------------------------------------------------------------------
# Configs


def _schema_keys() -> dict[str, list[str]]:
    out = {"": [f.name for f in dataclasses.fields(Config) if f.name != "sections"]}
    for name, hint in typing.get_type_hints(Config).items():
        if dataclasses.is_dataclass(hint):
            out[name] = [f.name for f in dataclasses.fields(hint)]
    out["method"] = ["name", "rank", "alpha", "dropout", "targets", "virtual_tokens", "init"]
    return out


SCHEMA = _schema_keys()
config_values = (
    scalars
    | st.sampled_from(
        ["lora", "full", "prefix", "prompt", "adapter", "sft", "dpo", "reward", "cpu", "auto"]
    )
    | st.lists(scalars, max_size=3)
    | st.dictionaries(any_text, scalars, max_size=2)
)


@st.composite
def configs(draw) -> dict:
    out: dict = {}
    for section, keys in SCHEMA.items():
        if section and not draw(st.booleans()):
            continue
        chosen = draw(st.lists(st.sampled_from(keys) | any_text, max_size=3))
        values = {k: draw(config_values) for k in chosen}
        if section:
            out[section] = draw(st.sampled_from([values, values, None, "lora", 3, []]))
        else:
            out.update(values)
    return out


@FUZZ
@given(configs())
def test_load_config_only_raises_config_errors(data):
    try:
        load_config(data)
    except TunesmithError as e:
        _one_line(e)


@FUZZ
@given(
    st.lists(
        st.builds(
            lambda k, v: f"{k}={v}",
            st.sampled_from(
                [f"{s}.{k}" if s else k for s, keys in SCHEMA.items() for k in keys] + ["a..b", ""]
            ),
            st.text(max_size=12)
            | st.sampled_from(["[", "{a: 1", ".nan", ".inf", "-.inf", "1e999"]),
        ),
        max_size=4,
    )
)
def test_overrides_only_raise_config_errors(overrides):
    try:
        load_config({}, overrides)
    except TunesmithError as e:
        _one_line(e)


@FUZZ
@given(configs())
def test_config_files_written_as_yaml(tmp_path, data):
    """The same random configs, through a YAML file (YAML's own types: dates, sets, non-string keys)."""
    try:
        text = yaml.safe_dump(data, allow_unicode=True)
        (tmp_path / "c.yaml").write_text(text, encoding="utf-8")
    except (yaml.YAMLError, UnicodeEncodeError):
        assume(False)  # not representable as a UTF-8 YAML file (a lone surrogate)
    try:
        load_config(tmp_path / "c.yaml")
    except TunesmithError as e:
        _one_line(e)


@pytest.mark.parametrize(
    "text",
    [
        "train: {lr: 2020-01-01}\n",
        "train: !!set {a, b}\n",
        "{1: 2}\n",
        "data: {train: [a, b]}\n",
        "? [a]\n: 1\n",
        "train: &x {lr: 1}\nmodel: *x\n",
        "- a\n- b\n",
        "method: {name: {a: 1}}\n",
        "train: {betas: [0.9]}\n",
        "train: {device: 5}\n",
        "dpo: [1]\n",
        "task: [sft]\n",
    ],
)
def test_config_files_with_yaml_specific_types(tmp_path, text):
    (tmp_path / "c.yaml").write_text(text)
    try:
        load_config(tmp_path / "c.yaml")
    except TunesmithError as e:
        _one_line(e)


@FUZZ
@given(st.binary(max_size=120) | st.text(max_size=120).map(str.encode))
def test_config_file_of_random_bytes(tmp_path, body):
    path = tmp_path / "c.yaml"
    path.write_bytes(body)
    try:
        load_config(path)
    except TunesmithError as e:
        _one_line(e)


@pytest.mark.parametrize(
    "section, key",
    [("train", "lr"), ("train", "epochs"), ("train", "warmup"), ("data", "eval")],
)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_numbers_are_refused(section, key, value):
    """Found by the fuzzer: NaN passed every range check (all comparisons with NaN are false)."""
    with pytest.raises(TunesmithError, match=rf"{section}\.{key}: got (nan|inf)"):
        load_config({section: {key: value}})


def test_yaml_dump_of_config_round_trips():
    """A config written back to YAML (as run folders do) loads to the same config."""
    cfg = load_config({"train": {"lr": 1e-3}, "data": {"empty_completion": "drop"}})
    again = load_config(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again.to_dict() == cfg.to_dict()
