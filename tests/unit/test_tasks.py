"""The task registry: declarations drive shared code; a new task is one registration."""

import re
from pathlib import Path

import pytest

from tunesmith.config import TASKS as TASK_SETTINGS
from tunesmith.config import load_config
from tunesmith.data.kinds import EXAMPLES
from tunesmith.errors import ConfigError
from tunesmith.objectives.sft import SFTObjective
from tunesmith.tasks import TASKS, Task, matrix_markdown, register

README = Path(__file__).parents[2] / "README.md"


def test_readme_matrix_is_generated_from_the_registries():
    block = re.search(
        r"<!-- task-method matrix.*?-->\n(.*?)\n<!-- end of matrix -->", README.read_text(), re.S
    )
    assert block, "README lost its task x method matrix"
    assert block.group(1) == matrix_markdown(), "README matrix is stale: paste `tunesmith tasks`"


def test_unknown_task_names_the_closest():
    with pytest.raises(ConfigError, match="task: got 'dop'.*Did you mean 'dpo'"):
        load_config({"task": "dop"})


def test_task_sections_are_validated_and_saved():
    cfg = load_config({"task": "dpo", "dpo": {"beta": 0.3}})
    assert cfg.dpo.beta == 0.3 and cfg.to_dict()["dpo"]["beta"] == 0.3
    with pytest.raises(ConfigError, match="unknown key 'dpo.bta'"):
        load_config({"dpo": {"bta": 1}})
    with pytest.raises(ConfigError, match="dpo.beta: got -1.0"):
        load_config({"dpo": {"beta": -1}})


@pytest.fixture
def toy_task():
    """A new task registered from outside the package, as a plug-in would."""
    from dataclasses import dataclass

    @dataclass
    class ToyConfig:
        scale: float = 1.0
        """Multiplies the loss."""

    class Scaled(SFTObjective):
        def __init__(self, scale):
            self.scale = scale

        def __call__(self, model, batch):
            loss, metrics = super().__call__(model, batch)
            return self.scale * loss, metrics

    task = register(
        Task(
            name="toy",
            about="scaled SFT",
            records=EXAMPLES,
            head="lm",
            objective=lambda ctx: Scaled(ctx.cfg.toy.scale),
            section=ToyConfig,
        )
    )
    yield task
    del TASKS["toy"], TASK_SETTINGS["toy"]


def test_a_registered_task_trains_with_no_change_to_shared_code(toy_task, llama, pc_data, tmp_path):
    from conftest import base_config

    import tunesmith

    raw = base_config(llama, pc_data, tmp_path / "run", max_steps=2)
    result = tunesmith.train({**raw, "task": "toy", "toy": {"scale": 2.0}})
    assert result.metrics["steps"] == 2 and "eval_loss" in result.metrics
    assert load_config(tmp_path / "run" / "config.yaml").toy.scale == 2.0
