"""The typed run configuration: one YAML file (or dict) describes a run.

Every field is documented where it is defined. ``load_config`` reads YAML, applies dotted
overrides (``train.lr=1e-4``) and validates: an unknown key names the closest valid key, a bad
value names the key and what is allowed. Method settings live beside each method
(``tunesmith.methods``) and are found through the method registry by ``method.name``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tunesmith.errors import ConfigError

# ----------------------------------------------------------------------------------------------
# Schema


@dataclass
class ModelConfig:
    name: str = "builtin:tiny"
    """Local folder, Hugging Face hub id, or ``builtin:tiny`` (tunesmith's own small base model)."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Dtype the weights are loaded in. ``auto`` keeps the checkpoint's own dtype."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub checkpoint. Off unless you trust the source."""
    attn_implementation: str | None = None
    """``sdpa`` (default in transformers), ``eager`` or ``flash_attention_2``."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for hub ids."""


@dataclass
class DataConfig:
    train: str = "builtin:arith"
    """Training data: a .jsonl/.json/.csv/.parquet file, a hub dataset name, or ``builtin:NAME``."""
    eval: float | str | None = 0.05
    """Held-out split: a fraction of ``train`` (0 < f < 1), a file, or null for none."""
    format: Literal[
        "auto",
        "text",
        "prompt_completion",
        "alpaca",
        "chat",
        "sharegpt",
        "preference",
        "labeled",
        "prompt",
    ] = "auto"
    """Record format. ``auto`` picks it from the fields of the first record and says what it chose.
    ``sharegpt`` (``conversations`` of ``from``/``value`` turns) loads as ``chat``."""
    template: str | None = None
    """Chat template: null uses the tokenizer's own; ``chatml`` a built-in one; or a .jinja file."""
    max_length: int = 1024
    """Longest tokenised example (and packed row) in tokens."""
    truncation: Literal["truncate", "drop", "error"] = "truncate"
    """What to do with longer examples: cut them (counted and reported), drop them, or stop."""
    packing: bool | Literal["auto"] = "auto"
    """Pack several examples into one row; attention never crosses example boundaries. When
    packing, ``train.batch_size`` counts rows of up to ``max_length`` tokens (each holding as many
    examples as fit), not examples. ``auto`` does not pack: one example per row, batched with
    examples of similar length (``group_by_length``), measured faster and leaner than packing
    (bench/IDEAS.md); prefix and prompt tuning cannot pack (virtual tokens lead every row)."""
    group_by_length: bool = True
    """Unpacked training batches examples of similar length together (shuffled within windows
    of 64 batches, batch order shuffled), so little of a batch is padding."""
    share_prompt: bool | Literal["auto"] = "auto"
    """Lay each preference pair in one row, its prompt once and each response after it, the
    responses hidden from each other: the same log-probabilities for fewer tokens (tasks that
    score responses by their log-probabilities: ``dpo``). ``train.batch_size`` still counts
    pairs; batches group pairs by the length of their rows, so the two layouts meet pairs in
    different batches. Possible for methods that leave rows to the data and models that take
    the row's own mask and hide no keys by a sliding window shorter than ``max_length``.
    ``auto``: on CPU where possible (measured faster there, bench/IDEAS.md); off on GPUs (not
    measured); a resumed run keeps its checkpoint's layout."""
    loss_on: Literal["completion", "all"] = "completion"
    """Supervise only the completion / assistant tokens (with their end-of-turn token), or all."""
    empty_completion: Literal["warn", "drop", "error"] = "warn"
    """An example whose completion (assistant turn, ``output``, ``chosen``/``rejected``) is empty
    trains only its end token. ``warn``: train on it and print one line with the count and the
    first file:line; ``drop``: leave such examples out (counted); ``error``: stop at the first."""
    skip_bad_rows: bool = False
    """Skip (and count) malformed records instead of stopping at the first one."""
    split: str = "train"
    """Split to read when ``train`` is a hub dataset."""
    max_examples: int | None = None
    """Use at most this many training examples (after the eval split); null for all."""
    labels: list[str] | None = None
    """Class names in id order, for labelled text (``text`` + ``label``); null takes them from
    the training data (sorted names, or ``0..K-1`` when the labels are integer ids)."""


@dataclass
class TrainConfig:
    epochs: float = 1.0
    """Passes over the training data (ignored when ``max_steps`` is set)."""
    max_steps: int | None = None
    """Optimizer steps to run; null derives them from ``epochs``."""
    batch_size: int = 8
    """Examples (pairs, prompts) per micro-batch; with ``data.packing: true``, packed rows."""
    grad_accum: int = 1
    """Micro-batches per optimizer step. The loss is normalised over the whole step."""
    lr: float = 2.0e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay, applied to matrices only (not biases and norms)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    warmup: float = 0.03
    """Warm-up: a fraction of the steps when < 1, else a number of steps."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; null disables clipping."""
    nan_policy: Literal["skip", "stop"] = "skip"
    """A step whose loss or gradient norm is NaN/inf is never applied: ``skip`` drops it (counted
    in the logs as ``nan_steps``), ``stop`` ends the run there, leaving the last checkpoint."""
    max_nan_steps: int = 5
    """With ``nan_policy: skip``, this many non-finite steps in a row stop the run."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Autocast precision: ``auto`` is bf16 on a GPU that supports it, else fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% slower."""
    compile: bool = False
    """``torch.compile`` each decoder layer (``training/compile.py``): the first steps spend tens
    of seconds compiling; on CPU it paid back after ~200 steps (1.11x per step, bench/IDEAS.md)."""
    cpu_memory: Literal["fast", "lean", "system"] = "fast"
    """CPU runs with glibc (``training/memory.py``): ``fast`` keeps freed activation memory in
    malloc's heap for the next step (no page faults after the first step: 1.1x faster SFT on
    short examples, 1.6x at a 150k vocabulary; bench/IDEAS.md); ``lean`` hands it back to the
    system at once (peak resident memory about 0.6x on SFT, steps about 1.6x slower);
    ``system`` leaves malloc's own defaults."""
    seed: int = 0
    """Seed for weights of new parameters, data order and dropout."""
    eval_every: int | None = None
    """Evaluate every N steps (and always at the end); null evaluates only at the end."""
    eval_batches: int | None = None
    """Cap evaluation at this many batches; null uses the whole held-out split."""
    save_every: int | None = None
    """Write a resumable checkpoint every N steps; null only at the end."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    log_every: int = 1
    """Append metrics to metrics.jsonl every N steps."""
    device: str = "auto"
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    progress: bool = True
    """Show a progress bar."""
    strategy: Literal["auto", "ddp", "fsdp", "none"] = "auto"
    """How processes started by ``torchrun`` share the work (ignored in one process): ``ddp``
    (each holds the whole model, gradients are averaged), ``fsdp`` (FSDP2: parameters, gradients
    and optimiser state sharded per decoder layer), ``auto`` (``ddp`` when the weights, gradients
    and AdamW state fit in 60% of one GPU, else ``fsdp``; ``ddp`` on CPU), ``none`` (refuse to run
    under torchrun). The global batch is ``batch_size x grad_accum x`` the number of processes."""
    fsdp_cpu_offload: bool = False
    """With ``fsdp``: keep sharded parameters, gradients and optimiser state in CPU memory
    between uses (PyTorch's ``CPUOffloadPolicy``; GPU runs only)."""


# ----------------------------------------------------------------------------------------------
# Task settings: each task registers its name and its own section (``dpo:``, ``reward:``, ...)
# from its own file (``tunesmith.tasks``), so this module never lists tasks.


@dataclass(frozen=True)
class TaskSettings:
    section: type | None
    """Dataclass of the task's own config section (under the task's name), or None."""
    check: typing.Callable[[Config], None] | None = None
    """Validation across sections (e.g. a setting that needs a method capability)."""


TASKS: dict[str, TaskSettings] = {}


TASK_MODULES = ("tunesmith.tasks",)
"""The modules that register the tasks' settings (below), imported before a config is built."""


def register_tasks() -> None:
    """Import :data:`TASK_MODULES` (once; importing registers)."""
    for module in TASK_MODULES:
        importlib.import_module(module)


def register_task_settings(
    name: str, section: type | None, check: typing.Callable[[Config], None] | None = None
) -> None:
    TASKS[name] = TaskSettings(section, check)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model (a string is shorthand for ``model.name``)."""
    task: str = "sft"
    """What is learned, a registered task: ``sft`` (imitate examples), ``reward`` (a reward model
    from preference pairs), ``dpo`` (a policy from preference pairs: DPO and its siblings); see
    ``tunesmith.tasks``."""
    method: Any = None
    """Which weights train: ``full`` or ``lora`` (a string is shorthand for ``method.name``)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and loop settings."""
    output_dir: str = "runs/run"
    """Run folder: resolved config, metrics, checkpoints and the final artifacts."""
    sections: dict[str, Any] = field(default_factory=dict, repr=False)
    """Every registered task's own settings by task name (``cfg.dpo`` reads ``sections['dpo']``);
    in YAML each is a top-level section."""

    def __post_init__(self) -> None:
        register_tasks()
        if self.method is None:
            from tunesmith.methods import method_config

            self.method = method_config("lora")
        for name, settings in TASKS.items():
            if settings.section is not None and name not in self.sections:
                self.sections[name] = settings.section()

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(name)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, as written to ``config.yaml`` in the run folder."""
        out = dataclasses.asdict(self)
        out["method"] = {"name": self.method.name, **dataclasses.asdict(self.method)}
        sections = out.pop("sections")
        output_dir = out.pop("output_dir")
        return {**out, **sections, "output_dir": output_dir}


# ----------------------------------------------------------------------------------------------
# Loading and validation


# Names other tools use (TRL / transformers / PEFT), so their users are pointed at ours.
ALIASES = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "warmup_ratio": "warmup",
    "warmup_steps": "warmup",
    "lr_scheduler_type": "schedule",
    "max_seq_length": "max_length",
    "r": "rank",
    "lora_r": "rank",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "targets",
    "use_rslora": "rslora",
    "model_name_or_path": "name",
    "torch_dtype": "dtype",
}


def _shown(text: str) -> str:
    """``text`` for a one-line message: newlines and other control characters escaped."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _closest(key: str, valid: typing.Iterable[str]) -> str:
    valid = list(valid)
    if not valid:
        return " This section takes no keys."
    alias = difflib.get_close_matches(key, list(ALIASES), n=1, cutoff=0.8)
    if alias and ALIASES[alias[0]] in valid:
        return f" Did you mean '{ALIASES[alias[0]]}'?"
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else f" Valid keys: {', '.join(sorted(valid))}."


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return {float: "a number", int: "an integer", str: "a string", bool: "true/false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: got {value!r}; allowed: {_type_name(tp)}.")
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: got {value!r}; expected {_type_name(tp)}.")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: got {value!r}; expected {_type_name(tp)}.")
        return [_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: got {value}; expected a finite number.")
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: got {value!r}; expected {_type_name(tp)}.")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, validating keys and value types."""
    where = prefix or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = _top_keys() if cls is Config else [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown key '{_shown(full)}'.{_closest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(prefix)
    return obj


def _positive(key: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{key}: got {value}; must be {bound}.")


def _check_data(d: DataConfig) -> None:
    _positive("data.max_length", d.max_length)
    if isinstance(d.eval, float) and not 0.0 <= d.eval < 1.0:
        raise ConfigError(
            f"data.eval: got {d.eval}; a fraction must be in [0, 1), or give a file path."
        )
    _positive("data.max_examples", d.max_examples)


def _check_train(t: TrainConfig) -> None:
    for name in ("epochs", "batch_size", "grad_accum", "lr", "max_steps", "eval_every"):
        _positive(f"train.{name}", getattr(t, name))
    for name in ("save_every", "eval_batches", "keep_checkpoints", "log_every", "max_nan_steps"):
        _positive(f"train.{name}", getattr(t, name))
    _positive("train.weight_decay", t.weight_decay, allow_zero=True)
    _positive("train.warmup", t.warmup, allow_zero=True)
    _positive("train.max_grad_norm", t.max_grad_norm)
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"train.betas: got {t.betas}; expected two numbers in [0, 1).")
    if t.device != "auto" and not (t.device == "cpu" or t.device.startswith("cuda")):
        raise ConfigError(f"train.device: got {t.device!r}; allowed: auto, cpu, cuda, cuda:N.")


DEFAULT_METHOD = "lora"  # what a config that names no method trains with


def config_from_dict(data: dict[str, Any]) -> Config:
    """Validate a plain dict (as read from YAML) into a :class:`Config`."""
    register_tasks()
    from tunesmith.methods import method_config, method_names

    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping of keys to values, got {data!r}.")
    data = dict(data)
    if isinstance(data.get("model"), str):
        data["model"] = {"name": data["model"]}
    method = data.pop("method", DEFAULT_METHOD)
    if isinstance(method, str):
        method = {"name": method}
    if isinstance(method, dict) and "name" not in method:  # settings of the default method
        method = {"name": DEFAULT_METHOD, **method}  # (``method.rank=8`` with no method section)
    if not isinstance(method, dict) or not isinstance(method["name"], str):
        raise ConfigError("method: give a method name (e.g. 'lora') or a mapping with 'name'.")
    method = dict(method)
    name = method.pop("name")
    if name not in method_names():
        raise ConfigError(
            f"method.name: got {name!r}; allowed: {', '.join(method_names())}.{_closest(str(name), method_names())}"
        )
    sections = {
        task: from_dict(settings.section, data.pop(task) or {}, task)
        for task, settings in TASKS.items()
        if settings.section is not None and task in data
    }
    cfg = from_dict(Config, data)
    if cfg.task not in TASKS:
        raise ConfigError(
            f"task: got {cfg.task!r}; allowed: {', '.join(sorted(TASKS))}.{_closest(cfg.task, TASKS)}"
        )
    cfg.method = from_dict(type(method_config(name)), method, "method")
    cfg.sections.update(sections)
    _check_data(cfg.data)
    _check_train(cfg.train)
    check = TASKS[cfg.task].check
    if check is not None:
        check(cfg)
    return cfg


def _top_keys() -> list[str]:
    fields = [f.name for f in dataclasses.fields(Config) if f.name != "sections"]
    return fields + [t for t, s in TASKS.items() if s.section is not None]


def parse_override(item: str) -> tuple[list[str], Any]:
    """``train.lr=1e-4`` -> (["train", "lr"], 0.0001). Values are parsed as YAML scalars."""
    if "=" not in item:
        raise ConfigError(
            f"override '{_shown(item)}': expected dotted.key=value, e.g. train.lr=1e-4."
        )
    key, raw = item.split("=", 1)
    try:
        value = parse_value(raw)
    except yaml.YAMLError as e:
        raise ConfigError(
            f"override '{_shown(item)}': the value is not valid YAML ({_yaml_problem(e)}); "
            f"write a YAML value (a list is [a, b]) or quote a string: {_shown(key)}='\"{_shown(raw)}\"'."
        ) from None
    return key.strip().split("."), value


def parse_value(raw: str) -> Any:
    """A value written on the command line, read as a config file's value is (``3e-4`` is a
    number); empty is None. Raises ``yaml.YAMLError``."""
    return yaml.load(raw, Loader=_Loader) if raw.strip() else None


def _yaml_problem(e: yaml.YAMLError) -> str:
    """The one-line reason of a YAML error (PyYAML's own text spans several lines)."""
    problem = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e)
    return str(problem).splitlines()[0]


def apply_overrides(data: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (shorthand strings for model/method expand to dicts)."""
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if isinstance(child, str) and part in ("model", "method"):
                child = {"name": child}
            if child is None:
                child = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{_shown(item)}': '{_shown(part)}' is not a section.")
            node[part] = child
            node = child
        node[path[-1]] = value
    return data


class _Loader(yaml.SafeLoader):
    """Safe YAML that also reads '1e-4' (no dot) as a float, as people write it. Integers stay
    integers: the int resolver comes first and claims '8' before this one is consulted."""


def _repeated_key(root: yaml.Node | None) -> yaml.constructor.ConstructorError | None:
    """The first key written twice in one mapping of the composed document (plain YAML keeps the
    last without a word), as an error at the second one; merged keys (``<<``) are not the
    mapping's own and may be overridden. Read before construction, which rewrites merges."""
    todo, seen_nodes = [root], set()
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key, value in node.value:
                todo += [key, value]
                if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                    continue
                line = key.start_mark.line + 1
                if (key.tag, key.value) in first:
                    return yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"the key '{key.value}' is given twice in one section (first on line "
                        f"{first[key.tag, key.value]}); keep one",
                        key.start_mark,
                    )
                first[key.tag, key.value] = line
        elif isinstance(node, yaml.SequenceNode):
            todo += node.value
    return None


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$"),
    list("-+0123456789."),
)


def load_config(
    source: str | Path | dict[str, Any] | Config, overrides: typing.Sequence[str] = ()
) -> Config:
    """Load a config from a YAML path, a dict or a Config, then apply dotted overrides."""
    if isinstance(overrides, str):  # one override given bare, not in a list
        overrides = [overrides]
    bad = [o for o in overrides if not isinstance(o, str)]
    if bad:
        raise ConfigError(f"overrides: each is a 'dotted.key=value' string; got {bad[0]!r}.")
    if isinstance(source, Config):  # checked again: its fields may have been set by hand
        source = source.to_dict()
    return config_from_dict(read_config_data(source, overrides))


def read_config_data(
    source: str | Path | dict[str, Any], overrides: typing.Sequence[str] = ()
) -> Any:
    """The plain data of a config (YAML path or dict) with dotted overrides applied, not yet
    validated (cheap: no task or model code is imported)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror}).") from None
        except UnicodeDecodeError:
            from tunesmith.textfiles import bad_utf8

            raise ConfigError(bad_utf8(path) + ".") from None
        except ValueError as e:  # a NUL in the path
            raise ConfigError(f"{str(path)!r}: cannot read the config file ({e}).") from None
        try:
            repeated = _repeated_key(yaml.compose(text, Loader=_Loader))
            if repeated is not None:
                raise repeated
            data = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            if mark is not None:
                line = f":{mark.line + 1}"
            elif isinstance(getattr(e, "position", None), int):  # a ReaderError
                line = f":{text.count(chr(10), 0, e.position) + 1}"
            else:
                line = ""
            problem = _yaml_problem(e)
            context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
            if context and start is not None and mark is not None and start.line != mark.line:
                problem += f"; {context} that starts on line {start.line + 1}"  # an unclosed '{'
            raise ConfigError(f"{path}{line}: not valid YAML ({problem}).") from None
        if data is None:
            raise ConfigError(
                f"{path}: the config file is empty; give at least model and data.train "
                "(the files in configs/ are examples)."
            )
    else:
        data = copy.deepcopy(source)
    return apply_overrides(data, overrides)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
