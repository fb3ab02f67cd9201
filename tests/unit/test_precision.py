"""``train.precision: auto``: bf16 where it is faster (a bf16 GPU; a CPU with native bf16 and a
model wide enough), fp32 elsewhere; and runs that compute in bf16 on a CPU stay close to fp32."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import write_jsonl
from torch import nn

import tunesmith
from tunesmith.training import precision

CPU = torch.device("cpu")


def wide(hidden: int) -> nn.Module:
    model = nn.Linear(2, 2)
    model.config = SimpleNamespace(hidden_size=hidden)
    return model


@pytest.fixture
def native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)


def test_explicit_precision_is_kept(native_bf16):
    for p in ("fp32", "bf16"):
        assert precision.resolve_precision(p, CPU, wide(4096)) == p


def test_auto_on_a_cpu_with_native_bf16_depends_on_the_width(native_bf16):
    limit = precision.CPU_BF16_MIN_HIDDEN
    assert precision.resolve_precision("auto", CPU, wide(limit)) == "bf16"
    assert precision.resolve_precision("auto", CPU, wide(limit - 1)) == "fp32"
    assert precision.resolve_precision("auto", CPU, None) == "fp32"  # no model: no judgement
    assert precision.resolve_precision("auto", CPU, nn.Linear(2, 2)) == "fp32"  # no config


def test_auto_without_native_bf16_is_fp32(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_precision("auto", CPU, wide(4096)) == "fp32"


def test_native_bf16_is_read_from_the_cpu_flags():
    def cpuinfo(flags: str) -> bool:
        return precision.bf16_in_flags(f"processor\t: 0\nflags\t\t: {flags}\n")

    assert cpuinfo("fpu sse2 avx2 avx512f avx512_bf16") is True
    assert cpuinfo("fpu sse2 avx2 amx_bf16 amx_tile") is True
    assert cpuinfo("fpu sse2 avx2 avx512f avx512bw") is False  # AVX-512 without bf16


def run(model, data, out, **train):
    return tunesmith.train(
        {
            "model": str(model),
            "method": {"name": "lora", "rank": 4, "alpha": 8},
            "data": {"train": str(data), "eval": None, "max_length": 64},
            "train": {"max_steps": 6, "batch_size": 8, "lr": 1e-2, "progress": False, **train},
            "output_dir": str(out),
        }
    )


def losses(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_auto_trains_in_bf16_on_such_a_cpu_close_to_fp32(
    llama, pc_data, tmp_path, monkeypatch, native_bf16, capsys
):
    monkeypatch.setattr(precision, "CPU_BF16_MIN_HIDDEN", 32)  # the fixture is 32 wide
    run(llama, pc_data, tmp_path / "auto")
    assert "precision: auto chose bf16" in capsys.readouterr().err
    run(llama, pc_data, tmp_path / "fp32", precision="fp32")
    a, b = losses(tmp_path / "auto"), losses(tmp_path / "fp32")
    assert a != b  # bf16 did compute
    assert all(abs(x - y) <= 0.02 * y for x, y in zip(a, b)), (a, b)  # the curve follows fp32


def test_rl_old_logps_use_the_update_precision(llama, tmp_path, monkeypatch, native_bf16):
    """The no-grad pass (log pi_old) runs in the update's precision: on the first step of every
    rollout batch the ratio pi / pi_old is exactly 1, in bf16 too."""
    rows = [
        {"prompt": f"Q: {a}+{b}=", "completion": f" {a + b}"} for a in range(4) for b in range(4)
    ]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    (tmp_path / "bf16_rewards.py").write_text(
        "def digits(prompts, completions):\n"
        "    return [sum(c.isdigit() for c in t) / max(len(t), 1) for t in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(precision, "CPU_BF16_MIN_HIDDEN", 32)
    tunesmith.train(
        {
            "model": str(llama),
            "task": "grpo",
            "method": {"name": "lora", "rank": 4, "alpha": 8},
            "data": {"train": str(data), "eval": None, "max_length": 64},
            "grpo": {"reward": "bf16_rewards:digits", "max_new_tokens": 4, "group_size": 4},
            "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "progress": False},
            "output_dir": str(tmp_path / "run"),
        }
    )
    steps = [
        json.loads(x)
        for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if "ratio" in x
    ]
    assert steps and all(r["ratio"] == pytest.approx(1.0, abs=1e-6) for r in steps)
