"""Load models and tokenizers (local folder, hub id or ``builtin:NAME``), pick device and dtype,
and load finished runs back for generation, evaluation and merging."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.builtin.specs import builtin_path, is_built
from tunesmith.config import Config, ModelConfig, load_config
from tunesmith.console import say
from tunesmith.errors import TunesmithError
from tunesmith.methods.fused_attention import fuse_attention
from tunesmith.methods.fused_lora import fuse_linear
from tunesmith.methods.fused_mlp import fuse_swiglu
from tunesmith.methods.fused_norm import fuse_rmsnorm
from tunesmith.paths import looks_local, shadowing_folder

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}


@dataclass(frozen=True)
class Head:
    """What a task's model carries on its backbone, declared once for every task that uses it."""

    auto_class: str
    """The transformers Auto class that builds the model with this head."""
    load_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra ``from_pretrained`` arguments (e.g. ``num_labels``)."""
    new_modules: tuple[str, ...] = ()
    """Attribute names of freshly initialised head modules: they train whole, whatever the method."""
    saved_whole: bool = False
    """Save the run as a whole model (the method merged in, where it can be), so the Auto class
    alone loads it."""
    peft_task_type: str = "CAUSAL_LM"
    """The task type PEFT artifacts of this head declare."""
    attach: Any = None
    """``attach(model)`` adds the new modules the Auto class does not build (e.g. a value head on
    a causal LM), right after loading; None when the Auto class builds them all."""
    from_config: Callable[[Config], dict[str, Any]] | None = None
    """``from_pretrained`` arguments that depend on the run's config (a classifier's classes)."""


def class_kwargs(cfg: Config) -> dict[str, Any]:
    """A classifier's width and class names, from ``data.labels`` (saved in the model config)."""
    labels = cfg.data.labels
    if not labels:
        raise TunesmithError("data.labels: no classes; list them or give labelled training data.")
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }


class ValueHead(nn.Linear):
    """V(s_t) = w . h_t + b on the backbone's final hidden state: PPO's value model sharing the
    policy's backbone. Zero-initialised, so every value starts at 0 and the first advantages are
    the returns themselves. A linear layer marked as a task head: methods never wrap it."""

    def __init__(self, hidden: int) -> None:
        super().__init__(hidden, 1)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)
        self.tunesmith_head = True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden.to(self.weight.dtype)).squeeze(-1)


def attach_value_head(model: nn.Module) -> None:
    """Give a causal LM a ``value_head`` (kept in float32 whatever the backbone's dtype)."""
    model.value_head = ValueHead(model.config.hidden_size).to(model.device)


HEADS: dict[str, Head] = {
    "lm": Head("AutoModelForCausalLM"),
    # A scalar on the last non-padding token (transformers' sequence-classification rule).
    "reward": Head(
        "AutoModelForSequenceClassification",
        {"num_labels": 1},
        new_modules=("score", "classifier"),
        saved_whole=True,
        peft_task_type="SEQ_CLS",
    ),
    # K class logits: BERT-like encoders read their pooled [CLS] state, decoders the last
    # non-padding token. A checkpoint's own classifier of another width is replaced.
    "classifier": Head(
        "AutoModelForSequenceClassification",
        {"ignore_mismatched_sizes": True, "problem_type": "single_label_classification"},
        new_modules=("score", "classifier"),
        saved_whole=True,
        peft_task_type="SEQ_CLS",
        from_config=class_kwargs,
    ),
    # A causal LM plus a scalar value per position (PPO): saved as the LM with the head beside it.
    "value": Head("AutoModelForCausalLM", new_modules=("value_head",), attach=attach_value_head),
}


def head_kwargs(cfg: Config, head: str) -> dict[str, Any]:
    """The config-dependent ``from_pretrained`` arguments of ``head`` for the run ``cfg``."""
    spec = HEADS[head]
    return spec.from_config(cfg) if spec.from_config is not None else {}


def pick_device(name: str = "auto") -> torch.device:
    """CUDA when present (or asked for), else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TunesmithError(
            f"train.device: '{name}' asked for, but no CUDA device is available; use auto or cpu."
        )
    return torch.device(name)


def resolve_model_path(name: str, key: str = "model.name") -> str:
    """A loadable path or hub id for ``model.name``. Pure: nothing is built or written.

    ``builtin:NAME`` is its cache folder once built; a run folder of a parameter-efficient
    method is its merged model (``RUN/merged``) once merged. ``tunesmith.prepare.ensure_model``
    is the explicit step that builds or merges (``tunesmith.train`` calls it before loading).
    ``key`` is the config key that gave ``name``, for the errors.
    """
    if name.startswith("builtin:"):
        short = name.split(":", 1)[1]
        if not is_built(short):
            raise TunesmithError(
                f"{key}: {name} is not built yet; run `tunesmith builtin build --name {short}` "
                "(tunesmith train and quickstart build it on first use)."
            )
        return str(builtin_path(short))
    path = Path(name).expanduser()
    if is_run_dir(path) and json.loads((path / "run.json").read_text())["artifact"] == "adapter":
        merged = path / "merged"
        if not (merged / "config.json").exists():
            raise TunesmithError(
                f"{key}: the run {path} is an adapter; merge it first with "
                f"`tunesmith merge {path} --out {merged}` (tunesmith train does this on first use)."
            )
        return str(merged)
    if path.exists():
        if not (path / "config.json").exists():
            raise TunesmithError(
                f"{key}: {path} has no config.json; is it a Hugging Face model folder?"
            )
        return str(path)
    if looks_local(name):
        org = shadowing_folder(name)
        hint = f" ({org}/ is a folder here, so this is a path in it; for the hub id, run elsewhere)"
        raise TunesmithError(f"{key}: {path} does not exist{hint if org else ''}.")
    unreachable = _hub_unreachable(name)
    if unreachable:
        raise TunesmithError(
            f"{key}: {name} is not a local folder, and as a hub id it cannot be fetched "
            f"({unreachable}); check the path, or connect (a model downloaded before loads offline)."
        )
    return name  # a hub id


@functools.cache  # asked for each load of the same model in a run
def _hub_unreachable(name: str) -> str | None:
    """Why the hub cannot give ``name`` now (its host does not resolve and nothing of ``name`` is
    in the local hub cache), or None. Without it an offline machine spends about a minute on
    transformers' retries before the same answer. ``HF_HUB_OFFLINE`` leaves it to transformers."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return None  # downloaded before
    except ValueError:  # not a valid repo id
        return f"'{name}' is not a valid hub id either"
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return f"{host} does not resolve: {e.strerror or e}"
    return None


def _load_error(name: str, e: Exception) -> TunesmithError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return TunesmithError(f"model.name: cannot load '{name}' ({first}).")


def load_tokenizer(mcfg: ModelConfig, path: str | None = None) -> Any:
    """The tokenizer, with a pad token (EOS is fine: padding is masked by position, not by id)."""
    from transformers import AutoTokenizer

    path = path or resolve_model_path(mcfg.name)
    try:
        tok = AutoTokenizer.from_pretrained(
            path, trust_remote_code=mcfg.trust_remote_code, revision=mcfg.revision
        )
    except (OSError, ValueError) as e:
        raise _load_error(mcfg.name, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    mcfg: ModelConfig,
    device: torch.device,
    path: str | None = None,
    head: str = "lm",
    extra: dict[str, Any] | None = None,
) -> nn.Module:
    """The model with the task's head (a name in ``HEADS``), from safetensors, on ``device``;
    ``extra`` adds ``from_pretrained`` arguments (``head_kwargs``: a classifier's classes)."""
    import transformers

    spec = HEADS[head]
    path = path or resolve_model_path(mcfg.name)
    kwargs: dict[str, Any] = {
        "dtype": DTYPES[mcfg.dtype],
        "trust_remote_code": mcfg.trust_remote_code,
        "use_safetensors": True,
        "revision": mcfg.revision,
    }
    if mcfg.attn_implementation:
        kwargs["attn_implementation"] = mcfg.attn_implementation
    kwargs.update(spec.load_kwargs)
    kwargs.update(extra or {})
    auto = getattr(transformers, spec.auto_class)
    try:
        with _own_load_report():
            model, info = auto.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(mcfg.name, e) from None
    if spec.attach is not None:
        spec.attach(model)
    for name in spec.new_modules:  # methods never wrap a task head: it trains whole
        if hasattr(model, name):
            getattr(model, name).tunesmith_head = True
    model.tunesmith_fresh = new_module_names(model, info)  # initialised here, not loaded
    said = []  # in place of transformers' LOAD REPORT (_own_load_report)
    if model.tunesmith_fresh:
        said.append(f"new here (not in the checkpoint): {', '.join(model.tunesmith_fresh)}")
    if unused := sorted(info.get("unexpected_keys", ())):
        more = ", ..." if len(unused) > 3 else ""
        said.append(f"{len(unused)} checkpoint tensors unused ({', '.join(unused[:3])}{more})")
    if said:
        say(f"{mcfg.name} as {spec.auto_class}: {'; '.join(said)}")
    if spec.new_modules:  # so does any module the checkpoint lacks (an MLM checkpoint's pooler)
        for name in model.tunesmith_fresh:
            model.get_submodule(name).tunesmith_head = True
    # every model a run loads (policy, reference, teacher, reward model) computes attention alike
    fuse_attention(model)  # causal attention over query blocks on CPU, sdpa elsewhere
    fuse_rmsnorm(model)  # and norms, so a reference or teacher rounds as the policy does
    return model.to(device)


@contextlib.contextmanager
def _own_load_report() -> Iterator[None]:
    """transformers' multi-line LOAD REPORT (missing and unexpected weights, with terminal colour
    codes even into a log file) left out while loading: ``load_model`` says it in one line."""

    def keep(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)

    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def new_module_names(model: nn.Module, info: dict[str, Any]) -> list[str]:
    """Modules whose every parameter was freshly initialised by ``from_pretrained`` (missing
    from the checkpoint, or replaced for a size mismatch)."""
    fresh = set(info.get("missing_keys", ()))
    fresh |= {k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())}
    out = []
    for name, module in model.named_modules():
        params = [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        if params and all(p in fresh for p in params):
            out.append(name)
    return out


def apply_method(model: nn.Module, method: Any, head: str, tokenizer: Any) -> nn.Module:
    """Apply ``method`` to a model carrying ``head``; the head's new modules train whole.

    The same steps for a run being set up and for a run loaded back, so the trainable weights
    (the method's own plus the new head) are the same set in both.
    """
    spec = HEADS[head]
    if spec.new_modules:
        model.config.pad_token_id = tokenizer.pad_token_id
    method.task_type = spec.peft_task_type
    model = method.apply(model)
    for module in model.modules():
        if getattr(module, "tunesmith_head", False):
            module.requires_grad_(True)
    fuse_swiglu(model)  # one autograd node per SwiGLU MLP, whatever the method made of it
    fuse_rmsnorm(model)  # and per RMSNorm
    fuse_linear(model)  # plain linear layers share their input's cast under autocast
    return model


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "config.yaml").exists() and (Path(path) / "run.json").exists()


# Files that make a model what it is (weights and configs), and the folders a run writes beside
# them that are derived or unrelated (checkpoints, the merged copy, a student built from it).
_IDENTITY_SUFFIXES = {".json", ".safetensors", ".bin", ".yaml"}
_DERIVED = {"checkpoints", "merged", "student-init"}


def weights_fingerprint(name: str, revision: str | None = None) -> str:
    """A hex digest of a model's identity without loading it: for a folder, the size and
    modification time of every config and weight file under it (``checkpoints/``, ``merged/``
    and ``student-init/`` excluded); a run folder of an adapter adds its base model's; anything
    else (a hub id) is its name and revision. Changing a weight file changes the digest."""
    import hashlib

    h = hashlib.sha256(f"{name}|{revision}".encode())
    path = Path(name).expanduser()
    if not path.is_dir():
        return h.hexdigest()
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if f.suffix not in _IDENTITY_SUFFIXES or rel.parts[0] in _DERIVED or not f.is_file():
            continue
        st = f.stat()
        h.update(f"{rel.as_posix()}:{st.st_size}:{st.st_mtime_ns}".encode())
    if is_run_dir(path) and json.loads((path / "run.json").read_text())["artifact"] == "adapter":
        base = load_config(path / "config.yaml").model
        h.update(weights_fingerprint(resolve_model_path(base.name), base.revision).encode())
    return h.hexdigest()


def load_for_inference(
    path_or_name: str, device: torch.device | None = None
) -> tuple[nn.Module, Any, Config | None]:
    """(model, tokenizer, run config or None) for a run folder, a model folder or a hub id.

    A run folder of a parameter-efficient method is loaded as its base model with the method
    applied and its weights loaded; a full run folder is a plain model folder.
    """
    from tunesmith.methods import build_method

    device = device or pick_device()
    if is_run_dir(path_or_name):
        cfg = load_config(Path(path_or_name) / "config.yaml")
        run = json.loads((Path(path_or_name) / "run.json").read_text())
        tok = load_tokenizer(cfg.model, path_or_name)
        head = run.get("head", "lm")
        extra = head_kwargs(cfg, head)
        if run["artifact"] == "model":
            model = load_model(cfg.model, device, path_or_name, head=head, extra=extra)
        else:  # the base (with a fresh task head, if any) + the method and its saved weights
            model = load_model(cfg.model, device, head=head, extra=extra)
            method = build_method(cfg.method)
            model = apply_method(model, method, head, tok)
            method.load(path_or_name)
            model.tunesmith_method = method  # for merge
        return model.eval(), tok, cfg
    mcfg = ModelConfig(name=path_or_name)
    return load_model(mcfg, device).eval(), load_tokenizer(mcfg), None
