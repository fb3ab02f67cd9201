import pytest

from tunesmith.config import load_config
from tunesmith.errors import ConfigError


def test_defaults_and_shorthands():
    cfg = load_config({"model": "some/model", "method": "full"})
    assert cfg.model.name == "some/model"
    assert cfg.method.name == "full"
    assert cfg.task == "sft"
    assert load_config({}).method.name == "lora"


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError, match=r"unknown key 'train.learning_rat'.*Did you mean"):
        load_config({"train": {"learning_rat": 1e-3}})
    with pytest.raises(ConfigError, match=r"unknown key 'dta'. Did you mean 'data'"):
        load_config({"dta": {}})
    with pytest.raises(ConfigError, match=r"method.rnak.*Did you mean 'rank'"):
        load_config({"method": {"name": "lora", "rnak": 8}})


@pytest.mark.parametrize(
    "data, pattern",
    [
        ({"train": {"batch_size": "eight"}}, r"train.batch_size: got 'eight'; expected an integer"),
        ({"train": {"batch_size": 0}}, r"train.batch_size: got 0; must be > 0"),
        (
            {"train": {"schedule": "cosin"}},
            r"train.schedule: got 'cosin'; allowed: one of 'cosine', 'linear', 'constant'",
        ),
        ({"data": {"eval": 1.5}}, r"data.eval: got 1.5"),
        ({"method": {"name": "lora", "dropout": 2.0}}, r"method.dropout"),
        ({"method": "lorra"}, r"method.name: got 'lorra'.*Did you mean 'lora'"),
        ({"model": {"dtype": "fp8"}}, r"model.dtype"),
        ({"train": {"device": "tpu"}}, r"train.device"),
    ],
)
def test_bad_values_name_key_and_allowed(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(data)


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: m\nmethod: {name: lora, rank: 4}\ntrain:\n  lr: 1e-4\n  batch_size: 2\n"
    )
    cfg = load_config(
        path, ["train.lr=3e-4", "method.rank=8", "data.packing=false", "output_dir=runs/x"]
    )
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.method.rank == 8 and cfg.data.packing is False and cfg.output_dir == "runs/x"
    assert load_config(path).train.lr == pytest.approx(1e-4)  # '1e-4' reads as a number


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config({}, ["train.lr"])


def test_round_trip_through_dict():
    cfg = load_config({"method": {"name": "lora", "targets": ["q_proj"]}, "train": {"lr": 0.1}})
    again = load_config(cfg.to_dict())
    assert again == cfg


def test_a_config_built_directly_has_every_task_section():
    """``tunesmith.Config(...)`` (the package imports lazily) still knows every task's section."""
    import subprocess
    import sys

    code = "import tunesmith; print(tunesmith.Config(task='dpo').dpo.beta)"  # a fresh process
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "0.1", out.stderr
