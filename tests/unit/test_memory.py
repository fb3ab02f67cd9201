"""The CPU malloc setting (``train.cpu_memory: lean``) is made only where it belongs."""

import os
import subprocess
import sys

import pytest
import torch

import tunesmith
from tunesmith.training.memory import release_freed_memory


def test_not_by_default_nor_on_gpu_nor_over_the_users_own_setting(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert release_freed_memory(torch.device("cpu"), wanted=False) is False
    assert release_freed_memory(torch.device("cuda"), wanted=True) is False
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert release_freed_memory(torch.device("cpu"), wanted=True) is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_set_on_cpu_with_glibc_when_asked():
    """In a process of its own: the setting is process-wide and cannot be undone."""
    code = (
        "import torch; from tunesmith.training.memory import release_freed_memory as r; "
        "print(r(torch.device('cpu'), wanted=True))"
    )
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "True", out.stderr


def test_a_wrong_value_names_the_key(tmp_path):
    with pytest.raises(tunesmith.ConfigError, match="train.cpu_memory"):
        tunesmith.load_config({"model": "m", "train": {"cpu_memory": "small"}})
