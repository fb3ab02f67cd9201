"""Many processes under ``torchrun``: DDP and FSDP2 (``torch.distributed.fsdp.fully_shard``).

``torchrun --nproc_per_node N -m tunesmith train CONFIG`` starts N copies of the same command with
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` set; :func:`setup` joins them into one process group
(gloo on CPU, NCCL on CUDA, one GPU per process). Without those variables nothing here does
anything and a run is the single-process run, bit for bit.

Data parallelism, in numbers. Every rank takes a disjoint slice of each *global* micro-batch of
``batch_size x world`` rows (``Batches.shard``), so an optimiser step sees
``batch_size x grad_accum x world`` rows, and every rank runs the same number of steps. The loop
divides each micro-batch's summed loss by the step's count summed over *all* ranks (one
all-reduce), and multiplies it by ``world`` because DDP and FSDP average gradients over ranks:

    g = (1/W) sum_r grad( W * sum_{micro of r} loss_sum / C ),   C = sum_r sum_{micro of r} count

which is the gradient of ``sum loss_sum / C`` over the whole global batch: N processes make the
update one process makes with the same global batch (up to float summation order).

Strategies: ``ddp`` wraps the root model in ``DistributedDataParallel`` (only trainable
parameters take part, so a method that freezes the base all-reduces only its own weights);
``fsdp`` calls ``fully_shard`` on every decoder layer (the classes a transformers model lists in
``_no_split_modules``) and then on the root, with a mixed-precision policy from
``train.precision`` and optional CPU offload. Objectives call the root model, so neither needs
anything from a task or a method.

Agreement. Each step starts with one small all-reduce carrying every rank's count, whether its
batches could be made, and whether it received SIGTERM / SIGINT: an error on one rank then ends
every rank with that rank's one-line message, and a signal on any rank stops every rank after the
same step. The loss and gradient norm used by the NaN/inf policy are all-reduced, so every rank
skips or stops at the same step.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from tunesmith.config import TrainConfig
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.training.precision import resolve_precision

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """Where this process stands: its rank among ``world`` processes (``local_rank`` on its node)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 prints progress and writes reports, metrics and artifacts."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def current() -> Dist:
    """This process's place in the process group (rank 0 of 1 when there is none)."""
    if grouped():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Dist()


def grouped() -> bool:
    """Whether this process is in a process group (torchrun, with any number of processes)."""
    return dist.is_available() and dist.is_initialized()


def launched_world() -> int:
    """How many processes ``torchrun`` started (1 when it did not)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


_OWNED = False  # whether setup() created the process group (and teardown() may destroy it)


def setup(train: TrainConfig) -> Dist:
    """Join the process group torchrun set up the environment for; do nothing in one process,
    unless torchrun started it and ``train.strategy`` names ddp or fsdp explicitly (FSDP2 on one
    GPU still brings its mixed-precision policy and CPU offload)."""
    global _OWNED
    world = launched_world()
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if world <= 1 and not (under_torchrun and train.strategy in ("ddp", "fsdp")):
        return current()
    if train.strategy == "none":
        raise ConfigError(
            f"train.strategy: 'none' runs one process, but torchrun started {world}; set "
            f"train.strategy to auto, ddp or fsdp (or launch without torchrun)."
        )
    if not dist.is_initialized():
        cuda = train.device.startswith("cuda") or (
            train.device == "auto" and torch.cuda.is_available()
        )
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        _OWNED = True
        if dist.get_rank() != 0:  # rank 0 speaks for all: no loading reports and bars N times
            import transformers

            transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()
    return current()


def teardown() -> None:
    """Leave the process group if :func:`setup` created it.

    Destroying a gloo group joins its worker threads with the GIL held, while a worker that
    just finished a collective may still need the GIL to free that collective's Python-made
    tensors: a deadlock (PyTorch issue 56297), seen here as a rank that never exited after a
    SIGTERM stop in about one run of twenty. Sleeping first hands the GIL to such a worker."""
    global _OWNED
    if _OWNED and dist.is_initialized():
        time.sleep(0.2)
        dist.destroy_process_group()
    _OWNED = False


def local_device(device: torch.device) -> torch.device:
    """A CUDA device without an index becomes this process's GPU (``cuda:LOCAL_RANK``)."""
    d = current()
    if d.active and device.type == "cuda" and device.index is None:
        return torch.device("cuda", d.local_rank)
    return device


def _comm_device() -> torch.device:
    """Where tensors for collectives live: NCCL wants them on the GPU, gloo on the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _reduce(values: list[float], op: dist.ReduceOp) -> list[float]:
    if not current().active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=op)
    return t.tolist()


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (float64); the values themselves in one process."""
    return _reduce(values, dist.ReduceOp.SUM)


def all_max(values: list[float]) -> list[float]:
    """Element-wise maximum over ranks."""
    return _reduce(values, dist.ReduceOp.MAX)


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any."""
    return all_sum([float(flag)])[0] > 0


def raise_agreed(error: BaseException | None) -> None:
    """Collective: when any rank had an error, every rank raises it (the lowest rank's, as one
    line naming that rank). ``error`` is this rank's, or None. An error this function raised
    (marked ``agreed``: every rank holds one) passes through a later call unchanged, so a
    producer that agrees on its errors inside a batch source is not named twice by the loop."""
    d = current()
    if not d.active:
        if error is not None:
            raise error
        return
    found = [None] * d.world
    message = None if error is None else (type(error).__name__, str(error))
    dist.all_gather_object(found, message)
    if error is not None and getattr(error, "agreed", False):
        raise error
    for rank, m in enumerate(found):
        if m is not None:
            if rank == d.rank and error is not None:
                error.agreed = True  # type: ignore[attr-defined]
                raise error
            agreed = _error_class(m[0])(f"{m[1]} (on rank {rank})")
            agreed.agreed = True  # type: ignore[attr-defined]
            raise agreed


def _error_class(name: str) -> type[TunesmithError]:
    """The TunesmithError subclass called ``name`` (for errors passed between ranks)."""
    todo = [TunesmithError]
    while todo:
        cls = todo.pop()
        if cls.__name__ == name:
            return cls
        todo.extend(cls.__subclasses__())
    return TunesmithError


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its (picklable) result to every rank; a
    ``TunesmithError`` there is raised on every rank."""
    d = current()
    if not d.active:
        return fn()
    box: list[Any] = [None]
    if d.is_main:
        try:
            box[0] = ("ok", fn())
        except TunesmithError as e:
            box[0] = ("error", (type(e).__name__, str(e)))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise _error_class(value[0])(value[1])
    return value


def main_first(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0, then on the others (which then find what it built or cached:
    the built-in model, cached reference log-probs); an error on rank 0 ends every rank."""
    if not current().active:
        return fn()
    box: list[Any] = []
    on_main(lambda: box.append(fn()))  # the others only wait for rank 0's outcome
    return box[0] if box else fn()


def barrier() -> None:
    if current().active:
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# Wrapping the model


def model_bytes(model: nn.Module, trainable: int) -> int:
    """Weights plus, for the trainable ones, an fp32 gradient and AdamW's two fp32 moments."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights + 12 * trainable


def resolve_strategy(
    train: TrainConfig, model: nn.Module, trainable: int, device: torch.device
) -> str:
    """``train.strategy`` for this run: ``auto`` is ``ddp`` when one process holds the model,
    its gradients and AdamW state in 60% of its GPU, else ``fsdp`` (always ``ddp`` on CPU)."""
    if not grouped():
        return "none"
    if train.strategy != "auto":
        return train.strategy
    if not current().active:
        return "none"
    if device.type != "cuda":
        return "ddp"
    free = torch.cuda.get_device_properties(device).total_memory
    return "ddp" if model_bytes(model, trainable) < 0.6 * free else "fsdp"


def layer_classes(model: nn.Module) -> set[str]:
    """Class names of the model's repeated blocks (what transformers never splits across
    devices: ``LlamaDecoderLayer``, ``BertLayer``, ...)."""
    found: set[str] = set()
    for m in model.modules():
        found.update(getattr(m, "_no_split_modules", None) or [])
    return found


class Parallel:
    """The model as the step calls it (plain, DDP-wrapped or FSDP2-sharded), and what each
    strategy needs from the step: gradient sync only on the last micro-batch, the loss scale."""

    def __init__(
        self, model: nn.Module, train: TrainConfig, device: torch.device, trainable: int
    ) -> None:
        self.dist = current()
        self.inner = model
        self.strategy = resolve_strategy(train, model, trainable, device)
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            self.model: nn.Module = DistributedDataParallel(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                forward_sync_buffers=False,  # buffers (rotary tables) are the same everywhere
            )
        elif self.strategy == "fsdp":
            self.model = shard_model(model, train, device)
        else:
            self.model = model

    @property
    def loss_scale(self) -> float:
        """DDP and FSDP average gradients over ranks; the step wants their sum."""
        return float(self.dist.world) if self.strategy != "none" else 1.0

    def sync(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """DDP: all-reduce gradients only in the last micro-batch's backward."""
        if self.strategy == "ddp" and not last:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def gather_into(self, target: nn.Module | None) -> None:
        """FSDP, collective: copy the trained weights, one parameter at a time gathered whole,
        into ``target`` (rank 0's plain copy of the model; None on the other ranks). At no
        moment does a rank hold more than its shards, ``target`` and one whole parameter."""
        params = dict(target.named_parameters()) if target is not None else {}
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if not p.requires_grad:  # frozen: as loaded from disk
                    continue
                whole = p.full_tensor() if hasattr(p, "full_tensor") else p
                if target is not None:
                    if name not in params:
                        raise TunesmithError(
                            f"trained weight {name} has no place in the model loaded again."
                        )
                    params[name].copy_(whole)
                del whole


def shard_model(model: nn.Module, train: TrainConfig, device: torch.device) -> nn.Module:
    """FSDP2: ``fully_shard`` each decoder layer, then the root (embeddings, final norm, head).

    Parameters are stored sharded across ranks and gathered layer by layer for the forward and
    backward. ``train.precision`` bf16 computes in bf16 and reduces gradients in fp32
    (``MixedPrecisionPolicy``); ``train.fsdp_cpu_offload`` keeps the shards in CPU memory.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {}
    if resolve_precision(train.precision, device, model) == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    if train.fsdp_cpu_offload:
        if device.type != "cuda":
            raise ConfigError(
                "train.fsdp_cpu_offload: offloading moves shards from the GPU to CPU memory, and "
                "this run is on the CPU already; set it to false."
            )
        kwargs["offload_policy"] = CPUOffloadPolicy()
    names = layer_classes(model)
    for m in list(model.modules()):
        if type(m).__name__ in names and m is not model:
            fully_shard(m, **kwargs)
    fully_shard(model, **kwargs)
    return model
