"""The CPU malloc setting (``train.cpu_memory``) is made only where it belongs."""

import os
import subprocess
import sys

import pytest
import torch

import tunesmith
from tunesmith import cli
from tunesmith.training import memory
from tunesmith.training.memory import (
    M_MMAP_THRESHOLD,
    M_TRIM_THRESHOLD,
    PRELOADED,
    SETTINGS,
    allocator_env,
    apply_settings,
    caching_allocator,
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


def test_the_cli_restarts_under_tcmalloc_only_for_fast_and_only_once():
    env = {"PATH": "/bin"}
    got = allocator_env(env, "fast", "libtcmalloc_minimal.so.4")
    assert got["LD_PRELOAD"] == got[PRELOADED] == "libtcmalloc_minimal.so.4"
    assert got["PATH"] == "/bin" and "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD" in got
    assert allocator_env(env, "lean", "libtcmalloc_minimal.so.4") is None
    assert allocator_env(env, "system", "libtcmalloc_minimal.so.4") is None
    assert allocator_env(env, "fast", None) is None  # the system has none
    assert allocator_env(got, "fast", "libtcmalloc_minimal.so.4") is None  # restarted already
    for own in ({"LD_PRELOAD": "libjemalloc.so.2"}, {"MALLOC_MMAP_THRESHOLD_": "65536"}):
        assert allocator_env({**env, **own}, "fast", "libtcmalloc_minimal.so.4") is None


class Restarted(Exception):
    pass


def restart_args(monkeypatch, argv):
    """What the CLI would exec for the command line ``argv`` (None if it would not restart)."""
    calls = []

    def execve(path, args, env):
        calls.append((args, env))
        raise Restarted

    monkeypatch.setattr(memory, "caching_allocator", lambda: "libfake-malloc.so")
    monkeypatch.setattr(cli.os, "execve", execve)
    monkeypatch.setattr(sys, "argv", ["tunesmith", *argv])
    monkeypatch.setattr(sys, "orig_argv", ["python", "-u", "/venv/bin/tunesmith", *argv])
    for knob in ("LD_PRELOAD", PRELOADED, "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(knob, raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "")
    with pytest.raises(Restarted):
        cli.main()
    return calls[0]


def test_cli_train_restarts_itself_with_the_allocator(monkeypatch, tmp_path):
    """``tunesmith train`` re-executes itself, same arguments, with the library preloaded;
    not with ``train.cpu_memory: system``, not for other commands, not when called from Python."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: builtin:tiny\ntrain:\n  epochs: 1\n")
    args, env = restart_args(monkeypatch, ["train", str(cfg), "train.lr=1e-4"])
    assert args == [sys.executable, "-u", "/venv/bin/tunesmith", "train", str(cfg), "train.lr=1e-4"]
    assert env["LD_PRELOAD"] == "libfake-malloc.so"
    stopped = []
    monkeypatch.setitem(cli.COMMANDS, "train", lambda a: stopped.append(a.config))
    monkeypatch.setattr(sys, "argv", ["tunesmith", "train", str(cfg), "train.cpu_memory=system"])
    assert cli.main() == 0 and stopped == [str(cfg)]  # ran in this process
    cfg.write_text("train:\n  cpu_memory: lean\n")
    monkeypatch.setattr(sys, "argv", ["tunesmith", "train", str(cfg)])
    assert cli.main() == 0 and len(stopped) == 2
    monkeypatch.setattr(sys, "argv", ["tunesmith", "train", str(cfg)])
    cfg.write_text("model: builtin:tiny\n")
    assert cli.main(["train", str(cfg)]) == 0 and len(stopped) == 3  # from Python: never
    os.mkfifo(pipe := tmp_path / "pipe")  # a config that can be read once: no restart
    monkeypatch.setattr(sys, "argv", ["tunesmith", "train", str(pipe)])
    assert cli.main() == 0 and stopped[-1] == str(pipe)


@pytest.mark.skipif(caching_allocator() is None, reason="no tcmalloc on this system")
def test_the_preloaded_allocator_is_the_one_in_use(tmp_path):
    """Where the system has tcmalloc, a process started as the CLI restarts it is mapped in and
    serves allocations (torch's included)."""
    env = allocator_env(
        {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", PRELOADED)},
        "fast",
        caching_allocator(),
    )
    code = (
        "import torch; x = torch.ones(4096, 4096); "
        "print(any('tcmalloc' in line for line in open('/proc/self/maps')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "True", out.stderr


def test_under_a_preloaded_malloc_glibc_is_not_tuned(monkeypatch):
    """tcmalloc's mallopt accepts anything and does nothing: no setting is claimed under it."""
    for knob in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(knob, raising=False)
    monkeypatch.setenv("LD_PRELOAD", "libtcmalloc_minimal.so.4")
    assert set_cpu_malloc(torch.device("cpu"), "lean") is False


def test_kernel_caches_are_capped_on_cpu_unless_the_user_set_them(monkeypatch):
    for knob in memory.KERNEL_CACHE_KNOBS:  # recorded, so what the test sets is undone after
        monkeypatch.setenv(knob, "0")
        monkeypatch.delenv(knob)
    assert not memory.cap_kernel_caches(torch.device("cpu"), "system")
    assert not memory.cap_kernel_caches(torch.device("cuda"), "fast")
    assert all(k not in os.environ for k in memory.KERNEL_CACHE_KNOBS)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    assert memory.cap_kernel_caches(torch.device("cpu"), "lean")
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(memory.KERNEL_CACHE)
    assert os.environ["LRU_CACHE_CAPACITY"] == "7"  # the user's stands
    assert not memory.cap_kernel_caches(torch.device("cpu"), "fast")  # both set now


GROWTH = """
import os, sys, torch
from tunesmith.training.memory import cap_kernel_caches
if sys.argv[1] == "capped":
    cap_kernel_caches(torch.device("cpu"), "fast")
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
w, x = torch.randn(1408, 512).bfloat16(), torch.randn(600, 512).bfloat16()
x[:10] @ w.t()
before = rss()
for rows in range(64, 576):  # a new shape each time, as length-grouped batches give
    x[:rows] @ w.t()
print(rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_capped_kernel_caches_keep_memory_from_growing_with_new_shapes():
    """bf16 products of 512 row counts: with the caps, the process grows far less than with the
    libraries' 1,024-entry caches (each a process of its own: a cache's capacity is read once)."""
    env = {k: v for k, v in os.environ.items() if k not in memory.KERNEL_CACHE_KNOBS}
    growth = {}
    for mode in ("capped", "default"):
        out = subprocess.run(
            [sys.executable, "-c", GROWTH, mode], capture_output=True, text=True, env=env
        )
        assert out.returncode == 0, out.stderr
        growth[mode] = float(out.stdout.strip())
    if growth["default"] < 100:
        pytest.skip(f"this CPU's bf16 products keep no per-shape cache ({growth})")
    assert growth["capped"] < growth["default"] - 100, growth
