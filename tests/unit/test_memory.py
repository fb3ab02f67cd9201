"""The CPU malloc setting is made only where it belongs."""

import sys

import pytest
import torch

from tunesmith.training.memory import release_freed_memory


def test_not_on_gpu_nor_over_the_users_own_setting(monkeypatch):
    assert release_freed_memory(torch.device("cuda")) is False
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert release_freed_memory(torch.device("cpu")) is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_set_on_cpu_with_glibc(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert release_freed_memory(torch.device("cpu")) is True
