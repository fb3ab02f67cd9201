"""Record formats and how each renders into segments of text marked as supervised or not.

A rendered example is a list of ``Segment(text_or_ids, supervised)``. Only supervised segments
contribute to the loss (with ``loss_on: completion``); the end-of-sequence / end-of-turn token
belongs to the supervised part, so the model learns to stop.

Formats (``format: auto`` picks by fields):

- ``chat``: ``{"messages": [{"role": ..., "content": ...}, ...]}`` rendered with the chat template;
  every assistant turn (with its end-of-turn marker) is supervised.
- ``sharegpt``: ``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}``, the
  layout of many public chat data sets; loaded as ``chat`` with the roles mapped
  (``SHAREGPT_ROLES``).
- ``prompt_completion``: ``{"prompt": ..., "completion": ...}``; the completion and EOS are supervised.
- ``alpaca``: ``{"instruction", "input" (optional), "output"}`` in the Alpaca prompt layout.
- ``text``: ``{"text": ...}``; everything is supervised (plain language modelling).
- ``labeled``: ``{"text", "text_pair" (optional), "label"}`` for sequence classification; encoded
  by ``tunesmith.data.labeled`` (the tokenizer's own pair layout), not rendered into segments.
- ``prompt``: ``{"prompt": ...}`` alone (a string or a list of chat messages): prompts for online
  RL, which samples its own responses (nothing to supervise, so no other task trains on it).
- ``preference``: ``{"prompt", "chosen", "rejected"}`` (strings, or lists of chat messages), or the
  implicit form where ``chosen`` and ``rejected`` are whole conversations sharing a prefix. It
  renders into two examples whose responses (with their end token) are scored; the prompt is not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.data.io import Record
from tunesmith.errors import ConfigError, DataError

# ChatML, as used by Qwen2 and others; the end-of-turn token is <|im_end|>.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Role-prefixed plain text ("User: ...", "Assistant: ..."), the end of an assistant turn marked
# by EOS. Base models read text like this in pretraining, unlike ChatML's new special tokens.
PLAIN = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token + '\n' }}"
    "{% else %}{{ message['role'] | capitalize + ': ' + message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)
TEMPLATES = {"chatml": CHATML, "plain": PLAIN}

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

REQUIRED = {
    "preference": ("chosen", "rejected"),
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
    "labeled": ("text", "label"),
    "prompt": ("prompt",),
}
# Checked in this order by format: auto.
DETECT_ORDER = (
    "preference",
    "chat",
    "sharegpt",
    "prompt_completion",
    "alpaca",
    "labeled",
    "text",
    "prompt",
)

# ShareGPT speaker names (``from``) and the chat role each becomes.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}
# Formats read by converting each record into another format first.
LOADS_AS = {"sharegpt": "chat"}


@dataclass
class Segment:
    content: str | list[int]
    supervised: bool


def fitting_formats(fields: dict[str, Any]) -> list[str]:
    return [f for f in DETECT_ORDER if all(k in fields for k in REQUIRED[f])]


def _describe_formats() -> str:
    return "; ".join(f"{f} needs {' + '.join(repr(k) for k in REQUIRED[f])}" for f in DETECT_ORDER)


def detect_format(record: Record) -> str:
    """The first format whose required fields the record has."""
    fits = fitting_formats(record.fields)
    if not fits:
        raise DataError(
            f"{record.origin}: no known format fits the fields {sorted(record.fields)}. "
            f"Formats: {_describe_formats()}."
        )
    return fits[0]


def check_fields(record: Record, fmt: str) -> None:
    missing = [k for k in REQUIRED[fmt] if k not in record.fields or record.fields[k] is None]
    if missing:
        fits = fitting_formats(record.fields)
        hint = (
            f" Formats that fit its fields: {', '.join(fits)}."
            if fits
            else f" Formats: {_describe_formats()}."
        )
        raise DataError(
            f"{record.origin}: missing field {', '.join(repr(m) for m in missing)} for format '{fmt}' "
            f"(fields present: {sorted(record.fields)}).{hint}"
        )


def sharegpt_to_chat(record: Record) -> Record:
    """A ShareGPT record (``conversations`` of ``{from, value}``) as a chat record (``messages``).

    Turns may also be written ``{role, content}``; speaker names map by ``SHAREGPT_ROLES``.
    """
    check_fields(record, "sharegpt")
    turns = record.fields["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError(
            f"{record.origin}: 'conversations' must be a non-empty list of {{from, value}} turns."
        )
    messages = []
    for i, turn in enumerate(turns):
        keys = (
            ("from", "value") if isinstance(turn, dict) and "from" in turn else ("role", "content")
        )
        if not isinstance(turn, dict) or any(k not in turn for k in keys):
            raise DataError(f"{record.origin}: conversations[{i}] needs 'from' and 'value'.")
        speaker, value = turn[keys[0]], turn[keys[1]]
        role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise DataError(
                f"{record.origin}: conversations[{i}] has role {speaker!r}; allowed: "
                f"{', '.join(SHAREGPT_ROLES)} (mapped to user, assistant or system)."
            )
        if not isinstance(value, str):
            raise DataError(
                f"{record.origin}: conversations[{i}].value must be a string, got {type(value).__name__}."
            )
        messages.append({"role": role, "content": value})
    fields = {k: v for k, v in record.fields.items() if k != "conversations"}
    return Record({**fields, "messages": messages}, record.origin)


def check_messages(record: Record, messages: Any, key: str) -> list[dict]:
    """``messages`` if it is a non-empty list of ``{role, content}`` with string values."""
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f"{record.origin}: '{key}' must be a non-empty list of {{role, content}} objects."
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{record.origin}: {key}[{i}] needs 'role' and 'content'.")
        for part in ("role", "content"):
            if not isinstance(m[part], str):
                raise DataError(
                    f"{record.origin}: {key}[{i}].{part} must be a string, got {type(m[part]).__name__}."
                )
    return messages


def resolve_template(template: str | None, tokenizer: Any) -> str | None:
    """The chat template to use: a named built-in, a .jinja file, or the tokenizer's own."""
    if template is None:
        return getattr(tokenizer, "chat_template", None)
    if template in TEMPLATES:
        return TEMPLATES[template]
    path = Path(template).expanduser()
    if path.suffix == ".jinja" or path.exists():
        try:
            return path.read_text(encoding="utf-8-sig")
        except OSError as e:
            raise ConfigError(f"data.template: cannot read {path} ({e.strerror}).") from None
        except UnicodeDecodeError:
            from tunesmith.textfiles import bad_utf8

            raise ConfigError(f"data.template: {bad_utf8(path)}.") from None
    raise ConfigError(
        f"data.template: got {template!r}; give one of {', '.join(TEMPLATES)}, a .jinja file, or null."
    )


def _text(record: Record, key: str) -> str:
    value = record.fields[key]
    if not isinstance(value, str):
        raise DataError(
            f"{record.origin}: field '{key}' must be a string, got {type(value).__name__}."
        )
    return value


def _render_chat(
    record: Record,
    messages: Any,
    tokenizer: Any,
    template: str | None,
    loss_on_all: bool,
    key: str = "messages",
) -> list[Segment]:
    check_messages(record, messages, key)
    if template is None:
        raise ConfigError(
            "data.template: the tokenizer has no chat template, so chat data cannot be rendered; "
            "set data.template=chatml (or a .jinja file)."
        )

    def render(msgs: list[dict], gen: bool) -> str:
        return tokenizer.apply_chat_template(
            msgs, chat_template=template, tokenize=False, add_generation_prompt=gen
        )

    if loss_on_all:
        return [Segment(render(messages, False), True)]
    if messages[0]["role"] == "assistant":
        raise DataError(
            f"{record.origin}: the conversation starts with an assistant turn, so there is no prompt "
            "for it to answer; start with a user (or system) turn, or set data.loss_on=all."
        )
    segments: list[Segment] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(messages[:i], True)
        full = render(messages[: i + 1], False)
        if not (prefix.startswith(done) and full.startswith(prefix)):
            raise DataError(
                f"{record.origin}: the chat template does not render conversations prefix by prefix, "
                "so assistant turns cannot be located; set data.template=chatml or data.loss_on=all."
            )
        segments.append(Segment(prefix[len(done) :], False))
        segments.append(Segment(full[len(prefix) :], True))
        done = full
    tail = render(messages, False)[len(done) :]
    if tail:
        segments.append(Segment(tail, False))
    return segments


def render(
    record: Record, fmt: str, tokenizer: Any, template: str | None, loss_on_all: bool
) -> list[Segment]:
    """Segments of one record; the caller tokenises them and builds the labels."""
    check_fields(record, fmt)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    f = record.fields
    if fmt == "chat":
        return _render_chat(record, f["messages"], tokenizer, template, loss_on_all)
    if fmt == "text":
        return [Segment(_text(record, "text"), True), Segment(eos, True)]
    if fmt == "prompt_completion":
        if isinstance(f["prompt"], list) and isinstance(f["completion"], list):
            # Conversational prompt/completion: both are lists of messages.
            check_messages(record, f["prompt"], "prompt")
            check_messages(record, f["completion"], "completion")
            return _render_chat(
                record, f["prompt"] + f["completion"], tokenizer, template, loss_on_all
            )
        prompt, completion = _text(record, "prompt"), _text(record, "completion")
    else:  # alpaca
        inp = _alpaca_input(record)
        layout = ALPACA_WITH_INPUT if inp else ALPACA_NO_INPUT
        prompt = layout.format(instruction=_text(record, "instruction"), input=inp)
        completion = _text(record, "output")
    return [Segment(prompt, loss_on_all), Segment(completion, True), Segment(eos, True)]


def _alpaca_input(record: Record) -> str:
    inp = record.fields.get("input")
    if inp is None:
        return ""
    if not isinstance(inp, str):
        raise DataError(
            f"{record.origin}: field 'input' must be a string or null, got {type(inp).__name__}."
        )
    return inp


def _conversation(record: Record, key: str) -> list[dict]:
    value = record.fields[key]
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{record.origin}: '{key}' must be a string or a list of {{role, content}} messages."
        )
    return check_messages(record, value, key)


def shared_prefix(chosen: list[dict], rejected: list[dict]) -> int:
    """How many leading messages two conversations share (at least the last one differs)."""
    k = 0
    while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
        k += 1
    return k


def render_response(
    prompt: str | list[dict],
    response: str | list[dict],
    tokenizer: Any,
    template: str | None,
    origin: str = "input",
) -> list[Segment]:
    """Segments of one prompt + response; only the response (and its end token) is scored.

    Strings are concatenated with EOS appended; message lists go through the chat template.
    """
    if isinstance(prompt, str) and isinstance(response, str):
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return [Segment(prompt, False), Segment(response, True), Segment(eos, True)]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(response, str):
        response = [{"role": "assistant", "content": response}]
    if template is None:
        raise ConfigError(
            "data.template: the tokenizer has no chat template, so chat data cannot be rendered; set data.template=chatml (or a .jinja file)."
        )
    head = tokenizer.apply_chat_template(
        prompt, chat_template=template, tokenize=False, add_generation_prompt=True
    )
    full = tokenizer.apply_chat_template(prompt + response, chat_template=template, tokenize=False)
    if not full.startswith(head):
        raise DataError(
            f"{origin}: the chat template does not render the prompt as a prefix of the conversation; set data.template=chatml."
        )
    return [Segment(head, False), Segment(full[len(head) :], True)]


def render_pair(
    record: Record, tokenizer: Any, template: str | None
) -> tuple[list[Segment], list[Segment]]:
    """(chosen segments, rejected segments) of a preference record; only responses are scored."""
    check_fields(record, "preference")
    f = record.fields
    prompt, chosen, rejected = f.get("prompt"), f["chosen"], f["rejected"]
    if not (isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str)):
        chosen, rejected = _conversation(record, "chosen"), _conversation(record, "rejected")
        if isinstance(prompt, list):
            check_messages(record, prompt, "prompt")
        elif prompt is not None and not isinstance(prompt, str):
            raise DataError(
                f"{record.origin}: 'prompt' must be a string, a list of {{role, content}} messages "
                f"or absent, got {type(prompt).__name__}."
            )
        if prompt is None:  # implicit prompt: the conversations' shared prefix
            k = shared_prefix(chosen, rejected)
            if k == 0:
                raise DataError(
                    f"{record.origin}: no 'prompt', and 'chosen' and 'rejected' share no leading messages to use as one."
                )
            prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    return (
        render_response(prompt, chosen, tokenizer, template, record.origin),
        render_response(prompt, rejected, tokenizer, template, record.origin),
    )


def prompt_and_reference(
    record: Record, fmt: str, tokenizer: Any, template: str | None
) -> tuple[str, str]:
    """For generation-based metrics: the rendered prompt and the reference answer text."""
    check_fields(record, fmt)
    f = record.fields
    if fmt == "chat" or (fmt == "prompt_completion" and isinstance(f["prompt"], list)):
        msgs = f["messages"] if fmt == "chat" else f["prompt"] + f["completion"]
        turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        if not turns:
            raise DataError(f"{record.origin}: no assistant turn to use as the reference answer.")
        last = turns[-1]
        prompt = tokenizer.apply_chat_template(
            msgs[:last], chat_template=template, tokenize=False, add_generation_prompt=True
        )
        return prompt, msgs[last]["content"]
    if fmt == "prompt_completion":
        return f["prompt"], f["completion"]
    if fmt == "alpaca":
        inp = _alpaca_input(record)
        layout = ALPACA_WITH_INPUT if inp else ALPACA_NO_INPUT
        return layout.format(instruction=f["instruction"], input=inp), f["output"]
    raise DataError(
        f"{record.origin}: format 'text' has no prompt/answer split for generation metrics."
    )


def prompt_of(
    record: Record, fmt: str, tokenizer: Any, template: str | None
) -> tuple[str, str | list[dict], str | None]:
    """(rendered prompt, prompt as written, reference answer or None) of any prompt-bearing record.

    The rendered prompt is what the policy continues (a conversation through the chat template
    with the generation prompt); the prompt as written goes to reward functions; the reference
    (the completion, the last assistant turn, the chosen response) scores exact match.
    """
    check_fields(record, fmt)
    f = record.fields

    def chat(msgs: Any) -> str:
        if (
            not isinstance(msgs, list)
            or not msgs
            or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs)
        ):
            raise DataError(
                f"{record.origin}: a prompt must be a string or a list of {{role, content}} messages."
            )
        if template is None:
            raise ConfigError(
                "data.template: the tokenizer has no chat template, so chat prompts cannot be rendered; set data.template=chatml (or a .jinja file)."
            )
        return tokenizer.apply_chat_template(
            msgs, chat_template=template, tokenize=False, add_generation_prompt=True
        )

    def text(value: Any) -> str | None:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and value and isinstance(value[-1], dict):
            return value[-1].get("content")
        raise DataError(
            f"{record.origin}: cannot read a reference answer from {type(value).__name__}."
        )

    if fmt == "chat":
        msgs = f["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{record.origin}: 'messages' must be a non-empty list of messages.")
        answers = [
            i for i, m in enumerate(msgs) if isinstance(m, dict) and m.get("role") == "assistant"
        ]
        if answers and answers[-1] == len(msgs) - 1:  # the last assistant turn is the answer
            head = msgs[: answers[-1]]
            return chat(head), head, text(msgs[-1]["content"])
        return chat(msgs), msgs, None
    if fmt == "alpaca":
        inp = f.get("input") or ""
        layout = ALPACA_WITH_INPUT if inp else ALPACA_NO_INPUT
        rendered = layout.format(instruction=_text(record, "instruction"), input=inp)
        return rendered, rendered, _text(record, "output")
    if fmt in ("prompt", "prompt_completion", "preference"):
        prompt = f.get("prompt")
        reference = text(f.get("completion") if fmt == "prompt_completion" else f.get("chosen"))
        if prompt is None and fmt == "preference":  # implicit prompt: the shared prefix
            raise DataError(
                f"{record.origin}: a preference row without 'prompt' cannot give a prompt for RL; add the 'prompt' field."
            )
        if isinstance(prompt, str):
            if not prompt:
                raise DataError(f"{record.origin}: an empty prompt has nothing to condition on.")
            return prompt, prompt, reference
        return chat(prompt), prompt, reference
    raise DataError(f"{record.origin}: format '{fmt}' has no prompt to answer.")


def _blank(value: Any) -> bool:
    return isinstance(value, str) and not value.strip()


def _empty_turn(messages: list[dict], key: str, start: int = 0) -> str | None:
    for i, m in enumerate(messages[start:], start):
        if m["role"] == "assistant" and _blank(m["content"]):
            return f"assistant turn {key}[{i}]"
    return None


def empty_completion(record: Record, fmt: str) -> str | None:
    """What is empty (only whitespace) among the trained parts of a rendered record, or None.

    Such an example trains only its end token: the model learns to answer nothing. Call it after
    ``render`` / ``render_pair`` accepted the record, so the fields have their expected types.
    """
    f = record.fields
    if fmt == "chat":
        return _empty_turn(f["messages"], "messages")
    if fmt == "text":
        return "'text'" if _blank(f["text"]) else None
    if fmt == "alpaca":
        return "'output'" if _blank(f["output"]) else None
    if fmt == "prompt_completion":
        if isinstance(f["completion"], list):
            return _empty_turn(f["completion"], "completion")
        return "'completion'" if _blank(f["completion"]) else None
    if fmt == "preference":
        chosen, rejected = f["chosen"], f["rejected"]
        if isinstance(chosen, list) and isinstance(rejected, list) and f.get("prompt") is None:
            k = shared_prefix(chosen, rejected)
            return _empty_turn(chosen, "chosen", k) or _empty_turn(rejected, "rejected", k)
        for key, side in (("chosen", chosen), ("rejected", rejected)):
            if _blank(side):
                return f"'{key}'"
            if isinstance(side, list) and _empty_turn(side, key):
                return _empty_turn(side, key)
    return None
