"""The CPU malloc setting (``train.cpu_memory``) is made only where it belongs."""

import os
import subprocess
import sys

import pytest
import torch

import tunesmith
from tunesmith.training.memory import (
    M_MMAP_THRESHOLD,
    M_TRIM_THRESHOLD,
    SETTINGS,
    apply_settings,
    is_glibc,
    set_cpu_malloc,
    user_set_malloc,
)


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


@pytest.mark.skipif(not is_glibc(), reason="glibc's mallopt")
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


def test_fast_falls_back_on_an_older_glibc_and_never_sets_trim_alone():
    """glibc before 2.3x refuses an mmap threshold above 32 MiB: fast then uses 32 MiB; were
    that refused too, the trim threshold must stay unset (setting it alone would turn glibc's
    dynamic threshold off and pin the mmap threshold at 128 KB)."""
    calls = []

    def old_glibc(param, value):
        calls.append((param, value))
        return int(param != M_MMAP_THRESHOLD or value <= 2**25)

    assert apply_settings(old_glibc, SETTINGS["fast"])
    assert calls == [
        (M_MMAP_THRESHOLD, 2**30),
        (M_MMAP_THRESHOLD, 2**25),
        (M_TRIM_THRESHOLD, 2**31 - 1),
    ]
    calls.clear()
    assert not apply_settings(lambda p, v: calls.append((p, v)) or 0, SETTINGS["fast"])
    assert all(p == M_MMAP_THRESHOLD for p, _ in calls)
