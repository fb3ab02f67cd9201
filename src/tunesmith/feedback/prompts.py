"""Prompts for human feedback, read from any prompt-bearing data source tunesmith reads.

A prompt is kept in the form the preference records will hold (``prompt`` of ``task: dpo`` /
``task: reward``), so the pairs people judge train on exactly the text the model continued:

- chat records (``messages``, or conversational ``prompt``/``completion``): the conversation up
  to its last assistant turn (all of it when it ends on a user turn), a list of messages that
  training renders with the chat template;
- ``prompt``/``completion`` with a string prompt, and ``alpaca``: the rendered prompt string
  (``prompt_and_reference``), which training concatenates with the response as generation did;
- records with only a ``prompt`` (or preference records): a string prompt becomes one user
  message when the model has a chat template (as ``tunesmith generate`` does), else stays text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tunesmith.data.formats import fitting_formats, prompt_and_reference, sharegpt_to_chat
from tunesmith.data.io import Record, read_records
from tunesmith.errors import DataError

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Prompt:
    """One prompt: ``value`` is what records store as ``prompt`` (text or chat messages)."""

    value: str | Messages

    @property
    def key(self) -> str:
        """A stable text form (for identities and de-duplication)."""
        return json.dumps(self.value, sort_keys=True, ensure_ascii=False)

    def shown(self) -> Messages:
        """The conversation as the page shows it (a text prompt is one block)."""
        if isinstance(self.value, str):
            return [{"role": "prompt", "content": self.value}]
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in self.value]

    def render(self, tokenizer: Any, template: str | None) -> str:
        """The text the model continues: messages through the chat template, text as is."""
        if isinstance(self.value, str):
            return self.value
        if template is None:
            raise DataError(
                "the model's tokenizer has no chat template, so chat prompts cannot be rendered; "
                "give prompts as plain text ({'prompt': ...}) or a model with a chat template."
            )
        return tokenizer.apply_chat_template(
            self.value, chat_template=template, tokenize=False, add_generation_prompt=True
        )


def _messages(record: Record, value: Any, key: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise DataError(f"{record.origin}: '{key}' must be a non-empty list of messages.")
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m):
            raise DataError(f"{record.origin}: {key}[{i}] needs 'role' and 'content'.")
    return value


def _before_last_answer(record: Record, msgs: Messages) -> Messages:
    """A conversation ending on an assistant turn prompts for that turn; else it all is the prompt."""
    if msgs[-1]["role"] != "assistant":
        return msgs
    if len(msgs) == 1:
        raise DataError(
            f"{record.origin}: the conversation is one assistant turn; nothing to prompt."
        )
    return msgs[:-1]


def prompt_of(record: Record, tokenizer: Any, template: str | None, raw: bool = False) -> Prompt:
    """The prompt of one record (see the module docstring for each format)."""
    f = record.fields
    fits = [x for x in fitting_formats(f) if x != "text"]
    if "sharegpt" in fits and "chat" not in fits:  # ShareGPT prompts as the chat it loads as
        record = sharegpt_to_chat(record)
        f, fits = record.fields, ["chat"]
    if "messages" in f and "chat" in fits:
        return Prompt(_before_last_answer(record, _messages(record, f["messages"], "messages")))
    if "prompt_completion" in fits and isinstance(f["prompt"], list):
        return Prompt(_messages(record, f["prompt"], "prompt"))
    if fits and fits[0] in ("prompt_completion", "alpaca"):
        text, _ = prompt_and_reference(record, fits[0], tokenizer, template)
        return Prompt(text)
    prompt = f.get("prompt")
    if isinstance(prompt, list):
        return Prompt(_messages(record, prompt, "prompt"))
    if isinstance(prompt, str) and prompt.strip():
        if raw or template is None:
            return Prompt(prompt)
        return Prompt([{"role": "user", "content": prompt}])
    raise DataError(
        f"{record.origin}: no prompt in fields {sorted(f)}; give 'prompt' (text or messages), "
        "chat 'messages', prompt/completion or alpaca records."
    )


def load_prompts(
    source: str,
    tokenizer: Any,
    template: str | None,
    raw: bool = False,
    limit: int | None = None,
) -> list[Prompt]:
    """The distinct prompts of a data source, in order (the first ``limit`` when given)."""
    records, _ = read_records(source)
    seen: set[str] = set()
    out: list[Prompt] = []
    for record in records:
        p = prompt_of(record, tokenizer, template, raw)
        if p.key not in seen:
            seen.add(p.key)
            out.append(p)
        if limit and len(out) >= limit:
            break
    return out
