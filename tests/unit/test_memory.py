"""The CPU malloc setting (``train.cpu_memory``) is made only where it belongs."""

import os
import subprocess
import sys

import pytest
import torch

import tunesmith
from tunesmith.training.memory import set_cpu_malloc, user_set_malloc


def test_not_on_gpu_nor_for_system_nor_over_the_users_own_setting(monkeypatch):
    for knob in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(knob, raising=False)
    assert set_cpu_malloc(torch.device("cpu"), "system") is False
    assert set_cpu_malloc(torch.device("cuda"), "fast") is False
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert set_cpu_malloc(torch.device("cpu"), "lean") is False


def test_users_own_knobs_are_recognised():
    assert not user_set_malloc({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"})
    assert user_set_malloc({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"})
    assert user_set_malloc({"MALLOC_MMAP_THRESHOLD_": "65536"})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("mode", ["fast", "lean"])
def test_set_on_cpu_with_glibc(mode):
    """In a process of its own: the setting is process-wide and cannot be undone."""
    code = (
        "import torch; from tunesmith.training.memory import set_cpu_malloc as s; "
        f"print(s(torch.device('cpu'), {mode!r}))"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    }
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "True", out.stderr


def test_a_wrong_value_names_the_key(tmp_path):
    with pytest.raises(tunesmith.ConfigError, match="train.cpu_memory"):
        tunesmith.load_config({"model": "m", "train": {"cpu_memory": "small"}})
