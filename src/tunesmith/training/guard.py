"""What stops a run early, and how it stops: scheduler / Ctrl-C signals and non-finite steps.

**Signals.** ``SIGTERM`` (what Slurm, Kubernetes and most schedulers send before they kill a job)
and ``SIGINT`` (Ctrl-C) only raise a flag while a :class:`SignalGuard` is active. The loop reads
the flag between steps: it finishes the step it is in, writes a checkpoint, and raises
:class:`Interrupted`, which the CLI turns into one line saying how to resume and the shell's
conventional exit code ``128 + signal`` (130 for SIGINT, 143 for SIGTERM). A second signal
exits at once with the same code: checkpoints are written atomically, so the previous one is
intact whatever the moment.

**Non-finite steps.** A step whose loss or gradient norm is NaN or infinite is never applied:
:class:`NanGuard` decides, from ``train.nan_policy`` and ``train.max_nan_steps``, whether the loop
skips it (gradients dropped, no optimiser update, counted in the logs) or stops with
:class:`NonFiniteError`, leaving the last good checkpoint as it was.

**Fault injection.** ``TUNESMITH_FAULT=kill-in-checkpoint:N`` makes the process SIGKILL itself at
the N-th point of checkpoint writing it passes (six per checkpoint: after each of its four files,
after the manifest, after the rename; see ``checkpoint._fault``). The crash-safety tests use it
to kill a run at the worst moments deterministically; nothing else reads it.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any

from tunesmith.errors import TunesmithError

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Interrupted(TunesmithError):
    """The run stopped on a signal after writing a checkpoint; ``exit_code`` is 128 + signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class NonFiniteError(TunesmithError):
    """Training stopped on NaN / inf (``train.nan_policy``); the last good checkpoint is kept."""


class SignalGuard:
    """Turn the first SIGTERM / SIGINT into a flag; a second one exits at once.

    Active only in the main thread (Python delivers signals there); elsewhere it does nothing and
    the signals keep their usual effect. The previous handlers come back on exit.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            print(
                f"tunesmith: second {name}: exiting now; the last checkpoint written is intact.",
                file=sys.stderr,
                flush=True,
            )
            os._exit(128 + signum)
        self.signum = signum
        print(
            f"tunesmith: {name} received: finishing this step and writing a checkpoint "
            f"(send it again to exit at once).",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for s in HANDLED:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


ADVICE = (
    "try a lower train.lr, train.precision=fp32 instead of bf16, or gradient clipping "
    "(train.max_grad_norm=1.0); --resume accepts these changes"
)


class NanGuard:
    """Count non-finite steps and decide: skip the step, or stop the run.

    ``policy`` ``skip`` drops a non-finite step and stops once ``max_consecutive`` steps in a row
    were non-finite; ``stop`` stops at the first one.
    """

    def __init__(self, policy: str, max_consecutive: int, skipped: int = 0) -> None:
        self.policy = policy
        self.max_consecutive = max_consecutive
        self.skipped = skipped  # over the whole run (saved in checkpoints)
        self.consecutive = 0

    @staticmethod
    def finite(loss: float, grad_norm: float) -> bool:
        return math.isfinite(loss) and math.isfinite(grad_norm)

    def check(self, step: int, loss: float, grad_norm: float, last_checkpoint: str | None) -> None:
        """Record step ``step`` (1-based); raise :class:`NonFiniteError` when the run must stop."""
        if self.finite(loss, grad_norm):
            self.consecutive = 0
            return
        self.consecutive += 1
        self.skipped += 1
        if self.policy == "skip" and self.consecutive < self.max_consecutive:
            return
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
        why = (
            "train.nan_policy=stop"
            if self.policy == "stop"
            else f"{self.consecutive} non-finite steps in a row, train.max_nan_steps={self.max_consecutive}"
        )
        kept = (
            f"the last good checkpoint {last_checkpoint} is intact"
            if last_checkpoint
            else "no checkpoint was written (set train.save_every to keep some)"
        )
        raise NonFiniteError(
            f"step {step}: {what} ({why}); stopped, the step was not applied and {kept}; {ADVICE}."
        )


def fault_point(kind: str) -> bool:
    """True where ``TUNESMITH_FAULT`` asks for a fault of ``kind`` now (counting calls)."""
    spec = os.environ.get("TUNESMITH_FAULT", "")
    if not spec.startswith(kind + ":"):
        return False
    _COUNTS[kind] = _COUNTS.get(kind, 0) + 1
    return _COUNTS[kind] == int(spec.split(":", 1)[1])


_COUNTS: dict[str, int] = {}


def kill_self() -> None:
    """SIGKILL this process: no handler, no cleanup, exactly what an OOM killer or a pulled plug
    leaves behind."""
    os.kill(os.getpid(), signal.SIGKILL)
