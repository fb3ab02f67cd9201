"""Crash safety: kills (SIGKILL, also mid-checkpoint), SIGTERM/SIGINT, NaN/inf steps, disk full.

Every recovery is checked against an uninterrupted run of the same config: the final weights
must be *bitwise* equal (``torch.equal``), and so must every logged loss.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import base_config, write_jsonl
from safetensors import SafetensorError
from safetensors.torch import load_file

import tunesmith
import tunesmith.training.loop as loop_module
from tunesmith.config import load_config
from tunesmith.errors import SaveError, TunesmithError
from tunesmith.objectives.sft import SFTObjective
from tunesmith.tasks import base as task_base
from tunesmith.training import checkpoint as ckpt
from tunesmith.training.guard import Interrupted, NonFiniteError, SignalGuard
from tunesmith.training.optim import lr_factor, warmup_steps

SRC = Path(__file__).resolve().parents[2] / "src"


def config(llama: Path, data: Path, out: Path, **train) -> dict:
    c = base_config(llama, data, out, **{"save_every": 2, "keep_checkpoints": 2, **train})
    c["method"]["dropout"] = 0.1  # the RNG state must come back too
    return c


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def losses(out: Path) -> list[float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert losses(a) == losses(b)


def cli(cfg_path: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``tunesmith train`` in a child process, with this process's thread count (so the float
    reductions, hence the bits, are the same as in-process runs)."""
    full_env = {k: v for k, v in os.environ.items() if k != "TUNESMITH_FAULT"}
    full_env |= {"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    full_env |= env or {}
    return subprocess.Popen(
        [sys.executable, "-m", "tunesmith.cli", "train", str(cfg_path), *extra],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def write_config(c: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(c))
    return path


def torn(out: Path) -> list[Path]:
    return list((out / "checkpoints").glob(".tmp-step-*"))


# ---------------------------------------------------------------------------------- kills


def test_sigkill_during_checkpoint_write_then_resume_is_bitwise_equal(llama, pc_data, tmp_path):
    ref = tmp_path / "ref"
    tunesmith.train(config(llama, pc_data, ref, max_steps=8))
    out = tmp_path / "run"
    cfg_path = write_config(config(llama, pc_data, out, max_steps=8), tmp_path / "c.yaml")
    # Point 8 = the 2nd file of the 2nd checkpoint (step 4): step-2 is complete, step-4 torn.
    proc = cli(cfg_path, "--resume", env={"TUNESMITH_FAULT": "kill-in-checkpoint:8"})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    assert "no complete checkpoint" in err and "starting from step 0" in err
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-0000002"]
    assert len(torn(out)) == 1
    tunesmith.train(config(llama, pc_data, out, max_steps=8), resume=True)
    assert not torn(out)
    assert_same_run(ref, out)


def test_torn_checkpoints_are_skipped_with_one_line_each(llama, pc_data, tmp_path, capsys):
    ref = tmp_path / "ref"
    tunesmith.train(config(llama, pc_data, ref, max_steps=6))
    out = tmp_path / "run"
    tunesmith.train(config(llama, pc_data, out, max_steps=6, keep_checkpoints=3))
    root = out / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == [
        "step-0000002",
        "step-0000004",
        "step-0000006",
    ]
    for p in ckpt.list_checkpoints(root):
        assert ckpt.verify_checkpoint(p) is None
    # Newest: one flipped byte (same size); middle: its manifest never made it to disk.
    w = root / "step-0000006" / "optimizer.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    (root / "step-0000004" / "manifest.json").unlink()
    assert "checksum" in ckpt.verify_checkpoint(root / "step-0000006")
    capsys.readouterr()
    # The run folder holds a finished run; resuming it redoes steps 3-6 from step-2.
    tunesmith.train(config(llama, pc_data, out, max_steps=6, keep_checkpoints=3), resume=True)
    err = capsys.readouterr().err
    skipped = [ln for ln in err.splitlines() if "skipping checkpoint" in ln]
    assert len(skipped) == 2, err
    assert "step-0000006: optimizer.safetensors does not match its checksum" in skipped[0]
    assert "step-0000004: no manifest.json" in skipped[1]
    assert "resuming from" in err and "step-0000002 (step 2 of 6)" in err
    assert_same_run(ref, out)
    # Truncation (a short file) is caught by its size before any hashing.
    w = root / "step-0000006" / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    assert "has 100 bytes, the manifest says" in ckpt.verify_checkpoint(root / "step-0000006")


def test_resume_without_checkpoint_starts_fresh_and_says_so(llama, pc_data, tmp_path, capsys):
    out = tmp_path / "run"
    tunesmith.train(config(llama, pc_data, out, max_steps=2), resume=True)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "--resume" in ln]
    assert lines == [
        f"tunesmith: --resume: no complete checkpoint in {out / 'checkpoints'} yet; starting from step 0."
    ]
    assert (out / "run.json").exists()


@pytest.mark.slow
def test_random_sigkills_resume_to_the_uninterrupted_weights(llama, pc_data, tmp_path):
    """The same command, relaunched with --resume after each SIGKILL (as a scheduler does), at
    random moments of training and at random points inside checkpoint writes."""
    steps = 60
    ref = tmp_path / "ref"
    tunesmith.train(config(llama, pc_data, ref, max_steps=steps, save_every=3))
    out = tmp_path / "run"
    cfg_path = write_config(
        config(llama, pc_data, out, max_steps=steps, save_every=3), tmp_path / "c.yaml"
    )
    rng, KILLS = random.Random(15), 12
    kills, mid_write, launches, seen_torn, log = 0, 0, 0, set(), []
    metrics = out / "metrics.jsonl"
    while True:
        launches += 1
        assert launches < 30, "the run never finished"
        fault = kills < KILLS and rng.random() < 0.4
        env = {"TUNESMITH_FAULT": f"kill-in-checkpoint:{rng.randint(1, 12)}"} if fault else {}
        last = ckpt.latest_complete(out / "checkpoints")
        base = int(last.name.split("-")[1]) if last else 0
        launched = time.time()
        proc = cli(cfg_path, "--resume", env=env)
        if not fault and kills < KILLS:
            # A random moment once this launch has trained 1-8 steps past where it resumed.
            target = base + rng.randint(1, 8)
            while proc.poll() is None:
                if metrics.exists() and metrics.stat().st_mtime > launched:
                    steps_seen = [
                        json.loads(x).get("step", 0) for x in metrics.open() if x.endswith("\n")
                    ]
                    if max(steps_seen, default=0) >= target:
                        break
                time.sleep(0.005)
            time.sleep(rng.uniform(0, 0.05))
            if proc.poll() is None:
                proc.kill()
        _, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err
        kills += 1
        new_torn = {p.name for p in torn(out)} - seen_torn
        mid_write += bool(new_torn)
        seen_torn |= new_torn
        # A checkpoint under its final name is always complete, whatever the moment of the kill.
        for p in ckpt.list_checkpoints(out / "checkpoints"):
            assert ckpt.verify_checkpoint(p) is None, p
        log.append(
            f"kill {kills}: {env.get('TUNESMITH_FAULT', 'timed')}, resumed from step {base}"
            f"{', torn write left' if new_torn else ''}"
        )
    print(
        "", *log, f"kills {kills}, mid-checkpoint-write {mid_write}, launches {launches}", sep="\n"
    )
    assert kills == KILLS and mid_write >= 3
    assert_same_run(ref, out)


# ------------------------------------------------------------------------------- signals


def _signal_at_step(monkeypatch, k: int, signum: int, times: int = 1) -> None:
    """Deliver ``signum`` to this process right after the k-th optimiser step."""
    real, calls = loop_module.train_step, [0]

    def step_then_signal(*a, **kw):
        out = real(*a, **kw)
        calls[0] += 1
        if calls[0] == k:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(loop_module, "train_step", step_then_signal)


def test_sigint_writes_a_checkpoint_and_resumes_bitwise(llama, pc_data, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    tunesmith.train(config(llama, pc_data, ref, max_steps=6, save_every=None))
    out = tmp_path / "run"
    _signal_at_step(monkeypatch, 3, signal.SIGINT)
    with pytest.raises(Interrupted) as e:
        tunesmith.train(config(llama, pc_data, out, max_steps=6, save_every=None))
    assert e.value.exit_code == 130
    assert "stopped by SIGINT after step 3 of 6; checkpoint" in str(e.value)
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step-0000003"]
    assert not (out / "run.json").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    monkeypatch.undo()
    tunesmith.train(config(llama, pc_data, out, max_steps=6, save_every=None), resume=True)
    assert_same_run(ref, out)


@pytest.mark.parametrize("method", ["lora", "full"])  # full: a cached reference too
def test_dpo_resumes_with_its_pair_layout_where_auto_resolves_otherwise(
    llama, tmp_path, monkeypatch, capsys, method
):
    """A DPO run whose pairs were laid one per row (``data.share_prompt: auto`` on CPU), resumed
    where ``auto`` would keep separate rows (as on a GPU), keeps the checkpoint's layout for its
    batches, its cached reference and its held-out batches, and ends bitwise equal to the
    uninterrupted run, held-out metrics included."""
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    rows = [
        {"prompt": f"Q: {a} plus {b} is", "chosen": f" {a + b}.", "rejected": f" {a + b + 3}, no"}
        for a in range(5)
        for b in range(4)
    ]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)

    def dpo(out):
        c = config(llama, pairs, out, max_steps=6, save_every=None, eval_every=2)
        return {**c, "task": "dpo", "method": c["method"] if method == "lora" else "full"}

    ref = tmp_path / "ref"
    tunesmith.train(dpo(ref))
    out = tmp_path / "run"
    _signal_at_step(monkeypatch, 3, signal.SIGINT)
    with pytest.raises(Interrupted):
        tunesmith.train(dpo(out))
    monkeypatch.undo()
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(task_base, "AUTO_SHARE_DEVICES", ())
    capsys.readouterr()
    tunesmith.train(dpo(out), resume=True)
    said = capsys.readouterr().err
    assert "auto keeps the checkpoint's layout (one row per pair)" in said
    assert "one per row with the prompt once" in said  # and lays them so from the start
    for name in [p.name for p in ref.glob("*.safetensors")]:
        a, b = load_file(str(ref / name)), load_file(str(out / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name

    def evals(run):
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [
            (r.get("step"), r["eval_loss"], r["eval_accuracy"]) for r in lines if "eval_loss" in r
        ]

    assert evals(out) == evals(ref) and len(evals(ref)) >= 3
    assert losses(out) == losses(ref)


def test_second_signal_exits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    with SignalGuard() as guard:
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.signum == signal.SIGTERM and exits == []
        os.kill(os.getpid(), signal.SIGTERM)
        assert exits == [143]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_cli_sigterm_exits_143_with_one_resume_line(llama, pc_data, tmp_path, monkeypatch, capsys):
    from tunesmith.cli import main

    out = tmp_path / "run"
    cfg_path = write_config(config(llama, pc_data, out, max_steps=6), tmp_path / "c.yaml")
    _signal_at_step(monkeypatch, 3, signal.SIGTERM)
    assert main(["train", str(cfg_path), "train.lr=0.01"]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert "SIGTERM received: finishing this step and writing a checkpoint" in err[-2]
    step3 = out / "checkpoints" / "step-0000003"
    assert err[-1] == (
        f"tunesmith: stopped by SIGTERM after step 3 of 6; checkpoint {step3} written; "
        f"resume with: tunesmith train {cfg_path} train.lr=0.01 --resume"
    )
    assert ckpt.verify_checkpoint(step3) is None
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.slow
def test_sigterm_from_outside_exits_143_with_a_resume_line(llama, pc_data, tmp_path):
    out = tmp_path / "run"
    c = config(llama, pc_data, out, max_steps=100_000, save_every=None)
    cfg_path = write_config(c, tmp_path / "c.yaml")
    proc = cli(cfg_path, "train.progress=false")
    metrics = out / "metrics.jsonl"
    t0 = time.monotonic()
    while not (metrics.exists() and metrics.stat().st_size) and time.monotonic() - t0 < 120:
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("tunesmith: stopped by SIGTERM after step ")
    assert last.endswith(f"resume with: tunesmith train {cfg_path} train.progress=false --resume")
    (done,) = ckpt.list_checkpoints(out / "checkpoints")
    assert ckpt.verify_checkpoint(done) is None
    assert f"checkpoint {done} written" in last


# ------------------------------------------------------------------------------ NaN / inf


def _nan_at(monkeypatch, bad_steps: set[int]) -> None:
    """Make the SFT loss NaN on the given (1-based) training steps (grad_accum 1)."""
    real, calls = SFTObjective.__call__, [0]

    def poisoned(self, model, batch):
        loss, m = real(self, model, batch)
        if model.training:
            calls[0] += 1
            if calls[0] in bad_steps:
                loss = loss * float("nan")
        return loss, m

    monkeypatch.setattr(SFTObjective, "__call__", poisoned)


def test_nan_step_is_skipped_and_counted(llama, pc_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _nan_at(monkeypatch, {3})
    tunesmith.train(config(llama, pc_data, out, max_steps=5, save_every=1, keep_checkpoints=9))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in records if "loss" in r}
    assert by_step[3]["skipped"] is True and by_step[3]["nan_steps"] == 1
    assert "skipped" not in by_step[4] and by_step[5]["nan_steps"] == 1
    assert "step 3: non-finite loss (nan)" in capsys.readouterr().err
    root = out / "checkpoints"
    w2, w3, w4 = (
        load_file(str(root / f"step-000000{s}" / "weights.safetensors")) for s in (2, 3, 4)
    )
    o2, o3 = (load_file(str(root / f"step-000000{s}" / "optimizer.safetensors")) for s in (2, 3))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # the NaN step changed nothing
    assert all(torch.equal(o2[k], o3[k]) for k in o2)
    assert any(not torch.equal(w3[k], w4[k]) for k in w3)  # the next step did
    for s in range(1, 6):
        for t in load_file(str(root / f"step-000000{s}" / "weights.safetensors")).values():
            assert torch.isfinite(t).all()


def test_nan_policy_stop_keeps_the_last_good_checkpoint(
    llama, pc_data, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    _nan_at(monkeypatch, {3})
    with pytest.raises(NonFiniteError) as e:
        tunesmith.train(config(llama, pc_data, out, max_steps=6, nan_policy="stop"))
    msg = str(e.value)
    assert msg.startswith("step 3: loss nan (train.nan_policy=stop)")
    assert "step-0000002 is intact" in msg and "lower train.lr" in msg and "fp32" in msg
    assert "max_grad_norm" in msg
    (only,) = ckpt.list_checkpoints(out / "checkpoints")
    assert only.name == "step-0000002" and ckpt.verify_checkpoint(only) is None
    assert not (out / "run.json").exists()
    # The advice is actionable: --resume from the last good checkpoint with a lower lr.
    monkeypatch.undo()
    with pytest.raises(TunesmithError, match=r"differs .* at train.seed; resume with the same"):
        tunesmith.train(config(llama, pc_data, out, max_steps=6, seed=1), resume=True)
    capsys.readouterr()
    tunesmith.train(
        config(llama, pc_data, out, max_steps=6, nan_policy="stop", lr=5e-3), resume=True
    )
    assert "resuming with changed train.lr (0.01 -> 0.005)" in capsys.readouterr().err
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (out / "metrics.jsonl").open()) if "lr" in r}
    w = warmup_steps(load_config(out / "config.yaml").train, 6)
    assert lrs[2] == pytest.approx(1e-2 * lr_factor(2, 6, w, "cosine"))  # before the stop
    assert lrs[3] == pytest.approx(5e-3 * lr_factor(3, 6, w, "cosine"))  # resumed, lowered


def test_consecutive_nan_steps_stop_a_skipping_run(llama, pc_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _nan_at(monkeypatch, set(range(3, 100)))
    with pytest.raises(NonFiniteError, match=r"^step 5: .*3 non-finite steps in a row"):
        tunesmith.train(config(llama, pc_data, out, max_steps=8, max_nan_steps=3))
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == [
        "step-0000002",
        "step-0000004",
    ]


def test_a_checkpoint_with_nan_weights_is_never_written(tmp_path):
    class Bad:
        def state_dict(self):
            return {"w": torch.tensor([1.0, float("nan")])}

    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(NonFiniteError, match="step 7: w holds NaN/inf, so no checkpoint"):
        ckpt.save_checkpoint(tmp_path, 7, Bad(), opt, sched, {}, keep=2)
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------- disk full


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        # What safetensors raises on a real full disk (checked on a 64 KiB tmpfs).
        SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        ),
    ],
    ids=["oserror", "safetensors"],
)
def test_disk_full_during_a_checkpoint(llama, pc_data, tmp_path, monkeypatch, error):
    ref = tmp_path / "ref"
    tunesmith.train(config(llama, pc_data, ref, max_steps=6))
    out = tmp_path / "run"
    real, calls = ckpt.save_file, [0]

    def fills_up(tensors, path, *a, **kw):
        calls[0] += 1
        if calls[0] > 3:  # the second checkpoint's first file
            Path(path).write_bytes(b"partial")
            raise error
        return real(tensors, path, *a, **kw)

    monkeypatch.setattr(ckpt, "save_file", fills_up)
    with pytest.raises(SaveError) as e:
        tunesmith.train(config(llama, pc_data, out, max_steps=6))
    msg = str(e.value)
    assert msg.startswith("checkpoint of step 4 not written: writing ")
    assert "weights.safetensors failed (No space left on device" in msg
    assert "the previous checkpoint" in msg and "step-0000002 is intact" in msg
    assert "\n" not in msg
    assert not torn(out)
    (only,) = ckpt.list_checkpoints(out / "checkpoints")
    assert only.name == "step-0000002" and ckpt.verify_checkpoint(only) is None
    monkeypatch.undo()
    tunesmith.train(config(llama, pc_data, out, max_steps=6), resume=True)
    assert_same_run(ref, out)


def test_disk_full_during_the_final_save(llama, pc_data, tmp_path, monkeypatch):
    from tunesmith.methods.lora import LoRA

    ref = tmp_path / "ref"
    tunesmith.train(config(llama, pc_data, ref, max_steps=4))
    out = tmp_path / "run"

    def no_space(self, directory, base_model):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LoRA, "save", no_space)
    with pytest.raises(SaveError) as e:
        tunesmith.train(config(llama, pc_data, out, max_steps=4))
    assert str(e.value) == (
        f"final save to {out} failed (No space left on device); the last checkpoint "
        f"{out / 'checkpoints' / 'step-0000004'} is intact: free space and run the same command "
        f"with --resume to save again."
    )
    assert not (out / "run.json").exists()
    monkeypatch.undo()
    tunesmith.train(config(llama, pc_data, out, max_steps=4), resume=True)
    assert_same_run(ref, out)


def test_unwritable_checkpoint_folder(llama, pc_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_mkdir = Path.mkdir

    def read_only(self, *a, **kw):
        if self.name.startswith(".tmp-step-"):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(
        SaveError,
        match=r"checkpoint of step 2 not written: .*Permission denied.*no earlier checkpoint",
    ):
        tunesmith.train(config(llama, pc_data, out, max_steps=4))
    shutil.rmtree(out)
