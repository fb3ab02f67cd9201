"""The built-in models' specifications and where each lives once built (no building here:
that is ``tunesmith.prepare``, an explicit step)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.paths import cache_root


@dataclass(frozen=True)
class BuiltinSpec:
    """Architecture and pretraining budget of a built-in model."""

    hidden_size: int = 128
    intermediate_size: int = 384
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    documents: int = 26_000
    """Pretraining documents (a few fact sentences each)."""
    epochs: float = 1.0
    batch_size: int = 16
    max_length: int = 256
    lr: float = 3e-3
    seed: int = 0
    version: int = 1
    """Bumped whenever the build changes, so caches rebuild."""


SPECS = {
    "tiny": BuiltinSpec(),
    # A seconds-to-build stand-in with the same tokenizer and layout, for smoke tests.
    "micro": BuiltinSpec(
        hidden_size=32,
        intermediate_size=64,
        layers=2,
        heads=2,
        kv_heads=1,
        documents=400,
        batch_size=8,
        max_length=128,
    ),
}


def builtin_path(name: str) -> Path:
    """The folder built-in model ``name`` is (or will be) built in."""
    if name not in SPECS:
        raise TunesmithError(
            f"model.name: unknown built-in model 'builtin:{name}'; available: {', '.join('builtin:' + n for n in SPECS)}."
        )
    return cache_root() / "builtin" / f"{name}-v{SPECS[name].version}"


def is_built(name: str) -> bool:
    return (builtin_path(name) / "build.json").exists()
