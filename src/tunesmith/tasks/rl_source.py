"""Online RL through the task contract: prompts in, rollouts out, scored and turned into batches.

``task: grpo`` and ``task: ppo`` share everything here and differ only in how a scored rollout
becomes advantages (``Advantages``: group-relative for GRPO / RLOO, GAE on KL-penalised rewards
for PPO). One rollout batch is made while training, from the current policy:

    prompts (train.batch_size of them, each repeated group_size times)
      -> rollout(policy, temperature, top_p, max_new_tokens, stop at the end token)   [KV cache]
      -> scores = reward(prompts, completions) - missing_end_penalty * [no end token]
      -> one no-grad pass: log pi_old (and V_old for PPO); log pi_ref when a KL is wanted
      -> advantages -> RLBatch
      -> epochs x minibatches optimiser steps, each of grad_accum micro-batches

The reference pi_ref is the starting model: the policy with its method disabled when the method
has a frozen base (no second copy), else a frozen copy loaded once. The loop sees an ordinary
batch source (``Rollouts``) and objective (``RLObjective``); resume is exact because the source's
state holds the prompt order position, the rollout count (each response's sampling seed derives
from train.seed, the rollout count and its row), the KL controller and the micro-batches of the
current rollout batch not yet trained on. Under torchrun each process samples and scores its
slice of the prompts, and the scored rows are gathered so that advantages and statistics are
those of the whole batch (``Rollouts.produce``).

Held out, the policy answers held-out prompts greedily (``HeldOutPrompts``): ``eval_reward`` is
their mean reward, ``eval_exact_match`` the share equal to the record's reference answer (when the
records have one), and ``eval_loss`` is minus the mean reward.
"""

from __future__ import annotations

import base64
import io
import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

from tunesmith.config import Config
from tunesmith.console import say
from tunesmith.data.formats import prompt_of
from tunesmith.data.io import Record
from tunesmith.data.kinds import PROMPTS
from tunesmith.errors import ConfigError, DataError, TunesmithError
from tunesmith.generate import normalise
from tunesmith.models import DTYPES
from tunesmith.objectives.ppo import ClippedPolicyObjective, RLBatch
from tunesmith.rewards import RewardSource, load_reward, missing_end_penalty
from tunesmith.tasks.base import Context, Task
from tunesmith.training import distributed
from tunesmith.training.precision import autocast
from tunesmith.training.rollout import response_logps, rollout

RL_SERIES = (
    "reward_mean",
    "reward_std",
    "eval_reward",
    "eval_exact_match",
    "kl_ref_seq",
    "entropy",
    "clip_frac",
    "response_len",
)
"""What the run report plots for an RL task (``Task.report_series``)."""


@dataclass
class RLConfig:
    """Settings shared by ``grpo:`` and ``ppo:`` (each task's section adds its own)."""

    reward: str = "builtin:arith"
    """The reward: a ``task: reward`` run folder, ``builtin:arith``, or a Python function
    ``"my_module:score"`` (called with prompts and completions, returning one float each)."""
    missing_end_penalty: float = 0.0
    """Subtracted from the reward of a response cut at max_new_tokens (no end token)."""
    group_size: int = 4
    """Responses sampled per prompt; a rollout batch is train.batch_size prompts x group_size."""
    max_new_tokens: int = 32
    """Longest sampled response, in tokens."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts (the update uses the same distribution)."""
    top_p: float = 1.0
    """Nucleus sampling: sample among the most likely tokens holding this much probability."""
    epochs: int = 1
    """Passes over each rollout batch (PPO epochs)."""
    minibatches: int = 1
    """Optimiser steps per pass over a rollout batch; train.max_steps counts these steps."""
    clip_eps: float = 0.2
    """Clip range of the probability ratio pi / pi_old."""
    kl_coef: float = 0.0
    """Weight of the KL to the reference (0: none, and no reference is computed for ``full``)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token KL estimator (Schulman's k1 / k2 / k3)."""
    reference_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype of the frozen reference copy, for methods that change the base (``full``); ``auto``:
    bfloat16 on a GPU that supports it (half the memory of a float32 copy), else the policy's
    dtype. Methods with a frozen base need no copy: their reference is the base itself."""
    entropy_coef: float = 0.0
    """Entropy bonus weight (0: none)."""
    eval_prompts: int = 128
    """Held-out prompts answered greedily at each evaluation."""
    samples_every: int = 10
    """Write a few rollouts with their rewards to samples.jsonl every N rollout batches (0: never)."""
    samples_count: int = 4
    """Rollouts written each time."""


def check_rl(section: RLConfig, name: str, cfg: Config) -> None:
    """Cross-section validation shared by the RL tasks."""
    for key in ("group_size", "max_new_tokens", "epochs", "minibatches", "eval_prompts"):
        if getattr(section, key) < 1:
            raise ConfigError(f"{name}.{key}: must be at least 1, got {getattr(section, key)}.")
    if section.temperature < 0 or not 0 < section.top_p <= 1:
        raise ConfigError(f"{name}.temperature must be >= 0 and {name}.top_p in (0, 1].")
    if cfg.train.max_steps is None:
        raise ConfigError(
            f"train.max_steps: {name} makes its batches while it trains (no epochs over a data set); "
            f"set train.max_steps (optimiser steps; each rollout batch gives {name}.epochs x {name}.minibatches)."
        )
    rows = cfg.train.batch_size * section.group_size
    if rows < section.minibatches * cfg.train.grad_accum:
        raise ConfigError(
            f"{name}.minibatches: {rows} responses per rollout batch cannot fill {section.minibatches} "
            f"mini-batches of train.grad_accum={cfg.train.grad_accum} micro-batches; lower them or raise train.batch_size."
        )


# ----------------------------------------------------------------------------------------------
# Prompts


@dataclass
class Prompts:
    """Prompt-bearing records as the policy sees them and as a reward function sees them."""

    rendered: list[str]
    raw: list[Any]
    references: list[str | None]
    fields: list[dict]

    def __len__(self) -> int:
        return len(self.rendered)

    def take(self, idx: Sequence[int]) -> Prompts:
        return Prompts(
            [self.rendered[i] for i in idx],
            [self.raw[i] for i in idx],
            [self.references[i] for i in idx],
            [self.fields[i] for i in idx],
        )


def read_prompts(records: list[Record], ctx: Context) -> Prompts:
    out = Prompts([], [], [], [])
    for rec in records:
        rendered, raw, ref = prompt_of(rec, ctx.data.format, ctx.tokenizer, ctx.data.template)
        if not ctx.tokenizer(rendered, add_special_tokens=False)["input_ids"]:
            raise DataError(f"{rec.origin}: the prompt renders to no tokens.")
        out.rendered.append(rendered)
        out.raw.append(raw)
        out.references.append(ref)
        out.fields.append(rec.fields)
    return out


# ----------------------------------------------------------------------------------------------
# The reference policy and the value tap


LogProbs = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], torch.Tensor]


def reference_dtype(setting: str, policy_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of a frozen reference copy: ``setting``, or for ``auto`` bfloat16 where the
    device computes in it natively (a GPU that supports it), else the policy's own dtype."""
    if setting != "auto":
        return DTYPES[setting]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return policy_dtype


def reference_logps(ctx: Context, temperature: float, dtype: str = "auto") -> LogProbs:
    """log pi_ref of response tokens: the policy with its method disabled when the method keeps a
    frozen base (no second copy), else a frozen copy of the starting model, loaded once, in
    ``reference_dtype`` (log-probs are computed in float32 from its logits either way).

    Reference log-probs cannot be cached before training as DPO caches them: the responses they
    score are sampled while training. They are computed once per rollout batch, in the no-grad
    pass that gives log pi_old, and every PPO epoch and mini-batch reuses them.
    """
    method = ctx.method
    if method is not None and method.frozen_base:

        def disabled(
            model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, R: int
        ) -> torch.Tensor:
            with method.disable():
                return response_logps(model, ids, mask, R, temperature)[0]

        return disabled
    policy_dtype = next(ctx.model.parameters()).dtype
    frozen = ctx.starting_model().eval().requires_grad_(False)
    frozen.to(reference_dtype(dtype, policy_dtype, ctx.device))

    def copy(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, R: int) -> torch.Tensor:
        return response_logps(frozen, ids, mask, R, temperature)[0]

    copy.model = frozen  # type: ignore[attr-defined]  (what tests and the curious inspect)
    return copy


class ValueTap:
    """V at each response token from the policy's own forward pass (no second pass): a hook on
    the backbone keeps its final hidden state, and the model's ``value_head`` reads it at the
    positions whose logits predict the response tokens."""

    def __init__(self, model: nn.Module) -> None:
        self.head = model.value_head
        backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
        self.hidden: torch.Tensor | None = None
        backbone.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: Any, output: Any) -> None:
        self.hidden = output[0]

    def __call__(self, model: nn.Module, batch: RLBatch) -> torch.Tensor:
        if self.hidden is None:
            raise RuntimeError("ValueTap: read before a forward pass of the policy.")
        R = batch.response_mask.shape[1]
        hidden, self.hidden = self.hidden[:, -(R + 1) : -1], None  # (B, R, H)
        return self.head(hidden)


# ----------------------------------------------------------------------------------------------
# Advantages: where GRPO and PPO differ


@dataclass
class Scored:
    """A rollout batch after the no-grad pass: what an ``Advantages`` turns into an RLBatch."""

    ids: torch.Tensor
    mask: torch.Tensor  # (B, P + R) attention mask
    response_mask: torch.Tensor  # (B, R)
    scores: torch.Tensor  # (B,)
    logps: torch.Tensor  # (B, R) log pi_old
    ref_logps: torch.Tensor | None
    values: torch.Tensor | None


def all_ranks_done() -> Callable[[bool], bool] | None:
    """Under torchrun, ``rollout``'s stopping rule: stop when every process's rows have ended (an
    all-reduce per decode step, so a sharded model's per-layer collectives stay matched); None
    (each batch stops on its own) in one process."""
    if not distributed.current().active:
        return None
    return lambda done: not distributed.any_rank(not done)


def gather_scored(
    local: Scored, prompt_len: int, completions: list[str], ended: torch.Tensor, pad: int
) -> tuple[Scored, list[str], torch.Tensor]:
    """Collective: every process's scored rows, in rank order, as one batch. Prompts (the first
    ``prompt_len`` columns, left-padded) are left-padded to the longest prompt, responses
    right-padded to the longest response (pad id, mask 0, log-probs and values 0)."""
    d = distributed.current()
    mine = {
        k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in vars(local).items()
    }
    parts: list[Any] = [None] * d.world
    dist_obj = (mine, prompt_len, completions, ended.cpu())
    torch.distributed.all_gather_object(parts, dist_obj)
    P = max(p[1] for p in parts)
    R = max(p[0]["response_mask"].shape[1] for p in parts)

    def pad_to(t: torch.Tensor, left: int, right: int, value: float) -> torch.Tensor:
        return torch.nn.functional.pad(t, (left, right), value=value)

    cols: dict[str, list[torch.Tensor]] = {k: [] for k in mine}
    for sc, p_len, _, _ in parts:
        r_len = sc["response_mask"].shape[1]
        for k, v in sc.items():
            if v is None:
                continue
            if k in ("ids", "mask"):
                value = pad if k == "ids" else 0
                prompt = pad_to(v[:, :p_len], P - p_len, 0, value)
                cols[k].append(torch.cat([prompt, pad_to(v[:, p_len:], 0, R - r_len, value)], 1))
            elif k == "scores":
                cols[k].append(v)
            else:
                cols[k].append(pad_to(v, 0, R - r_len, 0))
    device = local.ids.device
    merged = {k: (torch.cat(v).to(device) if v else None) for k, v in cols.items()}
    texts = [c for p in parts for c in p[2]]
    return Scored(**merged), texts, torch.cat([p[3] for p in parts])


class Advantages(Protocol):
    def __call__(self, s: Scored) -> tuple[RLBatch, dict[str, float]]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# ----------------------------------------------------------------------------------------------
# The producer


@dataclass
class RLMicroBatch:
    """A micro-batch of an RL update with its rollout batch's statistics (logged per step)."""

    rl: RLBatch
    stats: dict[str, float] = field(default_factory=dict)

    def to(self, device: torch.device) -> RLMicroBatch:
        return RLMicroBatch(self.rl.to(device), self.stats)

    @property
    def n_tokens(self) -> int:
        return self.rl.n_tokens


def _encode(obj: Any) -> str:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return base64.b64encode(buf.getvalue()).decode()


def _decode(text: str) -> Any:
    return torch.load(io.BytesIO(base64.b64decode(text)), weights_only=False)


class Rollouts:
    """A batch source that samples from the current policy while training (``BatchSource``)."""

    def __init__(
        self,
        ctx: Context,
        settings: RLConfig,
        reward: RewardSource,
        advantages: Advantages,
        reference: LogProbs | None,
        values: ValueTap | None,
    ) -> None:
        self.ctx, self.s, self.reward = ctx, settings, reward
        self.advantages, self.reference, self.values = advantages, reference, values
        self.prompts = read_prompts(ctx.data.train_records, ctx)
        self.seed = ctx.cfg.train.seed
        self.rollouts = 0  # rollout batches made so far
        self.position = 0  # prompts handed out so far
        self.pending: list[RLMicroBatch] = []  # global micro-batches (every process holds them)
        self.samples_path = ctx.out / "samples.jsonl" if ctx.out is not None else None
        self.rank, self.world = 0, 1

    def shard(self, rank: int, world: int) -> None:
        """Under torchrun: this process samples, scores and trains on its slice of each rollout
        batch (``train.batch_size`` stays the global number of prompts)."""
        rows = self.ctx.cfg.train.batch_size * self.s.group_size
        per_micro = rows // (self.s.minibatches * self.ctx.cfg.train.grad_accum)
        if self.ctx.cfg.train.batch_size < world or per_micro < world:
            raise ConfigError(
                f"train.batch_size: {self.ctx.cfg.train.batch_size} prompts x group_size "
                f"{self.s.group_size} give micro-batches of {per_micro} responses, fewer than the "
                f"{world} processes (each needs at least one prompt and one response per "
                f"micro-batch); raise train.batch_size or lower minibatches / train.grad_accum."
            )
        self.rank, self.world = rank, world

    def global_batch(self, world: int) -> str:
        """The start-up line's account of one step under torchrun."""
        s, t = self.s, self.ctx.cfg.train
        return (
            f"global rollout batch {t.batch_size} prompts x {s.group_size} responses "
            f"(train.batch_size x group_size), split over {world} processes; "
            f"{s.minibatches} optimiser steps per pass, {t.grad_accum} micro-batches each"
        )

    # -- BatchSource

    def micro_batches_per_epoch(self) -> int | None:
        return None

    def epoch_of(self, micro_batch: int) -> float:
        per_rollout = self.s.epochs * self.s.minibatches * self.ctx.cfg.train.grad_accum
        prompts = (micro_batch + 1) / per_rollout * self.ctx.cfg.train.batch_size
        return prompts / len(self.prompts)

    def state_dict(self) -> dict[str, Any]:
        return {
            "rollouts": self.rollouts,
            "position": self.position,
            "advantages": self.advantages.state_dict(),
            "pending": _encode([(m.rl, m.stats) for m in self.pending]),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollouts, self.position = int(state["rollouts"]), int(state["position"])
        if "generator" in state:  # written before per-row seeds: its sampling stream is gone
            say(
                "resume: this checkpoint predates per-row rollout seeds; the run continues, but "
                "its next rollouts differ from the ones an uninterrupted run of that version drew."
            )
        self.advantages.load_state_dict(state["advantages"])
        self.pending = [RLMicroBatch(rl, stats) for rl, stats in _decode(state["pending"])]

    def stream(self) -> Iterator[RLMicroBatch]:
        while True:
            if not self.pending:
                self.pending = self.produce()
            micro = self.pending.pop(0)
            if self.world > 1:
                mine = torch.tensor_split(torch.arange(len(micro.rl)), self.world)[self.rank]
                micro = RLMicroBatch(micro.rl.select(mine), micro.stats)
            yield micro

    # -- one rollout batch

    def next_prompts(self) -> list[int]:
        """The next train.batch_size prompt indices, epoch after epoch in a seeded order."""
        n, out = len(self.prompts), []
        for _ in range(self.ctx.cfg.train.batch_size):
            epoch, k = divmod(self.position, n)
            order = list(range(n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            out.append(order[k])
            self.position += 1
        return out

    def generators(self, rows: range) -> list[torch.Generator]:
        """One sampling generator per response, seeded from (train.seed, rollout batch, row of
        the global rollout batch): a response is the same whichever process samples it."""
        base = (self.seed * 1_000_003 + self.rollouts) * 1_000_033
        return [torch.Generator().manual_seed((base + j) % 2**63) for j in rows]

    @torch.no_grad()
    def produce(self) -> list[RLMicroBatch]:
        """One global rollout batch. Prompts are split between processes in contiguous slices
        (a prompt's whole group on one process); each samples, scores and runs the no-grad pass
        on its slice; the scored rows are all-gathered (``gather_scored``) so that advantages
        (group baselines, PPO's whitening and KL controller) and the logged statistics are those
        of the whole batch, the same on every process and as in one process."""
        s, ctx, model = self.s, self.ctx, self.ctx.model
        G = s.group_size
        picked = self.next_prompts()
        mine = torch.tensor_split(torch.arange(len(picked)), self.world)[self.rank].tolist()
        local = self.prompts.take([picked[i] for i in mine for _ in range(G)])
        rows = range(mine[0] * G, (mine[-1] + 1) * G)
        out = rollout(
            model,
            ctx.tokenizer,
            local.rendered,
            s.max_new_tokens,
            s.temperature,
            s.top_p,
            generator=self.generators(rows),
            return_logps=False,
            all_done=all_ranks_done(),
        )
        error: BaseException | None = None
        scores: list[float] = []
        try:
            scores = self.reward(local.raw, out.completions, local.fields)
            scores = missing_end_penalty(scores, out.ended.tolist(), s.missing_end_penalty)
        except TunesmithError as e:
            error = e
        distributed.raise_agreed(error)  # a reward error on one process ends every process
        ids, mask, rmask = out.input_ids, out.attention_mask, out.response_mask
        R = rmask.shape[1]
        was_training = model.training
        model.eval()
        try:  # in the update's precision, so that the first ratio pi / pi_old is exactly 1
            with autocast(ctx.device, ctx.cfg.train.precision):
                logps, _ = response_logps(model, ids, mask, R, s.temperature)
                values = (
                    self.values(model, RLBatch(ids, mask, rmask, logps, logps))
                    if self.values
                    else None
                )
                ref = self.reference(model, ids, mask, R) if self.reference else None
        finally:
            model.train(was_training)
        m = rmask.float()
        scored = Scored(
            ids,
            mask,
            rmask,
            torch.tensor(scores, device=ids.device),
            logps * m,
            None if ref is None else ref * m,
            None if values is None else values * m,
        )
        completions, ended = out.completions, out.ended
        if self.world > 1:
            scored, completions, ended = gather_scored(
                scored, out.prompt_ids.shape[1], completions, ended, ctx.tokenizer.pad_token_id
            )
        batch, stats = self.advantages(scored)
        m = scored.response_mask.float()
        lengths = m.sum(-1)
        t = scored.scores.detach().cpu().double()
        stats = {
            "reward_mean": float(t.mean()),
            "reward_std": float(t.std()) if len(t) > 1 else 0.0,
            "response_len": float(lengths.mean()),
            "ended": float(ended.float().mean()),
            **stats,
        }
        if (
            scored.ref_logps is not None
        ):  # k1 summed over a response: KL[pi_old || pi_ref] per response
            stats["kl_ref_seq"] = float(((scored.logps - scored.ref_logps) * m).sum(-1).mean())
        if distributed.current().is_main:
            chosen = self.prompts.take([i for i in picked for _ in range(G)])
            self.write_samples(chosen, completions, t.tolist())
        self.rollouts += 1
        return self.split(batch, stats)

    def split(self, batch: RLBatch, stats: dict[str, float]) -> list[RLMicroBatch]:
        """epochs x minibatches x grad_accum micro-batches, rows shuffled per epoch (seeded)."""
        g = torch.Generator().manual_seed(self.seed * 7919 + self.rollouts)
        micro = []
        for _ in range(self.s.epochs):
            perm = torch.randperm(len(batch), generator=g)
            for mini in torch.tensor_split(perm, self.s.minibatches):
                for part in torch.tensor_split(mini, self.ctx.cfg.train.grad_accum):
                    micro.append(RLMicroBatch(batch.select(part), stats))
        return micro

    def write_samples(self, prompts: Prompts, completions: list[str], scores: list[float]) -> None:
        s = self.s
        if self.samples_path is None or not s.samples_every or self.rollouts % s.samples_every:
            return
        with self.samples_path.open("a") as f:
            for k in range(min(s.samples_count, len(completions))):
                i = k * s.group_size % len(completions)  # one response of each of a few prompts
                row = {
                    "rollout": self.rollouts,
                    "prompt": prompts.raw[i],
                    "completion": completions[i],
                    "reward": scores[i],
                }
                f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------------------------
# Held-out prompts and the objective the loop calls


@dataclass
class PromptBatch:
    """Held-out prompts to answer (a batch for ``evaluate``)."""

    prompts: Prompts
    n_tokens: int = 0

    def to(self, device: torch.device) -> PromptBatch:
        return self

    def __len__(self) -> int:
        return len(self.prompts)


class HeldOutPrompts:
    """The held-out prompts in a fixed order, in batches (the task's ``evals``)."""

    def __init__(self, prompts: Prompts, batch_size: int) -> None:
        self.examples, self.batch_size = prompts, batch_size

    def one_pass(self) -> Iterator[PromptBatch]:
        n = len(self.examples)
        for k in range(0, n, self.batch_size):
            yield PromptBatch(self.examples.take(range(k, min(k + self.batch_size, n))))


def held_out_prompts(section: str) -> Callable[[Context], HeldOutPrompts | None]:
    def build(ctx: Context) -> HeldOutPrompts | None:
        if not ctx.data.eval_records:
            return None
        s = getattr(ctx.cfg, section)
        prompts = read_prompts(ctx.data.eval_records[: s.eval_prompts], ctx)
        return HeldOutPrompts(prompts, 64)

    return build


class RLObjective:
    """The loop's objective for an RL task: the clipped policy update on rollout micro-batches,
    and held-out scoring of greedy answers on prompt batches.

    On a rollout micro-batch, the rollout batch's statistics (reward mean, response length, KL
    coefficient, ...) are returned scaled by the micro-batch's token count: the loop divides the
    step's metric sums by the step's count, so they come out as the statistic itself.
    """

    def __init__(
        self,
        policy: ClippedPolicyObjective | None,
        reward: RewardSource,
        tokenizer: Any,
        max_new_tokens: int,
    ) -> None:
        self.policy, self.reward, self.tokenizer = policy, reward, tokenizer
        self.max_new_tokens = max_new_tokens

    def count(self, batch: RLMicroBatch | PromptBatch) -> int:
        if isinstance(batch, PromptBatch):
            return len(batch)
        return self.policy.count(batch.rl)

    def __call__(
        self, model: nn.Module, batch: RLMicroBatch | PromptBatch
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if isinstance(batch, PromptBatch):
            return self.score(model, batch.prompts)
        if self.policy is None:
            raise RuntimeError("this objective only scores held-out prompts.")
        loss, metrics = self.policy(model, batch.rl)
        n = self.policy.count(batch.rl)
        metrics.update({k: v * n for k, v in batch.stats.items()})
        return loss, metrics

    @torch.no_grad()
    def score(self, model: nn.Module, prompts: Prompts) -> tuple[torch.Tensor, dict[str, float]]:
        """Greedy answers to held-out prompts: sums of reward, exact match and length."""
        out = rollout(
            model,
            self.tokenizer,
            prompts.rendered,
            self.max_new_tokens,
            temperature=0.0,
            all_done=all_ranks_done(),
        )
        rewards = self.reward(prompts.raw, out.completions, prompts.fields)
        metrics = {
            "reward": float(sum(rewards)),
            "response_len": float(out.response_mask.sum()),
            "ended": float(out.ended.sum()),
        }
        if all(r is not None for r in prompts.references):
            metrics["exact_match"] = float(
                sum(
                    normalise(c) == normalise(r)
                    for c, r in zip(out.completions, prompts.references)
                )
            )
        return torch.tensor(-sum(rewards)), metrics


# ----------------------------------------------------------------------------------------------
# Factories for a task's declaration


def _shared(ctx: Context, section: str) -> dict[str, Any]:
    """The reward, the reference and the value tap of a run, built once for objective and source."""
    if "rl" not in ctx.shared:
        s: RLConfig = getattr(ctx.cfg, section)
        parts: dict[str, Any] = {"reward": load_reward(s.reward, ctx.device), "values": None}
        if ctx.training:
            free = ctx.method is not None and ctx.method.frozen_base
            parts["reference"] = (
                reference_logps(ctx, s.temperature, s.reference_dtype)
                if s.kl_coef > 0 or free
                else None
            )
            if hasattr(ctx.model, "value_head"):
                parts["values"] = ValueTap(ctx.model)
        ctx.shared["rl"] = parts
    return ctx.shared["rl"]


def rl_objective(section: str, kl_in_loss: bool) -> Callable[[Context], RLObjective]:
    """The objective factory of an RL task: the KL to the reference goes in the loss (GRPO) or in
    the rewards (PPO); a model with a ``value_head`` adds the clipped value loss."""

    def build(ctx: Context) -> RLObjective:
        s: RLConfig = getattr(ctx.cfg, section)
        parts = _shared(ctx, section)
        policy = None
        if ctx.training:
            policy = ClippedPolicyObjective(
                clip_eps=s.clip_eps,
                kl_coef=s.kl_coef if kl_in_loss else 0.0,
                kl_estimator=s.kl_estimator,
                entropy_coef=s.entropy_coef,
                temperature=s.temperature,
                value_fn=parts["values"],
                value_coef=getattr(s, "value_coef", 0.0),
                value_clip=getattr(s, "value_clip", 0.2),
            )
        return RLObjective(policy, parts["reward"], ctx.tokenizer, s.max_new_tokens)

    return build


def rl_source(
    section: str, advantages: Callable[[Any], Advantages]
) -> Callable[[Context], Rollouts]:
    """The batch-source factory of an RL task: rollouts of the current policy."""

    def build(ctx: Context) -> Rollouts:
        s: RLConfig = getattr(ctx.cfg, section)
        parts = _shared(ctx, section)
        return Rollouts(ctx, s, parts["reward"], advantages(s), parts["reference"], parts["values"])

    return build


def rl_task(
    name: str,
    about: str,
    head: str,
    section: type,
    check: Callable[[Config], None],
    advantages: Callable[[Any], Advantages],
    kl_in_loss: bool,
    extra_series: tuple[str, ...] = (),
) -> Task:
    """An online-RL task: prompts in, rollouts as the batch source, held-out greedy reward and
    exact match; what differs between RL tasks is the head, the advantages and where the KL goes
    (in the loss, or as a per-token penalty on the rewards)."""
    return Task(
        name=name,
        about=about,
        records=PROMPTS,
        head=head,
        objective=rl_objective(name, kl_in_loss=kl_in_loss),
        source=rl_source(name, advantages),
        evals=held_out_prompts(name),
        section=section,
        check=check,
        compare_metrics=("eval_reward", "eval_exact_match"),
        base_comparable=True,
        rising=("eval_reward",),
        report_series=RL_SERIES + extra_series,
        batch_is_global=True,
    )
