"""A student built from its teacher (DistilBERT's initialisation, Sanh et al. 2019, arXiv
1910.01108): the same width, the teacher's embeddings and head, and a subset of its layers
(by default every other one: 0, 2, 4, ...), copied exactly. ``tunesmith student TEACHER --layers
0,2,4 --out DIR`` writes one; ``distill.student: {init: from_teacher, layers: [...]}`` builds it
inside a distillation run.

The layer stack is found generically: the ``nn.ModuleList`` whose length is the config's
``num_hidden_layers``. Kept layers are renumbered (their ``layer_idx``, used by key/value caches)
and per-layer config lists (``layer_types``) are sliced to match.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from torch import nn

from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.paths import share_weights


def default_layers(n: int) -> list[int]:
    """Every other layer of an n-layer teacher: 0, 2, 4, ..."""
    return list(range(0, n, 2))


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, the ModuleList of transformer layers) of ``model``."""
    n = model.config.get_text_config().num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    raise TunesmithError(
        f"{type(model).__name__}: found no list of {n} transformer layers to take a student's from."
    )


def student_from(teacher: nn.Module, layers: list[int] | None = None) -> nn.Module:
    """A copy of ``teacher`` that keeps only ``layers`` (default every other one), in order."""
    name, stack = layer_stack(teacher)
    n = len(stack)
    layers = default_layers(n) if layers is None else list(layers)
    bad = [i for i in layers if not 0 <= i < n]
    if bad or not layers or len(set(layers)) != len(layers):
        raise ConfigError(
            f"distill.student.layers: got {layers}; give distinct indices of the teacher's {n} layers (0..{n - 1})."
        )
    student = copy.deepcopy(teacher)
    kept = nn.ModuleList([copy.deepcopy(stack[i]) for i in layers])
    for k, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = k
    parent, _, child = name.rpartition(".")
    setattr(student.get_submodule(parent) if parent else student, child, kept)
    config = student.config.get_text_config()
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in layers]
    return student


def load_any(path: str) -> nn.Module:
    """A model folder with the class its config names (any head), or the bare backbone."""
    import transformers

    config = json.loads((Path(path) / "config.json").read_text())
    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModel
    return cls.from_pretrained(path, use_safetensors=True)


def build_student(teacher: str, out: str | Path, layers: list[int] | None = None) -> Path:
    """Write a student of ``teacher`` (a model folder or a run folder of a whole model) to
    ``out``, with the teacher's tokenizer; return ``out``."""
    from transformers import AutoTokenizer

    from tunesmith.models import is_run_dir, resolve_model_path

    src = teacher if is_run_dir(teacher) else resolve_model_path(teacher)
    if not (Path(src) / "config.json").exists():
        raise TunesmithError(
            f"{teacher}: no config.json; a student is built from a whole model (merge an adapter run first)."
        )
    model = load_any(src)
    student = student_from(model, layers)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    share_weights(out)
    chosen = layers if layers is not None else default_layers(len(layer_stack(model)[1]))
    (out / "student.json").write_text(json.dumps({"teacher": str(teacher), "layers": chosen}))
    return out


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(teacher: Any, student: Any) -> str:
    return f"{parameter_count(student):,} parameters (teacher {parameter_count(teacher):,})"
