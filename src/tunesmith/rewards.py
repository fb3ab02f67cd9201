"""Reward sources for online RL (``task: ppo`` / ``task: grpo``), all behind one protocol:

    reward(prompts, completions, records=None) -> list[float]    # one number per completion

``prompts`` are the records' prompts as written in the data (a string, or a list of chat
messages), ``completions`` the decoded responses, ``records`` the records' fields (optional, for
functions that need a reference answer). A source is named in the config by one string:

* ``"my_module:score"``: a Python function ``score(prompts, completions)`` (it also gets
  ``records=`` if it has a parameter of that name or ``**kwargs``), imported from that module only;
* ``"builtin:arith"``: a built-in task's reward (``tunesmith.builtin.tasks.arith_reward``);
* a run folder of ``task: reward`` (any method), or a folder with a
  ``*ForSequenceClassification`` model: the reward model's score of prompt + completion, rendered
  exactly as its training pairs were (``render_response``).

Every value is checked: a source that raises, returns the wrong number of values, a non-number,
NaN or infinity stops the run with one line naming the source and what it returned
(``RewardError``).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import numbers
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from tunesmith.errors import TunesmithError

Prompt = str | list[dict]


@contextlib.contextmanager
def _current_folder_on_path() -> Iterator[None]:
    """The folder the command runs from on ``sys.path`` while a reward module is imported (the
    installed ``tunesmith`` script, unlike ``python -m``, does not put it there)."""
    here = os.getcwd()
    added = here not in sys.path
    if added:
        sys.path.append(here)
    try:
        yield
    finally:
        if added:
            sys.path.remove(here)


class RewardError(TunesmithError):
    """A reward source failed or returned something that is not one finite number per completion."""


class RewardSource(Protocol):
    name: str

    def __call__(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[str],
        records: Sequence[dict] | None = None,
    ) -> list[float]: ...


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def checked_rewards(name: str, values: Any, n: int) -> list[float]:
    """``values`` as n finite floats, or a one-line ``RewardError`` naming ``name`` and the value."""
    if isinstance(values, (torch.Tensor,)) or type(values).__module__ == "numpy":
        values = values.tolist() if getattr(values, "ndim", 1) == 1 else values
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise RewardError(
            f"reward {name} returned {_short(values)} ({type(values).__name__}); it must return a list of {n} numbers, one per completion."
        )
    if len(values) != n:
        raise RewardError(
            f"reward {name} returned {len(values)} values for {n} completions; it must return one number per completion."
        )
    out = []
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if not isinstance(v, numbers.Real):
            raise RewardError(
                f"reward {name} returned {_short(v)} ({type(v).__name__}) for completion {i}; each reward must be a number."
            )
        if not math.isfinite(float(v)):
            raise RewardError(
                f"reward {name} returned {v} for completion {i}; each reward must be a finite number."
            )
        out.append(float(v))
    return out


def _call(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except TunesmithError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RewardError(
            f"reward {name} raised {type(e).__name__}{': ' + first if first else ''}"
        ) from e


class FunctionReward:
    """``module:function``, called once per batch with all prompts and completions."""

    def __init__(self, spec: str) -> None:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise RewardError(f"reward {spec}: give a function as 'module:function'.")
        try:
            with _current_folder_on_path():  # a module beside the config, as `python -m` finds it
                module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name and not module_name.startswith(f"{e.name}."):
                raise RewardError(  # the module is there; something it imports is not
                    f"reward {spec}: importing '{module_name}' failed: {e}."
                ) from None
            raise RewardError(
                f"reward {spec}: cannot import module '{module_name}' ({e}); put {module_name.split('.')[0]}.py "
                "in the folder you run from, or its folder on PYTHONPATH."
            ) from None
        except Exception as e:  # the module itself raised while it was imported
            raise RewardError(
                f"reward {spec}: importing '{module_name}' raised {type(e).__name__}: {e}"
            ) from None
        fn = getattr(module, attr, None)
        if not callable(fn):
            raise RewardError(f"reward {spec}: module '{module_name}' has no function '{attr}'.")
        self.name, self.fn = spec, fn
        params = inspect.signature(fn).parameters.values()
        self.takes_records = any(
            p.name == "records" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params
        )

    def __call__(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[str],
        records: Sequence[dict] | None = None,
    ) -> list[float]:
        kwargs = {"records": records} if self.takes_records else {}
        values = _call(self.name, self.fn, list(prompts), list(completions), **kwargs)
        return checked_rewards(self.name, values, len(completions))


def prompt_text(prompt: Prompt) -> str:
    """The text of a prompt: the string itself, or the last user message of a conversation."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    if not users:
        raise RewardError(f"prompt {_short(prompt)} has no user message.")
    return users[-1]


def _builtin_rewards() -> dict[str, Callable[[str, str], float]]:
    from tunesmith.builtin.tasks import arith_reward

    return {"arith": arith_reward}


class BuiltinReward:
    """``builtin:NAME``: a built-in task's per-completion reward ``f(prompt, completion)``.

    ``builtin:arith`` reads the question from the prompt (``What is A plus B?``), so it needs no
    reference answer from the record.
    """

    def __init__(self, spec: str) -> None:
        table = _builtin_rewards()
        task = spec.split(":", 1)[1]
        if task not in table:
            raise RewardError(
                f"reward {spec}: no such built-in reward; available: "
                + ", ".join(f"builtin:{k}" for k in table)
                + "."
            )
        self.name, self.fn = spec, table[task]

    def __call__(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[str],
        records: Sequence[dict] | None = None,
    ) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        values = [
            _call(self.name, self.fn, prompt_text(p), c) for p, c in zip(prompts, completions)
        ]
        return checked_rewards(self.name, values, len(completions))


class RewardModel:
    """The scalar reward of a trained reward model (a ``task: reward`` run folder, any method, or
    a ``*ForSequenceClassification`` model folder).

    prompt + completion are rendered as the reward model's training pairs were: a string prompt
    and completion are concatenated with EOS appended, a conversation goes through the run's chat
    template (saved with its tokenizer), and the score is read at the last token.
    """

    def __init__(
        self, path: str | Path, device: torch.device | None = None, batch_size: int = 16
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from tunesmith.models import is_run_dir, load_for_inference

        path = str(path)
        device = device or torch.device("cpu")
        if is_run_dir(path):
            model, tok, _ = load_for_inference(path, device)
        elif (Path(path) / "config.json").exists():
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        else:
            raise RewardError(f"reward {path}: neither a reward run folder nor a model folder.")
        if not hasattr(model, "score") or getattr(model.config, "num_labels", None) != 1:
            raise RewardError(
                f"reward {path}: not a reward model (no scalar head with one output)."
            )
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        for p in model.parameters():
            p.requires_grad_(False)
        self.name, self.model, self.tokenizer = path, model, tok
        self.device, self.batch_size = device, batch_size

    def encode(self, prompt: Prompt, completion: str) -> list[int]:
        """Token ids of one prompt + completion, as in reward training (no BOS for pairs)."""
        from tunesmith.data.formats import render_response
        from tunesmith.data.tokenize import tokenize_segments

        segments = render_response(
            prompt, completion, self.tokenizer, self.tokenizer.chat_template, self.name
        )
        ex, _ = tokenize_segments(segments, self.tokenizer, self.name, 1 << 30, "truncate", False)
        return ex.input_ids.tolist()

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[str],
        records: Sequence[dict] | None = None,
    ) -> list[float]:
        rows = [self.encode(p, c) for p, c in zip(prompts, completions, strict=True)]
        out: list[float] = []
        pad = self.tokenizer.pad_token_id
        for k in range(0, len(rows), self.batch_size):
            chunk = rows[k : k + self.batch_size]
            width = max(len(r) for r in chunk)
            # Right padding: the classification head reads the last non-pad token, which is the
            # rule reward training used.
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for b, r in enumerate(chunk):
                ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), 1
            logits = self.model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
            ).logits  # (b, 1)
            out.extend(logits[:, 0].float().tolist())
        return checked_rewards(self.name, out, len(completions))


def load_reward(spec: str, device: torch.device | None = None) -> RewardSource:
    """The reward source a config string names (see the module docstring)."""
    if spec.startswith("builtin:"):
        return BuiltinReward(spec)
    if Path(spec).expanduser().exists():
        return RewardModel(Path(spec).expanduser(), device)
    if ":" in spec and not spec.startswith((".", "/", "~")):
        return FunctionReward(spec)
    raise RewardError(
        f"reward {spec}: not a folder, 'builtin:NAME' or 'module:function'; give a reward run folder, "
        "a built-in reward (builtin:arith) or a Python function."
    )


def missing_end_penalty(scores: list[float], ended: Sequence[bool], penalty: float) -> list[float]:
    """Scores with ``penalty`` subtracted from each response that never produced an end token
    (it was cut at max_new_tokens), so the policy learns to finish its answers."""
    return [s - penalty * (not e) for s, e in zip(scores, ended, strict=True)]
