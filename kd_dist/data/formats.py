"""Dataset formats: detect the layout from the column names and render a row as (prompt, response).

Every supported layout is one row of ``FORMATS``. Adding a layout with the same roles (another pair
of column names) is one new table row.

Text, instruction and seq2seq rows render to a ``(prompt, response)`` pair of strings, for both
task types:

* causal: the model reads ``prompt + response`` and is trained on the response only;
* seq2seq: the prompt is the encoder source and the response the decoder target.

Chat rows (a column of message lists) need the tokenizer's chat template, so they are rendered by
``kd_dist.data.chat`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import datasets

from kd_dist.config import ConfigError, TrainConfig

TEXT, INSTRUCTION, CHAT, SEQ2SEQ = "text", "instruction", "chat", "seq2seq"
KINDS = (TEXT, INSTRUCTION, CHAT, SEQ2SEQ)

# The plain instruction template (Alpaca style, without the preamble). The Input block is left out
# when the example has no context/input, so short instructions don't carry an empty section.
PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"

# In a causal model a seq2seq pair becomes prompt = source + this separator, response = target.
SEQ2SEQ_CAUSAL_SEPARATOR = "\n"

# Flags that name the one column of a single-column layout, and the kind they imply.
SINGLE_COLUMN_FLAGS = {"text_column": TEXT, "messages_column": CHAT}

FLAGS_HINT = (
    "Set --dataset_format (text, instruction, chat or seq2seq) and name the columns with "
    "--text_column, --messages_column, or --prompt_column and --response_column."
)


@dataclass(frozen=True)
class FormatSpec:
    """One dataset layout: its kind and which column plays which role.

    ``prompt`` holds the instruction (instruction kind) or the source (seq2seq kind); ``response``
    holds the response or the target; ``context`` is an optional extra input (Dolly's ``context``,
    Alpaca's ``input``); ``text`` is the single column of plain-text data; ``messages`` is the
    column of conversations in chat data.
    """

    name: str
    kind: str
    text: str | None = None
    prompt: str | None = None
    response: str | None = None
    context: str | None = None
    messages: str | None = None
    # Instruction kind only: wrap the prompt in the instruction template. Off for prompt/completion
    # data, whose prompt column already holds the exact text the model should see.
    template: bool = True

    @property
    def required(self) -> tuple[str, ...]:
        """Columns that must exist for this layout (``context`` is optional)."""
        columns = (self.text, self.messages, self.prompt, self.response)
        return tuple(c for c in columns if c is not None)


# Auto-detection takes the first row whose required columns all exist, so the order matters: a
# column of conversations is unambiguous and comes first (ultrachat_200k also has a `prompt`
# column); structured layouts come before plain text (a dataset with `instruction`/`output` and a
# pre-rendered `text` column should be masked by prompt), and Alpaca comes before the
# `input`/`output` pair so that `input` is only read as a seq2seq source when there is no
# `instruction` column.
FORMATS: tuple[FormatSpec, ...] = (
    FormatSpec("messages", CHAT, messages="messages"),
    FormatSpec("sharegpt", CHAT, messages="conversations"),
    FormatSpec("dolly", INSTRUCTION, prompt="instruction", response="response", context="context"),
    FormatSpec("alpaca", INSTRUCTION, prompt="instruction", response="output", context="input"),
    FormatSpec(
        "prompt_completion", INSTRUCTION, prompt="prompt", response="completion", template=False
    ),
    FormatSpec("question_answer", INSTRUCTION, prompt="question", response="answer"),
    FormatSpec("source_target", SEQ2SEQ, prompt="source", response="target"),
    FormatSpec("article_highlights", SEQ2SEQ, prompt="article", response="highlights"),
    FormatSpec("document_summary", SEQ2SEQ, prompt="document", response="summary"),
    FormatSpec("input_output", SEQ2SEQ, prompt="input", response="output"),
    FormatSpec("text", TEXT, text="text"),
    FormatSpec("content", TEXT, text="content"),
)


def detect_format(columns: Sequence[str], kinds: Sequence[str] = KINDS) -> FormatSpec | None:
    """The first layout of one of ``kinds`` whose required columns are all present, else None."""
    present = set(columns)
    for spec in FORMATS:
        if spec.kind in kinds and set(spec.required) <= present:
            return spec
    return None


def resolve_format(columns: Sequence[str], cfg: TrainConfig) -> FormatSpec:
    """The layout to use: detected from ``columns``, overridden by the format and column flags."""
    _check_named_columns(columns, cfg)
    kinds = KINDS if cfg.dataset_format == "auto" else (cfg.dataset_format,)

    single_column = [
        (flag, kind) for flag, kind in SINGLE_COLUMN_FLAGS.items() if getattr(cfg, flag)
    ]
    if len(single_column) + bool(cfg.prompt_column or cfg.response_column) > 1:
        raise ConfigError(
            "--text_column (plain text), --messages_column (chat) and --prompt_column/"
            "--response_column (pairs) describe different formats: set only one of them."
        )
    if single_column:
        flag, kind = single_column[0]
        if kind not in kinds:
            raise ConfigError(
                f"--{flag} applies to {kind} data, not --dataset_format {cfg.dataset_format}; "
                "use --prompt_column and --response_column for instruction or seq2seq pairs."
            )
        role = "text" if kind == TEXT else "messages"
        return FormatSpec(f"custom_{kind}", kind, **{role: getattr(cfg, flag)})

    detected = detect_format(columns, kinds)
    if cfg.prompt_column or cfg.response_column:
        return _with_named_columns(detected, kinds, columns, cfg)
    if detected is None:
        raise ConfigError(_unknown_format_message(columns, cfg))
    return detected


def _with_named_columns(
    detected: FormatSpec | None, kinds: Sequence[str], columns: Sequence[str], cfg: TrainConfig
) -> FormatSpec:
    """Override the prompt/response columns of the detected layout (or of a blank one)."""
    if detected is None or detected.kind in SINGLE_COLUMN_FLAGS.values():
        # No pair layout detected: the named columns define the layout. Without a format
        # flag, prompt/response columns are most likely instruction data.
        kind = INSTRUCTION if cfg.dataset_format == "auto" else kinds[0]
        if kind in SINGLE_COLUMN_FLAGS.values():
            raise ConfigError(
                "--prompt_column/--response_column need --dataset_format instruction or seq2seq; "
                "plain-text data uses --text_column, chat data --messages_column."
            )
        detected = FormatSpec(f"custom_{kind}", kind)
    spec = replace(
        detected,
        prompt=cfg.prompt_column or detected.prompt,
        response=cfg.response_column or detected.response,
    )
    if spec.prompt is None or spec.response is None:
        role = "response" if spec.prompt else "prompt"
        flag = f"--{role}_column"
        raise ConfigError(
            f"Could not tell which column holds the {role}: set {flag} too. "
            f"Columns found: {', '.join(columns)}."
        )
    return spec


def _check_named_columns(columns: Sequence[str], cfg: TrainConfig) -> None:
    for flag in (*SINGLE_COLUMN_FLAGS, "prompt_column", "response_column"):
        name = getattr(cfg, flag)
        if name and name not in columns:
            raise ConfigError(
                f"--{flag} {name!r} is not a column of the dataset. "
                f"Columns found: {', '.join(columns)}."
            )


def _unknown_format_message(columns: Sequence[str], cfg: TrainConfig) -> str:
    what = "a known" if cfg.dataset_format == "auto" else f"a {cfg.dataset_format}"
    known = "; ".join(f"{spec.name}: {'/'.join(spec.required)}" for spec in FORMATS)
    return (
        f"Could not find {what} dataset layout in columns: {', '.join(columns)}. "
        f"Known layouts ({known}). {FLAGS_HINT}"
    )


def as_conversational(spec: FormatSpec, features: datasets.Features) -> FormatSpec:
    """A prompt/response layout whose prompt column holds lists of messages is chat data (TRL's
    conversational prompt/completion): render it with the chat template, not as text."""
    if spec.kind == CHAT or spec.prompt is None:
        return spec
    list_types = (datasets.List, datasets.LargeList, datasets.Sequence)
    if not isinstance(features.get(spec.prompt), list_types):
        return spec
    return replace(spec, name=f"{spec.name}_conversational", kind=CHAT, context=None)


def check_compatible(spec: FormatSpec, cfg: TrainConfig) -> None:
    """Plain text has no target, so it can't train an encoder-decoder model."""
    if cfg.task_type == SEQ2SEQ and spec.kind == TEXT:
        raise ConfigError(
            f"--task_type seq2seq needs (source, target) pairs, but the dataset is plain text "
            f"(column {spec.text!r}): there is nothing to use as the target. Use instruction, "
            "chat or seq2seq data (e.g. source/target, document/summary, instruction/response "
            "columns), or distil into a causal student with --task_type causal."
        )


def _cell(row: Mapping[str, Any], column: str | None) -> str:
    """A cell as a string; missing and null cells are empty (csv/json rows can have gaps)."""
    value = row.get(column) if column is not None else None
    return "" if value is None else str(value)


def render_prompt(instruction: str, context: str) -> str:
    """The instruction template, with the Input block only when there is a context."""
    if context.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, context=context)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def render(row: Mapping[str, Any], spec: FormatSpec, task_type: str) -> tuple[str, str] | None:
    """``(prompt, response)`` for one row, or None when a required part is blank.

    For causal text data the prompt is empty and the whole text is the response.
    """
    if spec.kind == TEXT:
        text = _cell(row, spec.text)
        return ("", text) if text.strip() else None

    prompt, response = _cell(row, spec.prompt), _cell(row, spec.response)
    if not prompt.strip() or not response.strip():
        return None
    if spec.kind == INSTRUCTION and spec.template:
        prompt = render_prompt(prompt, _cell(row, spec.context))
    elif spec.kind == SEQ2SEQ and task_type == "causal":
        prompt = prompt + SEQ2SEQ_CAUSAL_SEPARATOR
    return prompt, response
