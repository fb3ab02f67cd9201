"""What the commands refuse before they touch anything: folders that hold the user's files, paths
that cannot exist, option values out of range, config files that say less (or twice) what the
user meant. Each refusal is one line, and what was on disk before is still there after."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.data.io import read_records
from tunesmith.errors import ConfigError, DataError, TunesmithError
from tunesmith.models import _hub_unreachable, resolve_model_path
from tunesmith.paths import looks_local, share_weights

CONFIGS = Path(__file__).parents[2] / "configs"


def _users_folder(path: Path) -> Path:
    path.mkdir()
    (path / "thesis.tex").write_text("years of work\n")
    return path


def test_quickstart_refuses_a_folder_it_did_not_make(tmp_path):
    from tunesmith.quickstart import quickstart

    mine = _users_folder(tmp_path / "mine")
    with pytest.raises(TunesmithError, match=r"--output-dir: .*mine is not empty"):
        quickstart(mine)
    assert (mine / "thesis.tex").read_text() == "years of work\n"


def test_quickstart_replaces_only_its_own_folder(tmp_path):
    from tunesmith.quickstart import MARK, claim_folder

    new = tmp_path / "new"
    claim_folder(new)
    assert (new / MARK).is_file()
    (new / "metrics.jsonl").write_text("{}\n")  # an earlier quickstart's run
    claim_folder(new)  # replaced
    assert sorted(p.name for p in new.iterdir()) == [MARK]
    (new / MARK).unlink()
    (new / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(TunesmithError, match="not empty"):
        claim_folder(new)
    assert (new / "metrics.jsonl").exists()
    empty = tmp_path / "empty"  # a link to an empty folder, then to a quickstart's own
    empty.mkdir()
    link = tmp_path / "link"
    link.symlink_to(empty)
    claim_folder(link)
    (link / "loss.svg").write_text("<svg/>")
    claim_folder(link)
    assert link.is_symlink() and sorted(p.name for p in empty.iterdir()) == [MARK]


def test_student_and_merge_refuse_a_non_empty_out_before_loading(tmp_path, capsys):
    from tunesmith.merge import merge_run

    out = _users_folder(tmp_path / "out")
    assert main(["student", "no-such-teacher-is-loaded", "--out", str(out)]) == 2
    assert "--out: " in capsys.readouterr().err
    run = tmp_path / "run"  # looks like a run folder; nothing in it would load
    run.mkdir()
    (run / "config.yaml").write_text("model: x\n")
    (run / "run.json").write_text("{}")
    with pytest.raises(TunesmithError, match=r"--out: .*out is not empty"):
        merge_run(run, out)
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


def test_a_students_build_interrupted_is_rebuilt(micro, tmp_path):
    """distill builds its student into the run's own folder; a build killed part-way (or one
    for other layers) is written again on the next launch."""
    from tunesmith.student import build_student

    init = tmp_path / "run" / "student-init"
    init.mkdir(parents=True)
    (init / "config.json").write_text("{}")  # what a killed build left
    build_student(micro, init, [0])
    assert json.loads((init / "student.json").read_text())["layers"] == [0]


def test_compare_checks_every_setting_before_writing(tmp_path):
    from tunesmith.compare import compare

    root = tmp_path / "cmp"
    with pytest.raises(ConfigError, match="rnk"):
        compare(
            str(CONFIGS / "sft_lora.yaml"),
            ["full", "lora"],
            [f"output_dir={root}"],
            options=["lora.rnk=2"],
        )
    assert not root.exists()  # so the corrected command runs in the same folder
    with pytest.raises(ConfigError, match="'lroa' is not among --methods"):
        compare(str(CONFIGS / "sft_lora.yaml"), ["lora"], [f"output_dir={root}"], ["lroa.rank=4"])
    assert not root.exists()


def test_compare_reads_set_values_as_the_config_does():
    from tunesmith.compare import _method_spec

    raw = load_config(CONFIGS / "sft_lora.yaml").to_dict()
    spec = _method_spec("full", raw, ["full.train.lr=3e-4", "lora.rank=4"])
    assert spec["train"]["lr"] == 3e-4 and spec["method"] == {"name": "full"}
    assert load_config(spec).train.lr == 3e-4


def _no_dns(*args):
    raise OSError(-2, "Name or service not known")


def test_missing_local_paths_are_not_tried_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("runs/nothere", "./m", "a/b/c", "~/m-that-is-not-here"):
        assert looks_local(name)
        with pytest.raises(TunesmithError, match="does not exist"):
            resolve_model_path(name)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    for hub_id in ("gpt2", "Qwen/Qwen2.5-0.5B"):  # no folder 'Qwen' here: a hub id
        assert not looks_local(hub_id)
        monkeypatch.setattr(socket, "getaddrinfo", lambda *a: [])  # online (no real lookup)
        _hub_unreachable.cache_clear()  # a run asks once per model
        assert resolve_model_path(hub_id) == hub_id
        monkeypatch.setattr(socket, "getaddrinfo", _no_dns)  # offline: at once, not a minute
        _hub_unreachable.cache_clear()
        with pytest.raises(TunesmithError, match="as a hub id it cannot be fetched"):
            resolve_model_path(hub_id)
    with pytest.raises(TunesmithError, match=r"^distill.teacher: "):
        resolve_model_path("runs/nothere", "distill.teacher")
    for data in ("good.txt", "runs/train.jsonl", "runs/data"):
        with pytest.raises(DataError, match="file not found"):
            read_records(data)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-new-tokens", "0"], "argument --max-new-tokens: got 0; must be >= 1"),
        (["--max-new-tokens", "many"], "got 'many'; expected a whole number"),
        (["--temperature", "-0.5"], "argument --temperature: got -0.5; must be >= 0"),
        (["--top-p", "1.5"], "argument --top-p: got 1.5; must be > 0 and <= 1"),
    ],
)
def test_generation_options_out_of_range_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "builtin:micro", "--prompt", "hi", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_sampling_at_temperature_zero_is_refused(capsys):
    assert (
        main(["generate", "no/such/model/here", "--prompt", "hi", "--sample", "--temperature", "0"])
        == 2
    )
    assert "--temperature 0 with --sample" in capsys.readouterr().err


def test_other_counts_are_checked(capsys):
    for argv in (
        ["eval", "x", "--samples", "-3"],
        ["feedback", "m", "--prompts", "p", "--out", "o", "--temperature", "-1"],
        ["feedback", "m", "--prompts", "p", "--out", "o", "--max-new-tokens", "0"],
        ["feedback", "m", "--prompts", "p", "--out", "o", "--port", "70000"],
    ):
        with pytest.raises(SystemExit):
            main(argv)
        assert "must be" in capsys.readouterr().err


def test_an_adapter_name_given_twice_is_refused(micro, capsys):
    argv = ["generate", micro, "--prompt", "hi", "--adapter", "a=r1", "--adapter", "a=r2"]
    assert main(argv) == 2
    assert "the name 'a' is given twice" in capsys.readouterr().err


def test_config_files_that_say_less_or_twice(tmp_path):
    empty = tmp_path / "e.yaml"
    empty.write_text("# nothing but a comment\n")
    with pytest.raises(ConfigError, match=r"e.yaml: the config file is empty"):
        load_config(empty)
    twice = tmp_path / "t.yaml"
    twice.write_text("model: builtin:micro\ntask: sft\ntrain:\n  lr: 1e-4\ntask: dpo\n")
    with pytest.raises(ConfigError, match=r"t.yaml:5: .*'task' is given twice .*first on line 2"):
        load_config(twice)
    merged = tmp_path / "m.yaml"  # YAML merge keys may override what they bring in
    merged.write_text("base: &b {lr: 1e-4, epochs: 2}\ntrain:\n  <<: *b\n  lr: 3e-4\n")
    with pytest.raises(ConfigError, match="unknown key 'base'"):  # read, then validated
        load_config(merged)
    anchors = tmp_path / "a.yaml"  # a merge that rewrites an anchored mapping is no repeat
    anchors.write_text("a: &a {x: 1}\nl:\n  - &b\n    <<: *a\n    x: 2\nm:\n  <<: *b\n")
    with pytest.raises(ConfigError, match="unknown key 'a'"):
        load_config(anchors)
    brace = tmp_path / "b.yaml"
    brace.write_text("model: builtin:micro\ndata:\n  train: {a: 1,\n  b: c: d\n")
    with pytest.raises(ConfigError, match=r"b.yaml:4: .*flow mapping that starts on line 3"):
        load_config(brace)


def test_weights_get_the_permissions_of_the_other_files(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    for f in ("model.safetensors", "checkpoints/weights.safetensors"):
        save_file({"w": torch.zeros(2)}, str(tmp_path / f))
        os.chmod(tmp_path / f, 0o600)  # what safetensors 0.8 writes
    share_weights(tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE((tmp_path / "checkpoints/weights.safetensors").stat().st_mode) == 0o600


def test_a_new_head_is_said_in_one_line(micro, capsys):
    import logging

    from tunesmith.config import ModelConfig
    from tunesmith.models import load_model

    logged: list[str] = []  # what transformers' loader logs past tunesmith's filter
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler)
    try:
        load_model(ModelConfig(name=micro), torch.device("cpu"), head="reward")
    finally:
        logger.removeHandler(handler)
    assert "new here (not in the checkpoint): score" in capsys.readouterr().err
    assert not any("LOAD REPORT" in m for m in logged)


def test_the_python_api_checks_what_it_is_given(tmp_path):
    import tunesmith

    assert load_config({"model": "x"}, "train.lr=1e-3").train.lr == 1e-3  # one override, bare
    with pytest.raises(ConfigError, match="overrides: each is a 'dotted.key=value' string"):
        load_config({"model": "x"}, [None])
    cfg = load_config({"model": "x"})
    cfg.method.rank = 0  # set by hand on a Config: checked again when it is used
    with pytest.raises(ConfigError, match="rank"):
        load_config(cfg)
    assert load_config({"model": "x"}, ["method.rank=8"]).method.rank == 8  # lora, the default
    assert issubclass(tunesmith.Interrupted, tunesmith.TunesmithError)
