import copy
import json
import random

import numpy as np
import pytest
from conftest import write_jsonl

from tunesmith.builtin.tokenizer import build_tokenizer
from tunesmith.config import DataConfig
from tunesmith.data.batching import Batches, group_by_length, pack_rows
from tunesmith.data.dataset import prepare_data
from tunesmith.data.io import read_records
from tunesmith.errors import ConfigError, DataError, TunesmithError
from tunesmith.preview import mark_supervised


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def prep(tok, train, **kw):
    return prepare_data(DataConfig(train=str(train), eval=None, **kw), tok, 0)


def test_formats_detected_and_reported(tmp_path, tok):
    cases = {
        "chat": {
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
        },
        "prompt_completion": {"prompt": "a", "completion": "b"},
        "alpaca": {"instruction": "do", "input": "x", "output": "y"},
        "text": {"text": "hello"},
    }
    for fmt, row in cases.items():
        data = prep(tok, write_jsonl(tmp_path / f"{fmt}.jsonl", [row]))
        assert data.format == fmt
        assert any(f"chose '{fmt}'" in n for n in data.notes)


def test_read_json_csv_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("prompt,completion\np1,c1\np2,c2\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.json", "d.csv", "d.parquet"):
        records, _ = read_records(str(tmp_path / name))
        assert [r.fields for r in records] == rows


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "broken\n{"text": "fine"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON.*skip_bad_rows"):
        read_records(str(path))
    records, report = read_records(str(path), skip_bad_rows=True)
    assert len(records) == 2 and report.skipped == 1


def test_missing_field_names_field_and_fitting_formats(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "text": "b"}])
    with pytest.raises(
        DataError,
        match=r"d.jsonl:1: missing field 'completion' for format 'prompt_completion'.*fit.*text",
    ):
        prep(tok, path, format="prompt_completion")
    path = write_jsonl(tmp_path / "e.jsonl", [{"question": "a"}])
    with pytest.raises(
        DataError, match=r"e.jsonl:1: no known format fits the fields \['question'\]"
    ):
        prep(tok, path)


def test_empty_and_missing_files(tmp_path, tok):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        read_records(str(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match="file not found"):
        read_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unknown file type"):
        read_records(str(tmp_path / "x.txt"))


def test_truncation_counted_dropped_or_refused(tmp_path, tok):
    rows = [{"prompt": "p", "completion": "x" * 50}, {"prompt": "p", "completion": "short"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = prep(tok, path, max_length=20)
    assert data.stats.truncated == 1 and max(data.stats.lengths) == 20
    assert any("exceed data.max_length=20" in n for n in data.notes)
    data = prep(tok, path, max_length=20, truncation="drop")
    assert data.stats.examples == 1 and data.stats.dropped_long == 1
    with pytest.raises(DataError, match=r"d.jsonl:1: 52 tokens exceed data.max_length=20"):
        prep(tok, path, max_length=20, truncation="error")


@pytest.mark.parametrize(
    "template, expected, end",
    [
        (
            "chatml",
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n"
            "[[A1<|im_end|>\n]]<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n[[A2<|im_end|>\n]]",
            "<|im_end|>",
        ),
        (
            None,
            "System: S\nUser: Q1\nAssistant: [[A1</s>\n]]User: Q2\nAssistant: [[A2</s>\n]]",
            "</s>",
        ),
    ],
)
def test_chat_supervises_exactly_assistant_turns_and_end_of_turn(
    tmp_path, tok, template, expected, end
):
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]
    data = prep(tok, write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}]), template=template)
    ex = data.train[0]
    assert mark_supervised(ex, tok) == expected
    assert (ex.labels == tok.convert_tokens_to_ids(end)).sum() == 2  # both end-of-turn tokens train


def test_prompt_completion_supervises_completion_and_eos(tmp_path, tok):
    data = prep(tok, write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q:", "completion": " 42"}]))
    assert mark_supervised(data.train[0], tok) == "Q:[[ 42</s>]]"
    data = prep(
        tok,
        write_jsonl(tmp_path / "e.jsonl", [{"prompt": "Q:", "completion": " 42"}]),
        loss_on="all",
    )
    assert data.train[0].n_supervised == len(data.train[0]) - 1


def test_preflight_no_supervised_tokens(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": "x" * 30, "completion": "y"}, {"prompt": "a", "completion": "b"}],
    )
    with pytest.raises(
        DataError, match=r"d.jsonl:1: no supervised tokens after truncation to data.max_length=10"
    ):
        prep(tok, path, max_length=10)
    data = prep(tok, path, max_length=10, skip_bad_rows=True)
    assert data.stats.examples == 1 and data.stats.dropped_unsupervised == 1


def test_preflight_end_token_never_supervised(tmp_path, tok):
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    (tmp_path / "t.jinja").write_text(template)
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    )
    with pytest.raises(
        DataError, match="end-of-sequence / end-of-turn token .* is never supervised"
    ):
        prep(tok, path, template=str(tmp_path / "t.jinja"))


def test_preflight_padding_must_not_hide_eos(tmp_path, tok, monkeypatch):
    import tunesmith.data.dataset as dataset
    from tunesmith.data.batching import collate
    from tunesmith.data.tokenize import IGNORE

    rows = [{"prompt": "Q", "completion": "a"}, {"prompt": "Question", "completion": "b"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    pad_is_eos = copy.deepcopy(tok)
    pad_is_eos.pad_token = pad_is_eos.eos_token
    prep(pad_is_eos, path)  # tunesmith's collator masks padding by position: EOS stays trained

    def masks_by_id(examples, rows, pad_id):  # the classic bug, for the check to catch
        batch = collate(examples, rows, pad_id)
        batch.labels[batch.labels == pad_id] = IGNORE
        return batch

    monkeypatch.setattr(dataset, "collate", masks_by_id)
    with pytest.raises(DataError, match="padding masks trained tokens \\(the pad token equals EOS"):
        prep(pad_is_eos, path)


def test_chat_needs_a_template(tmp_path, tok):
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    )
    with pytest.raises(ConfigError, match="data.template=chatml"):
        prep(bare, path)
    assert prep(bare, path, template="chatml").format == "chat"


def test_pack_rows_fills_and_respects_limit():
    lengths = [5, 3, 7, 2, 8, 1, 4]
    rows = pack_rows(lengths, list(range(7)), max_length=10)
    assert sorted(i for r in rows for i in r) == list(range(7))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == 4  # first fit in the given order
    decreasing = sorted(range(7), key=lambda i: -lengths[i])
    assert len(pack_rows(lengths, decreasing, max_length=10)) == 3  # 30 tokens, rows of 10: perfect


def test_batches_reproducible_and_resumable(tmp_path, tok, pc_data):
    data = prep(tok, pc_data)
    b = Batches(data.train, 4, 64, tok.pad_token_id, packing=True, seed=3)
    first = [x.input_ids for _, x in zip(range(10), b.stream())]
    again = [
        x.input_ids
        for _, x in zip(range(10), Batches(data.train, 4, 64, tok.pad_token_id, True, 3).stream())
    ]
    state = Batches(data.train, 4, 64, tok.pad_token_id, True, 3)
    state.load_state_dict({"position": 6})
    resumed = [x.input_ids for _, x in zip(range(4), state.stream())]
    assert b.state_dict() == {
        "position": 10,
        "rows_per_micro": 4,
        "world": 1,
        "share_prefix": False,
    }
    assert all(np.array_equal(a, c) for a, c in zip(first, again))
    assert all(np.array_equal(a, c) for a, c in zip(first[6:], resumed))


def test_group_by_length_batches_similar_lengths():
    """Every example once per epoch, batches of similar length (less padding than random),
    batch order and membership still depend on the seed."""
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(1000)]
    order = list(range(1000))
    rng.shuffle(order)
    batches = group_by_length(lengths, order, 8, random.Random(1))
    flat = sorted(i for b in batches for r in b for i in r)
    assert flat == list(range(1000)) and all(len(b) == 8 for b in batches)

    def padded(bs):
        return sum(len(b) * max(lengths[r[0]] for r in b) for b in bs)

    shuffled = [[[i] for i in order[k : k + 8]] for k in range(0, 1000, 8)]
    assert padded(batches) < 0.7 * padded(shuffled)
    assert batches != group_by_length(lengths, order, 8, random.Random(2))


def test_grouped_batches_resume_and_preference_pairs(tmp_path, tok, pc_data):
    """Grouped plans are reproducible from (seed, epoch); pairs (group 2) stay together."""
    data = prep(tok, pc_data)
    a = Batches(data.train, 4, 64, tok.pad_token_id, False, 3, group_by_length=True)
    b = Batches(data.train, 4, 64, tok.pad_token_id, False, 3, group_by_length=True)
    assert a.plan(0) == b.plan(0) and a.plan(0) != a.plan(1)
    pairs = Batches(data.train, 2, 64, tok.pad_token_id, False, 3, group=2, group_by_length=True)
    batch = pairs.collate(pairs.plan(0)[0])
    assert batch.input_ids.shape[0] == 4  # two pairs: both chosen rows, then both rejected


def test_resume_takes_the_checkpoints_pair_layout(tmp_path, tok, pc_data):
    """Pairs in one row are planned by their shared rows' lengths. A checkpoint taken with one
    layout resumes with that layout where it is possible (``data.share_prompt: auto`` may resolve
    otherwise on another device), so the batches continue exactly; a checkpoint of shared rows
    where they are not possible stops with a one-line message."""
    data = prep(tok, pc_data)
    kw = dict(group=2, group_by_length=True)

    def batches(**more):
        return Batches(data.train, 2, 64, tok.pad_token_id, False, 3, **kw, **more)

    shared, apart = batches(share_prefix=True), batches()
    assert shared.plan(0) != apart.plan(0)
    shared.position = 3
    resumed = batches(shareable=True)
    resumed.load_state_dict(shared.state_dict())
    assert resumed.share_prefix and resumed.plan(0) == shared.plan(0)
    apart.position = 3
    back = batches(share_prefix=True)
    back.load_state_dict(apart.state_dict())
    assert not back.share_prefix and back.plan(0) == apart.plan(0)
    with pytest.raises(TunesmithError, match="laid each pair in one row"):
        batches().load_state_dict(shared.state_dict())
