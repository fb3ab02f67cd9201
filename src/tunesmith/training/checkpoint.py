"""Resumable checkpoints in safetensors + JSON (nothing is pickled), safe to kill at any moment.

A checkpoint folder ``step-NNNNNNN/`` holds the method's trainable weights, the optimiser state,
the RNG states (torch CPU and CUDA, Python's ``random``), the scheduler and the loop position
(including the batch source's state), so a resumed run is bitwise the uninterrupted one.

Writing is atomic, in this order:

1. every file goes into a hidden ``.tmp-step-NNNNNNN-PID/`` folder and is flushed to disk
   (``fsync``);
2. ``manifest.json`` (written last, also fsync'd) lists each file with its size in bytes and its
   SHA-256;
3. the folder is renamed to ``step-NNNNNNN`` (one ``rename``, atomic on POSIX file systems) and the
   parent folder is fsync'd, so the rename itself survives a power cut.

A process killed at any point leaves either no ``step-`` folder or a complete one; leftover
``.tmp-`` folders are removed by the next save. ``--resume`` still trusts nothing: it walks the
``step-`` folders from the newest and takes the first whose manifest verifies (every file present
with its size and checksum), saying in one line why it skipped any other.

Nothing non-finite is ever written: a checkpoint whose weights or optimiser moments hold NaN/inf
is refused (:class:`~tunesmith.training.guard.NonFiniteError`). A write that fails (disk full,
no permission) removes its temporary folder and raises :class:`~tunesmith.errors.SaveError`
naming what failed and the previous checkpoint, which is untouched.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tunesmith.errors import SaveError, TunesmithError
from tunesmith.methods.base import Method
from tunesmith.training.distributed import Parallel, any_rank, raise_agreed
from tunesmith.training.guard import NonFiniteError, fault_point, kill_self

MANIFEST = "manifest.json"
FORMAT = 1
FILES = ("weights.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
SHARDED = 2
"""Format of checkpoints written under torchrun: ``torch.distributed.checkpoint`` (DCP) files
(``.metadata`` plus one ``__R_0.distcp`` per rank holding its shards of the trainable weights and
the optimiser state, keyed by parameter name), ``rng-R.safetensors`` per rank and ``state.json``.
DCP re-shards on load, so such a checkpoint resumes on any number of processes, one included."""
REQUIRED = {FORMAT: FILES, SHARDED: (".metadata", "state.json")}


def _optimizer_to_flat(
    opt: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a new file, a rename) to disk. Some file systems cannot fsync a
    folder (EINVAL): there the rename is as durable as the file system makes it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _write(path: Path, write: Callable[[Path], None]) -> dict[str, Any]:
    """Write one file with ``write``, flush it to disk, and describe it for the manifest."""
    write(path)
    with path.open("rb+") as f:
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def save_checkpoint(
    root: Path,
    step: int,
    method: Method,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    loop_state: dict[str, Any],
    keep: int,
    par: Parallel | None = None,
) -> Path:
    """Write ``root/step-NNNNNNN`` atomically (see the module docstring) and keep the ``keep``
    newest complete checkpoints. Under torchrun (``par`` with several ranks) every rank writes
    its shards (:func:`save_sharded`)."""
    if par is not None and (par.dist.active or par.strategy == "fsdp"):
        return save_sharded(root, step, par, opt, sched, loop_state, keep)
    weights = {k: v.contiguous() for k, v in method.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_to_flat(opt)
    bad = _non_finite(weights) or _non_finite(opt_tensors)
    if bad is not None:
        previous = latest_complete_name(root)
        raise NonFiniteError(
            f"step {step}: {bad} holds NaN/inf, so no checkpoint was written"
            f"{f'; the last good one, {previous}, is intact' if previous else ''}; try a lower "
            f"train.lr or train.precision=fp32."
        )
    rng = _rng_state()
    meta = _meta(step, loop_state, sched) | {"optimizer": opt_meta}
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    doing = f"creating {root}"
    sealing: list[str] = []
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):  # left by a writer that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        writers: list[tuple[str, Callable[[Path], None]]] = [
            ("weights.safetensors", lambda p: save_file(weights, str(p))),
            ("optimizer.safetensors", lambda p: save_file(opt_tensors, str(p))),
            ("rng.safetensors", lambda p: save_file(rng, str(p))),
            ("state.json", lambda p: p.write_text(json.dumps(meta, indent=1))),
        ]
        files = {}
        for name, write in writers:
            doing = f"writing {tmp / name}"
            files[name] = _write(tmp / name, write)
            _fault()
        sealing = [doing]
        _seal(tmp, final, {"format": FORMAT, "step": step, "files": files}, sealing)
    except (OSError, SafetensorError) as e:  # safetensors reports ENOSPC as SafetensorError
        raise _save_error(e, step, root, sealing[0] if sealing else doing, tmp) from None
    _prune(root, final, keep)
    return final


def _seal(tmp: Path, final: Path, manifest: dict[str, Any], doing: list[str]) -> None:
    """Write the manifest into ``tmp`` and rename it to ``final`` (swapping an existing
    ``final`` aside first), flushing each step to disk; ``doing[0]`` says what it is doing, for
    the message if it fails."""
    root = final.parent
    doing[0] = f"writing {tmp / MANIFEST}"
    _write(tmp / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))
    _fsync_dir(tmp)
    _fault()
    doing[0] = f"renaming {tmp.name} to {final}"
    aside = root / f".old-{final.name}-{os.getpid()}"
    if final.exists():  # the same step again (a resumed run that had finished): swap it
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_dir(root)
    _fault()
    shutil.rmtree(aside, ignore_errors=True)
    return ""


_seal.doing = ""


def _rng_state() -> dict[str, torch.Tensor]:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return rng


def _meta(step: int, loop_state: dict[str, Any], sched: Any) -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    return {
        "step": step,
        "loop": loop_state,
        "scheduler": sched.state_dict(),  # plain numbers; lambdas are stored as None
        "python_random": [version, list(mt), gauss],
    }


def _dcp_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, Any]:
    """The trainable weights and optimiser state as DCP saves and loads them (each rank's
    shards under FSDP, keyed by parameter name), and the options to put them back."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    weights, optim = get_state_dict(model, opt, options=options)
    return {"model": weights, "optim": optim}, options


def _local(t: Any) -> Any:
    return t.to_local() if hasattr(t, "to_local") else t


def save_sharded(
    root: Path,
    step: int,
    par: Parallel,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    loop_state: dict[str, Any],
    keep: int,
) -> Path:
    """Collective: every rank writes its shards into the same temporary folder with DCP; rank 0
    writes ``state.json`` and, once every rank is done, the manifest and the rename (the same
    order and guarantees as a single-process checkpoint). An error on any rank ends every rank
    with it, and the temporary folder is removed."""
    import torch.distributed.checkpoint as dcp

    d = par.dist
    state, _ = _dcp_state(par.model, opt)
    local = {
        f"{part}.{k}": _local(v)
        for part in ("model",)
        for k, v in state[part].items()
        if isinstance(v, torch.Tensor)
    }
    bad = _non_finite(local)
    if any_rank(bad is not None):
        previous = latest_complete_name(root)
        raise NonFiniteError(
            f"step {step}: the weights hold NaN/inf{f' ({bad})' if bad else ''}, so no checkpoint "
            f"was written{f'; the last good one, {previous}, is intact' if previous else ''}; try "
            f"a lower train.lr or train.precision=fp32."
        )
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-sharded"
    doing = f"creating {tmp}"
    error: BaseException | None = None
    if d.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-step-*"):  # left by a writer that was killed
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            error = e
    raise_agreed(_save_error(error, step, root, doing))
    try:
        doing = f"writing {tmp} (rank {d.rank})"
        dcp.save(state, checkpoint_id=str(tmp))
        _write(tmp / f"rng-{d.rank}.safetensors", lambda p: save_file(_rng_state(), str(p)))
    except (OSError, SafetensorError, RuntimeError) as e:  # DCP wraps a rank's OSError
        error = e
    raise_agreed(_save_error(error, step, root, doing, tmp))
    sealing: list[str] = []
    if d.is_main:
        try:
            doing = f"writing {tmp / 'state.json'}"
            meta = _meta(step, loop_state, sched)
            files = {
                "state.json": _write(
                    tmp / "state.json", lambda p: p.write_text(json.dumps(meta, indent=1))
                )
            }
            for f in sorted(tmp.iterdir()):
                if f.name not in files:
                    files[f.name] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
            _fault()
            sealing = [doing]
            manifest = {"format": SHARDED, "step": step, "world_size": d.world, "files": files}
            _seal(tmp, final, manifest, sealing)
            _prune(root, final, keep)
        except (OSError, SafetensorError) as e:
            error, doing = e, sealing[0] if sealing else doing
    raise_agreed(_save_error(error, step, root, doing, tmp if d.is_main else None))
    return final


def _save_error(
    e: BaseException | None, step: int, root: Path, doing: str, tmp: Path | None = None
) -> SaveError | None:
    """The one-line SaveError for a failed checkpoint write (None when nothing failed)."""
    if e is None:
        return None
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    previous = latest_complete_name(root)
    kept = (
        f"the previous checkpoint {previous} is intact and --resume continues from it"
        if previous
        else "no earlier checkpoint exists"
    )
    return SaveError(
        f"checkpoint of step {step} not written: {doing} failed ({io_reason(e)}); {kept}. "
        f"Free disk space or make {root} writable (or choose another output_dir)."
    )


def checkpoint_format(path: Path) -> int:
    """The format a (verified) checkpoint folder was written in."""
    return int(json.loads((path / MANIFEST).read_text()).get("format", FORMAT))


def load_sharded(
    path: Path,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
) -> None:
    """Load a DCP checkpoint into ``model`` (plain, DDP or FSDP2) and ``opt``, re-sharding it
    for this run's processes; the RNG of this rank (rank 0's when there was none)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from tunesmith.training.distributed import current

    state, options = _dcp_state(model, opt)
    with warnings.catch_warnings():  # one process reading a checkpoint of several is intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=not current().active)
    set_state_dict(
        model,
        opt,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=options,
    )
    rank_file = path / f"rng-{current().rank}.safetensors"
    _set_rng(load_file(str(rank_file if rank_file.exists() else path / "rng-0.safetensors")))


def _set_rng(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [rng[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng]
        )


def _fault() -> None:
    """Test hook (``TUNESMITH_FAULT=kill-in-checkpoint:N``): SIGKILL at the N-th of these points
    in this process. A checkpoint passes six: after each of its four files, after the manifest,
    and after the rename (the first five leave a torn ``.tmp-`` folder)."""
    if fault_point("kill-in-checkpoint"):
        kill_self()


def io_reason(e: BaseException) -> str:
    """The operating system's words for a failed write ("No space left on device")."""
    if getattr(e, "strerror", None):
        return e.strerror
    # safetensors: "Error while serializing: I/O error: No space left on device (os error 28)"
    return str(e).removeprefix("Error while serializing: ").removeprefix("I/O error: ")


def _prune(root: Path, newest: Path, keep: int) -> None:
    """Keep ``newest`` and the ``keep - 1`` newest others that look complete; remove the rest."""
    kept = 1
    for p in reversed(list_checkpoints(root)):
        if p == newest:
            continue
        if kept < keep and (p / MANIFEST).exists():
            kept += 1
            continue
        shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Every ``step-`` folder under ``root``, oldest first (complete or not)."""
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))


def verify_checkpoint(path: Path) -> str | None:
    """None when ``path`` is a complete checkpoint, else why not (one phrase)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST} (its write was cut short, or an older tunesmith wrote it)"
    except (OSError, ValueError) as e:
        return f"{MANIFEST} unreadable ({e})"
    files = manifest.get("files", {}) if isinstance(manifest, dict) else {}
    fmt = manifest.get("format", FORMAT) if isinstance(manifest, dict) else FORMAT
    missing = [f for f in REQUIRED.get(fmt, FILES) if f not in files]
    if missing:
        return f"{MANIFEST} does not list {', '.join(missing)}"
    for name, want in files.items():
        f = path / name
        if not f.exists():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size} bytes, the manifest says {want['bytes']}"
        if _sha256(f) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_complete(root: Path, report: Callable[[str], None] | None = None) -> Path | None:
    """The newest checkpoint under ``root`` that verifies; ``report`` gets one line per skipped
    one."""
    for p in reversed(list_checkpoints(root)):
        reason = verify_checkpoint(p)
        if reason is None:
            return p
        if report is not None:
            report(f"skipping checkpoint {p}: {reason}.")
    return None


def latest_complete_name(root: Path) -> str | None:
    """The newest ``step-`` folder with a manifest (no checksums: for messages)."""
    done = [p for p in list_checkpoints(root) if (p / MANIFEST).exists()]
    return str(done[-1]) if done else None


def load_checkpoint(
    path: Path,
    method: Method,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    par: Parallel | None = None,
) -> dict[str, Any]:
    """Restore everything saved by :func:`save_checkpoint`; return the loop state.

    A sharded checkpoint (written under torchrun) loads into any number of processes; a
    single-process one loads wherever the parameters are whole (one process, or DDP)."""
    meta = json.loads((path / "state.json").read_text())
    if checkpoint_format(path) == SHARDED:
        load_sharded(path, par.model if par is not None else method.model, opt)
    else:
        if par is not None and par.strategy == "fsdp":
            raise TunesmithError(
                f"--resume: {path} was written by one process and train.strategy=fsdp shards the "
                f"weights; resume it with train.strategy=ddp or in one process (a checkpoint "
                f"written under torchrun resumes under any strategy)."
            )
        method.load_state_dict(load_file(str(path / "weights.safetensors")))
        _optimizer_from_flat(opt, load_file(str(path / "optimizer.safetensors")), meta["optimizer"])
        _set_rng(load_file(str(path / "rng.safetensors")))
    sched.load_state_dict(meta["scheduler"])
    if "python_random" in meta:
        version, mt, gauss = meta["python_random"]
        random.setstate((version, tuple(mt), gauss))
    return meta["loop"] | {"step": meta["step"]}
