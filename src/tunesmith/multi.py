"""Many adapters on one frozen base (the seed idea of adapters: one model, many tasks).

    ts = tunesmith.MultiAdapter.load("builtin:tiny", {"arith": "runs/a", "chat": "runs/b"})
    ts.use("arith"); ts.model(...)      # the base with the "arith" adapter
    ts.use(None)                        # the base alone

Each adapter is applied to the same model object (any mix of lora, adapter, prefix and prompt:
their wrappers and hooks nest) and loaded once. ``use`` switches by entering every other adapter's
``disable()`` context, so switching costs no reload and no copy; memory grows only by the
adapters' own weights.
"""

from __future__ import annotations

import contextlib
import json
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.config import load_config
from tunesmith.errors import TunesmithError
from tunesmith.methods import Method, build_method
from tunesmith.methods.base import freeze
from tunesmith.models import is_run_dir, load_for_inference, resolve_model_path


class MultiAdapter:
    """A base model carrying named adapters, one (or none) active at a time."""

    def __init__(self, model: nn.Module, tokenizer: Any, base_path: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.base_path = base_path
        self.adapters: dict[str, Method] = {}
        self.active: str | None = None
        self._off = contextlib.ExitStack()  # the disable() contexts of every inactive adapter
        self._failed = contextlib.ExitStack()  # ... and of any whose loading failed
        for stack in (self._off, self._failed):
            weakref.finalize(self, stack.close)  # leave them before interpreter shutdown

    @classmethod
    def load(
        cls, base: str, adapters: dict[str, str], device: torch.device | None = None
    ) -> MultiAdapter:
        """The base (folder, hub id or ``builtin:NAME``) with every ``{name: run folder}`` attached."""
        model, tokenizer, _ = load_for_inference(base, device)
        multi = cls(model, tokenizer, resolve_model_path(base))
        for name, run in adapters.items():
            multi.add(name, run)
        return multi

    def add(self, name: str, run_dir: str | Path) -> None:
        """Attach the adapter trained in ``run_dir`` under ``name`` (the active one stays active)."""
        if name in self.adapters:
            raise TunesmithError(
                f"--adapter {name}: that name is taken; give each adapter its own."
            )
        if not is_run_dir(run_dir):
            raise TunesmithError(f"--adapter {name}={run_dir}: not a tunesmith run folder.")
        run = json.loads((Path(run_dir) / "run.json").read_text())
        if run["artifact"] != "adapter":
            raise TunesmithError(
                f"--adapter {name}={run_dir}: a '{run['method']}' run is a whole model, not an "
                "adapter; use it as the base model instead."
            )
        if Path(run["base_model"]).resolve() != Path(self.base_path).resolve():
            raise TunesmithError(
                f"--adapter {name}={run_dir}: trained on {run['base_model']}, not on this base "
                f"({self.base_path}); adapters only fit the base they were trained on."
            )
        method = build_method(load_config(Path(run_dir) / "config.yaml").method)
        active = self.active
        self.use(None)  # apply and load against the plain base
        try:
            method.apply(self.model)
            try:
                method.load(run_dir)
            except Exception:
                self._failed.enter_context(method.disable())  # half attached: never computes
                raise
            self.adapters[name] = method
        finally:
            freeze(self.model)
            self.use(active)

    def use(self, name: str | None) -> None:
        """Make adapter ``name`` the active one (``None``: the base alone)."""
        if name is not None and name not in self.adapters:
            raise TunesmithError(
                f"--use {name}: no adapter of that name; attached: {', '.join(self.adapters) or 'none'}."
            )
        self._off.close()
        for other, method in self.adapters.items():
            if other != name:
                self._off.enter_context(method.disable())
        self.active = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, attr: str) -> Any:  # generate, parameters, config, ... of the model
        return getattr(self.__dict__["model"], attr)
