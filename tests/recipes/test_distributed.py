"""Many processes (CPU, gloo, 2 ranks): DDP and FSDP2 against one process with the same global batch.

Ranks are forked from a fork server that has imported tunesmith once (so a 2-rank run costs
what the training costs; forking the test process itself, which has run threads, can deadlock),
with the environment torchrun would give them; one slow test goes
through ``torchrun -m tunesmith train`` itself. Equality is relative: 2 ranks sum the same
numbers in another order, so weights agree to ~1e-6, not bitwise.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import write_jsonl
from safetensors.torch import load_file

import tunesmith
import tunesmith.models
from tunesmith.data.batching import Batches
from tunesmith.data.tokenize import Example
from tunesmith.errors import DataError, TunesmithError

SRC = Path(__file__).resolve().parents[2] / "src"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, cfg, resume, patch, results) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        if patch is not None:
            patch(rank)
        tunesmith.train(cfg, resume=resume)
        results.put((rank, "ok"))
    except TunesmithError as e:
        results.put((rank, f"{type(e).__name__}: {e}"))
    except BaseException as e:  # noqa: BLE001 - reported to the test, which fails on it
        results.put((rank, f"crash {type(e).__name__}: {e}"))
    finally:
        results.close()
        results.join_thread()  # flush before leaving without the parent's atexit handlers
        os._exit(0)


def launch(
    cfg: dict, world: int = 2, resume: bool = False, patch: Callable[[int], None] | None = None
) -> dict[int, str]:
    """Run ``cfg`` on ``world`` forked ranks; {rank: 'ok', the error line, or 'killed (-9)'}.
    Ranks that do not all finish within two minutes hang, and fail the test."""
    ctx = multiprocessing.get_context("forkserver")  # forks from a clean, thread-free server
    ctx.set_forkserver_preload(["tunesmith", "tunesmith.pipeline", "transformers", "peft"])
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_rank, args=(r, world, port, cfg, resume, patch, results))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    out: dict[int, str] = {}
    deadline = time.monotonic() + 120
    try:
        while len(out) < world:
            try:
                rank, status = results.get(timeout=1)
                out[rank] = status
                continue
            except queue.Empty:
                pass
            for r, p in enumerate(procs):  # killed (SIGKILL) without a word
                if r not in out and not p.is_alive() and p.exitcode not in (0, None):
                    out[r] = f"killed ({p.exitcode})"
                    # What torchrun does when a worker dies: stop the others (a rank blocked in
                    # a collective with the dead one would wait for gloo's 30-minute timeout).
                    for q in procs:
                        if q.is_alive():
                            q.terminate()
                            q.join(5)
                            q.kill()
            if time.monotonic() > deadline:
                pytest.fail(f"ranks hung: only {sorted(out)} of {world} finished")
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    return out


def config(model: Path, data: Path, out: Path, method: str = "lora", **train) -> dict:
    return {
        "model": str(model),
        "method": {"name": method, "rank": 4, "alpha": 8} if method == "lora" else method,
        "data": {"train": str(data), "eval": 0.25, "max_length": 64},
        "train": {
            "max_steps": 4,
            "batch_size": 2,
            "grad_accum": 2,
            "lr": 1e-2,
            "precision": "fp32",
            "progress": False,
            **train,
        },
        "output_dir": str(out),
    }


def losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """The run's trained weights: the method's artifact (``adapter_model``, ``bottleneck_model``,
    ...) or the whole model."""
    (name,) = [p.name for p in out.glob("*model.safetensors")]
    return load_file(str(out / name))


def assert_same(a: Path, b: Path, rel: float = 1e-5) -> None:
    """Loss trajectory within ``rel``; final weights within ``rel`` of their norm taken together,
    and each tensor within ``10 * rel`` of its own norm.

    Why a looser bound per tensor: Adam moves an element by about lr * m / sqrt(v), which for an
    element whose gradient is near zero depends on the gradient's last bits, and the order in
    which a gradient is summed (one process over micro-batches, or an all-reduce of per-rank
    sums) changes those bits. A LoRA B matrix starts at zero, so after a few steps one such
    element is a visible share of its small norm (measured: one of 128 elements 4e-6 apart,
    2e-5 of the tensor's norm, on one CPU model and not on another)."""
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        assert abs(x - y) <= rel * abs(x), (la, lb)
    assert_same_weights(a, b, rel)


def assert_same_weights(a: Path, b: Path, rel: float) -> None:
    """Final weights within ``rel`` of their norm taken together, each tensor within ``10 * rel``
    of its own (see ``assert_same``)."""
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    diff = total = 0.0
    for k in wa:
        d2 = float((wa[k].float() - wb[k].float()).square().sum())
        n2 = float(wa[k].float().square().sum())
        diff, total = diff + d2, total + n2
        assert d2**0.5 <= 10 * rel * max(n2**0.5, 1e-12), (k, (d2 / max(n2, 1e-24)) ** 0.5)
    assert (diff / max(total, 1e-24)) ** 0.5 <= rel, (diff / max(total, 1e-24)) ** 0.5


# What a test changes in one rank (module-level: the ranks start from a fork server).


def on_rank_1_in_step_2(action: Callable[[], None], rank: int) -> None:
    """Rank 1 (only) runs ``action`` while it makes the first micro-batch of step 2."""
    if rank != 1:
        return
    original = Batches.collate

    def collate(self, rows):
        if self.position == 3:
            action()
        return original(self, rows)

    Batches.collate = collate


def broken_row(data: str) -> None:
    raise DataError(f"{data}:7: broken row")


def sigterm_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def nan_on_rank_1(rank: int) -> None:
    """Rank 1's loss is NaN in its third micro-batch (step 2)."""
    if rank != 1:
        return
    from tunesmith.objectives.sft import SFTObjective

    original = SFTObjective.__call__
    calls = []

    def call(self, model, batch):
        loss, metrics = original(self, model, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), metrics

    SFTObjective.__call__ = call


def test_shards_are_disjoint_and_make_the_global_batch():
    examples = [
        Example(np.arange(1, 2 + i % 5), np.full(1 + i % 5, -100), f"f:{i}") for i in range(11)
    ]

    def batches(world: int, rank: int, size: int) -> Batches:
        b = Batches(examples, size, 64, 0, packing=False, seed=3)
        b.shard(rank, world)
        return b

    one = batches(1, 0, 4)
    ranks = [batches(2, r, 2) for r in range(2)]
    assert len(ranks[0].plan(0)) == len(ranks[1].plan(0)) == len(one.plan(0))  # same step count
    for k, rows in enumerate(one.plan(0)):
        shares = [ranks[r]._slice(ranks[r].plan(0)[k]) for r in range(2)]
        assert shares[0] + shares[1] == rows
        assert not set(map(tuple, shares[0])) & set(map(tuple, shares[1]))
    # A checkpoint after 2 global micro-batches of 2 x 2 rows resumes in one process with
    # batch 4 at the same row, and with batch 1 (4 rows per old micro-batch: position 8).
    saved = ranks[0]
    saved.position = 2
    for size, want in ((4, 2), (1, 8)):
        again = batches(1, 0, size)
        again.load_state_dict(saved.state_dict())
        assert again.position == want
    with pytest.raises(TunesmithError, match="not a whole number"):
        again = batches(1, 0, 3)
        again.load_state_dict(saved.state_dict())


def test_ddp_equals_one_process_with_the_same_global_batch(llama, pc_data, tmp_path):
    launched = launch(config(llama, pc_data, tmp_path / "ddp", strategy="ddp"))
    assert launched == {0: "ok", 1: "ok"}
    tunesmith.train(config(llama, pc_data, tmp_path / "one", batch_size=4))
    assert_same(tmp_path / "one", tmp_path / "ddp")
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["steps"] == 4 and run["artifact"] == "adapter"


def test_a_batch_error_on_one_rank_ends_both_with_its_message(llama, pc_data, tmp_path):
    launched = launch(
        config(llama, pc_data, tmp_path / "out"),
        patch=partial(on_rank_1_in_step_2, partial(broken_row, str(pc_data))),
    )
    assert launched[1] == f"DataError: {pc_data}:7: broken row"
    assert launched[0] == f"DataError: {pc_data}:7: broken row (on rank 1)"


def test_a_signal_on_one_rank_stops_both_after_the_same_step(llama, pc_data, tmp_path):
    cfg = config(llama, pc_data, tmp_path / "out", save_every=2)
    launched = launch(cfg, patch=partial(on_rank_1_in_step_2, sigterm_self))
    for rank in (0, 1):
        assert launched[rank].startswith("Interrupted: stopped by SIGTERM after step 2 of 4")
    assert losses(tmp_path / "out") and len(losses(tmp_path / "out")) == 2


def test_a_nan_on_one_rank_is_skipped_by_both(llama, pc_data, tmp_path):
    assert launch(config(llama, pc_data, tmp_path / "out"), patch=nan_on_rank_1) == {
        0: "ok",
        1: "ok",
    }
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in rows if "loss" in r] == [False, True, False, False]


def test_a_bad_row_ends_both_ranks_with_its_file_and_line(llama, pc_data, tmp_path):
    lines = pc_data.read_text().splitlines()
    lines[5] = '{"prompt": "Add 1 and 2:", "completion": '
    pc_data.write_text("\n".join(lines) + "\n")
    launched = launch(config(llama, pc_data, tmp_path / "out"))
    for rank in (0, 1):
        assert launched[rank].startswith("DataError") and f"{pc_data}:6" in launched[rank]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_fsdp_equals_ddp(llama, pc_data, tmp_path, method):
    for strategy in ("ddp", "fsdp"):
        cfg = config(llama, pc_data, tmp_path / strategy, method, strategy=strategy)
        assert launch(cfg) == {0: "ok", 1: "ok"}
    assert_same(tmp_path / "ddp", tmp_path / "fsdp")
    if method == "full":  # the whole model, gathered on rank 0, loads in transformers
        from transformers import AutoModelForCausalLM

        assert AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp") is not None


def under_torchrun(rank: int) -> None:
    os.environ["TORCHELASTIC_RUN_ID"] = "test"


def test_fsdp_on_one_process_under_torchrun_equals_plain(llama, pc_data, tmp_path):
    """``torchrun --nproc_per_node 1`` with ``strategy: fsdp`` shards nothing but runs the FSDP2
    path (mixed-precision policy, CPU offload on a GPU), and trains as the plain loop does."""
    cfg = config(llama, pc_data, tmp_path / "fsdp", "full", strategy="fsdp", save_every=4)
    assert launch(cfg, world=1, patch=under_torchrun) == {0: "ok"}
    tunesmith.train(config(llama, pc_data, tmp_path / "one", "full"))
    assert_same(tmp_path / "one", tmp_path / "fsdp")
    assert list((tmp_path / "fsdp" / "checkpoints").glob("step-*/*.distcp"))  # the FSDP2 path ran


@pytest.mark.slow
def test_fsdp_with_bf16_mixed_precision(llama, pc_data, tmp_path):
    """bf16 compute with fp32 gradient reduction (MixedPrecisionPolicy) runs with gloo on CPU
    and its losses stay within 1e-3 of the fp32 run; the saved adapter is fp32. (Weights are
    not compared: on this random tiny model some gradients are near zero, bf16 flips their
    sign, and Adam turns that into a full-size step.)"""
    for precision in ("fp32", "bf16"):
        cfg = config(llama, pc_data, tmp_path / precision, strategy="fsdp", precision=precision)
        assert launch(cfg) == {0: "ok", 1: "ok"}
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert len(a) == len(b) == 4 and all(abs(x - y) <= 1e-3 * x for x, y in zip(a, b))
    assert a != b  # bf16 did compute
    assert all(t.dtype == torch.float32 for t in final_weights(tmp_path / "bf16").values())


@pytest.fixture
def pairs(tmp_path) -> Path:
    rows = [
        {"prompt": f"Q: {a}+{b}=", "chosen": f" {a + b}", "rejected": f" {a + b + 3}"}
        for a in range(4)
        for b in range(4)
    ]
    return write_jsonl(tmp_path / "pairs.jsonl", rows)


@pytest.mark.slow
def test_dpo_lora_under_fsdp_equals_one_process(llama, pairs, tmp_path):
    """The reference is the policy with LoRA disabled, computed through the sharded model."""
    cfg = config(llama, pairs, tmp_path / "fsdp", strategy="fsdp", batch_size=2)
    cfg["task"] = "dpo"
    assert launch(cfg) == {0: "ok", 1: "ok"}
    one = config(llama, pairs, tmp_path / "one", batch_size=4)
    one["task"] = "dpo"
    tunesmith.train(one)
    assert_same(tmp_path / "one", tmp_path / "fsdp")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_save_on_two_resume_on_one_or_two(llama, pc_data, tmp_path, strategy):
    whole = tmp_path / "whole"
    cfg = config(llama, pc_data, whole, strategy=strategy, save_every=2, keep_checkpoints=3)
    assert launch(cfg) == {0: "ok", 1: "ok"}
    saved = whole / "checkpoints" / "step-0000002"
    assert json.loads((saved / "manifest.json").read_text())["format"] == 2
    for world in (1, 2):
        out = tmp_path / f"resumed-on-{world}"
        shutil.copytree(whole, out)  # as if the run had been stopped after step 2
        shutil.rmtree(out / "checkpoints" / "step-0000004")
        (out / "run.json").unlink()
        saved_cfg = yaml.safe_load((out / "config.yaml").read_text())
        (out / "config.yaml").write_text(yaml.safe_dump({**saved_cfg, "output_dir": str(out)}))
        cfg = config(llama, pc_data, out, strategy=strategy, save_every=2, keep_checkpoints=3)
        if world == 1:  # the same global batch of 8 rows in one process
            with pytest.raises(TunesmithError, match="2 x 2 x 1 = 4, but the run trained with"):
                tunesmith.train(cfg, resume=True)
            cfg["train"]["batch_size"] = 4
            tunesmith.train(cfg, resume=True)
        else:
            assert launch(cfg, resume=True) == {0: "ok", 1: "ok"}
        assert_same(whole, out)


def kill_rank_0_in_checkpoint(point: int, rank: int) -> None:
    """Rank 0 SIGKILLs itself at the ``point``-th fault point of sharded checkpoint writing
    (three per checkpoint: after state.json, after the manifest, after the rename)."""
    if rank == 0:
        os.environ["TUNESMITH_FAULT"] = f"kill-in-checkpoint:{point}"


@pytest.mark.slow
def test_a_kill_inside_a_sharded_checkpoint(llama, pc_data, tmp_path):
    """Rank 0 dies after the manifest of step 4's checkpoint, before its rename: rank 1 does not
    hang, the torn folder is skipped, and the resumed run equals an uninterrupted one."""
    whole = config(llama, pc_data, tmp_path / "whole", max_steps=6, save_every=2)
    assert launch(whole) == {0: "ok", 1: "ok"}
    cfg = config(llama, pc_data, tmp_path / "out", max_steps=6, save_every=2)
    launched = launch(cfg, patch=partial(kill_rank_0_in_checkpoint, 5))
    assert launched[0] == "killed (-9)" and launched[1] != "ok"
    ckpts = tmp_path / "out" / "checkpoints"
    assert [p.name for p in ckpts.iterdir() if p.name.startswith("step-")] == ["step-0000002"]
    assert launch(cfg, resume=True) == {0: "ok", 1: "ok"}
    assert_same(tmp_path / "whole", tmp_path / "out")


def test_strategy_is_checked():
    from tunesmith.config import load_config
    from tunesmith.errors import ConfigError
    from tunesmith.training import distributed

    with pytest.raises(ConfigError, match="train.strategy"):
        load_config({"train": {"strategy": "zero3"}})
    cfg = load_config({"train": {"strategy": "none"}})
    os.environ["WORLD_SIZE"] = "2"
    try:
        with pytest.raises(ConfigError, match="train.strategy: 'none' runs one process"):
            distributed.setup(cfg.train)
    finally:
        del os.environ["WORLD_SIZE"]


@pytest.mark.slow
def test_torchrun_cli(llama, pc_data, tmp_path):
    """``torchrun -m tunesmith train``: rank 0 alone reports; a bad row ends both ranks."""
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(config(llama, pc_data, tmp_path / "out")))
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(_free_port()), "-m", "tunesmith", "train", str(cfg)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.count("tunesmith: done in") == 1
    assert (tmp_path / "out" / "run.json").exists()
    rows = pc_data.read_text().splitlines()
    rows[random.Random(0).randrange(len(rows))] = "{oops"
    pc_data.write_text("\n".join(rows) + "\n")
    cmd.append("output_dir=" + str(tmp_path / "bad"))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 2 and all(str(pc_data) + ":" in ln for ln in errors), done.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# Online RL (GRPO, PPO): each rank samples its slice of the prompts, per-row seeds


RL_REWARDS = """
import os

def lower(prompts, completions):
    return [sum(c.islower() for c in t) / max(len(t), 1) for t in completions]

def flaky(prompts, completions):
    if os.environ.get("RANK") == "1":
        raise ValueError("no score on rank 1")
    return [0.0] * len(completions)
"""


def on_path(path: str, rank: int) -> None:
    sys.path.insert(0, path)


def rl_config(
    model: Path, data: Path, out: Path, task: str, reward: str, method: str = "lora", **train
) -> dict:
    return {
        "model": str(model),
        "task": task,
        "method": {"name": "lora", "rank": 4, "alpha": 8} if method == "lora" else method,
        "data": {"train": str(data), "eval": 0.25, "max_length": 64},
        task: {
            "reward": reward,
            "group_size": 2,
            "max_new_tokens": 6,
            "eval_prompts": 4,
            "samples_every": 1,
            **({"epochs": 2, "minibatches": 2, "kl_control": "adaptive"} if task == "ppo" else {}),
            **({"kl_coef": 0.1} if task == "grpo" else {}),
        },
        "train": {
            "max_steps": 3 if task == "grpo" else 4,
            "batch_size": 4,
            "lr": 1e-2,
            "precision": "fp32",
            "progress": False,
            "warmup": 0,
            **train,
        },
        "output_dir": str(out),
    }


def metric_rows(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def assert_same_rl(a: Path, b: Path, rel: float = 1e-5) -> None:
    """The same rollouts (rewards, lengths), losses and final weights."""
    ra, rb = metric_rows(a), metric_rows(b)
    assert len(ra) == len(rb) > 0
    for x, y in zip(ra, rb):
        for key in ("loss", "reward_mean", "reward_std", "response_len", "kl_ref_seq", "kl_coef"):
            if key in x:
                assert abs(x[key] - y[key]) <= rel * max(1.0, abs(x[key])), (key, ra, rb)
    assert_same_weights(a, b, rel)


@pytest.fixture
def rl_reward(tmp_path):
    (tmp_path / "rl_dist_rewards.py").write_text(RL_REWARDS)
    sys.path.insert(0, str(tmp_path))
    yield partial(on_path, str(tmp_path))
    sys.path.remove(str(tmp_path))
    sys.modules.pop("rl_dist_rewards", None)


@pytest.mark.parametrize("task", ["grpo", "ppo"])
def test_rl_under_ddp_equals_one_process(llama, pc_data, rl_reward, tmp_path, task):
    """Per-row seeds: two ranks sample exactly the rollouts one process samples, and the
    all-gathered batch gives the same advantages (PPO: whitening, adaptive KL) and update."""
    reward = "rl_dist_rewards:lower"
    cfg = rl_config(llama, pc_data, tmp_path / "ddp", task, reward, strategy="ddp")
    assert launch(cfg, patch=rl_reward) == {0: "ok", 1: "ok"}
    tunesmith.train(rl_config(llama, pc_data, tmp_path / "one", task, reward))
    assert_same_rl(tmp_path / "one", tmp_path / "ddp")
    samples = (tmp_path / "ddp" / "samples.jsonl").read_text().splitlines()
    assert samples == (tmp_path / "one" / "samples.jsonl").read_text().splitlines()


def test_a_reward_error_on_one_rank_ends_both(llama, pc_data, rl_reward, tmp_path):
    cfg = rl_config(llama, pc_data, tmp_path / "out", "grpo", "rl_dist_rewards:flaky")
    launched = launch(cfg, patch=rl_reward)
    assert launched[1].startswith("RewardError: reward rl_dist_rewards:flaky raised ValueError")
    assert launched[0] == launched[1] + " (on rank 1)"


@pytest.mark.slow
@pytest.mark.parametrize(
    "task, method",
    [("grpo", m) for m in ("lora", "full", "adapter", "prefix", "prompt")]
    + [("ppo", "lora"), ("ppo", "full")],
)
def test_rl_under_fsdp_equals_one_process(llama, pc_data, rl_reward, tmp_path, task, method):
    """Generation through the sharded model in lockstep; ``full`` keeps a frozen reference copy
    on every rank, the others disable the method for the reference; PPO's value head is sharded
    with the root."""
    reward = "rl_dist_rewards:lower"
    cfg = rl_config(llama, pc_data, tmp_path / "fsdp", task, reward, method, strategy="fsdp")
    assert launch(cfg, patch=rl_reward) == {0: "ok", 1: "ok"}
    tunesmith.train(rl_config(llama, pc_data, tmp_path / "one", task, reward, method))
    assert_same_rl(tmp_path / "one", tmp_path / "fsdp", rel=1e-4)


@pytest.mark.slow
def test_rl_save_on_two_resume_on_one_or_two(llama, pc_data, rl_reward, tmp_path):
    """Rollout randomness comes from (seed, rollout batch, row) and train.batch_size is the
    global number of prompts: PPO saved on two processes after step 2 (of 4; 2 epochs x 2
    mini-batches per rollout batch, so mid rollout batch) resumes on one or on two processes to
    the run that never stopped."""
    reward = "rl_dist_rewards:lower"
    whole = tmp_path / "whole"
    cfg = rl_config(llama, pc_data, whole, "ppo", reward, strategy="ddp", save_every=1)
    cfg["train"]["keep_checkpoints"] = 5
    assert launch(cfg, patch=rl_reward) == {0: "ok", 1: "ok"}
    for world in (1, 2):
        out = tmp_path / f"resumed-on-{world}"
        shutil.copytree(whole, out)  # as if the run had been stopped after step 3
        shutil.rmtree(out / "checkpoints" / "step-0000004")
        (out / "run.json").unlink()
        saved_cfg = yaml.safe_load((out / "config.yaml").read_text())
        (out / "config.yaml").write_text(yaml.safe_dump({**saved_cfg, "output_dir": str(out)}))
        again = {**cfg, "output_dir": str(out)}
        if world == 1:
            tunesmith.train(again, resume=True)
        else:
            assert launch(again, resume=True, patch=rl_reward) == {0: "ok", 1: "ok"}
        assert_same_rl(whole, out)


def eager_with_sdpa(monkeypatch) -> None:
    """Compiled layers run ``sdpa`` (the block-causal node steps aside under compile), so the
    eager process they are compared with does too: the comparison is of compiling, not of two
    attention kernels, whose last bits differ and which Adam amplifies on near-zero gradients
    (see ``assert_same``)."""
    monkeypatch.setattr(tunesmith.models, "fuse_attention", lambda model: False)


def test_compiled_layers_under_ddp_equal_one_eager_process(llama, pc_data, tmp_path, monkeypatch):
    """``train.compile`` compiles each rank's layers after DDP wraps the model (about 50 s)."""
    cfg = config(llama, pc_data, tmp_path / "ddp", strategy="ddp", compile=True)
    assert launch(cfg) == {0: "ok", 1: "ok"}
    eager_with_sdpa(monkeypatch)
    tunesmith.train(config(llama, pc_data, tmp_path / "one", batch_size=4))
    assert_same(tmp_path / "one", tmp_path / "ddp")


@pytest.mark.slow
def test_compiled_layers_under_fsdp_equal_one_eager_process(llama, pc_data, tmp_path, monkeypatch):
    """... and after FSDP2 has sharded each layer."""
    cfg = config(llama, pc_data, tmp_path / "fsdp", strategy="fsdp", compile=True)
    assert launch(cfg) == {0: "ok", 1: "ok"}
    eager_with_sdpa(monkeypatch)
    tunesmith.train(config(llama, pc_data, tmp_path / "one", batch_size=4))
    assert_same(tmp_path / "one", tmp_path / "fsdp")
