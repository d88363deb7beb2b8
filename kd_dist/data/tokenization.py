"""Turn rendered (prompt, response) pairs into token ids and labels.

(The module is not called ``tokenize`` so that it can never shadow the standard-library module.)

Causal examples are ``prompt + response + eos`` with the prompt positions of ``labels`` set to
``IGNORE_INDEX``; seq2seq examples keep the source as ``input_ids`` and the target as ``labels``.
Labels are not shifted: the loss does that. Every example also carries a status (kept, empty, no
trainable label) and a truncation flag so that the dropped and truncated examples can be counted
after the (possibly multi-process) ``datasets.map``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from datasets import Dataset, Features, List, Value

from kd_dist.config import TrainConfig
from kd_dist.data.formats import FormatSpec, render
from kd_dist.losses import IGNORE_INDEX

# Label value ignored by the cross-entropy and distillation losses.

OK, EMPTY, NO_LABELS = "ok", "empty", "no_labels"
STATUS, TRUNCATED = "_status", "_truncated"

# Explicit output types: a batch of only empty examples would otherwise infer a null list type.
FEATURES = Features(
    {
        "input_ids": List(Value("int32")),
        "attention_mask": List(Value("int32")),
        "labels": List(Value("int32")),
        STATUS: Value("string"),
        TRUNCATED: Value("bool"),
    }
)


def _example(
    input_ids: list[int],
    labels: list[int],
    truncated: bool,
    status: str | None = None,
    attention_mask: list[int] | None = None,
) -> dict[str, Any]:
    if status is None:
        status = OK if any(label != IGNORE_INDEX for label in labels) else NO_LABELS
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask if attention_mask is not None else [1] * len(input_ids),
        "labels": labels,
        STATUS: status,
        TRUNCATED: truncated,
    }


EMPTY_EXAMPLE = _example([], [], False, status=EMPTY)


def causal_example(
    prompt_ids: list[int],
    response_ids: list[int],
    eos_id: int | None,
    max_length: int,
    train_on_prompt: bool,
) -> dict[str, Any]:
    """``prompt + response + eos``, labels masked over the prompt, cut to ``max_length``.

    Truncation keeps the start (the prompt and the beginning of the response); an example whose
    response is cut away entirely has no trainable label and is dropped later.
    """
    input_ids = prompt_ids + response_ids + ([eos_id] if eos_id is not None else [])
    labels = list(input_ids)
    if not train_on_prompt:
        labels[: len(prompt_ids)] = [IGNORE_INDEX] * len(prompt_ids)
    truncated = len(input_ids) > max_length
    return _example(input_ids[:max_length], labels[:max_length], truncated)


def truncate(ids: list[int], limit: int, eos_id: int | None) -> tuple[list[int], bool]:
    """Keep the first ``limit`` ids; a final eos stays final, as tokenizer truncation does."""
    if len(ids) <= limit:
        return ids, False
    if eos_id is not None and ids and ids[-1] == eos_id:
        return [*ids[: limit - 1], eos_id], True
    return ids[:limit], True


def seq2seq_example(
    source_ids: list[int],
    target_ids: list[int],
    eos_id: int | None,
    append_eos: bool,
    max_length: int,
    max_target_length: int,
) -> dict[str, Any]:
    """Source as ``input_ids``, target as ``labels`` (eos-terminated), each cut to its limit."""
    if append_eos and eos_id is not None:
        target_ids = [*target_ids, eos_id]
    source_ids, source_cut = truncate(source_ids, max_length, eos_id)
    target_ids, target_cut = truncate(target_ids, max_target_length, eos_id)
    return _example(source_ids, target_ids, source_cut or target_cut)


def tokenizer_adds_eos(tokenizer: Any) -> bool:
    """Whether ``tokenizer(text)`` already ends with eos (T5, BART) or eos must be appended."""
    if tokenizer.eos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[-1] == tokenizer.eos_token_id


def encode_batch(
    batch: dict[str, list[Any]],
    *,
    spec: FormatSpec,
    task_type: str,
    tokenizer: Any,
    max_length: int,
    max_target_length: int,
    train_on_prompt: bool,
    append_eos: bool,
) -> dict[str, list[Any]]:
    """The ``datasets.map`` function (batched, so the fast tokenizer works on whole batches)."""
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    pairs = [render(row, spec, task_type) for row in rows]
    prompts = [pair[0] if pair else "" for pair in pairs]
    responses = [pair[1] if pair else "" for pair in pairs]
    eos_id = tokenizer.eos_token_id

    if task_type == "causal":
        # Prompt and response are tokenized separately so the mask boundary is exact; the
        # prompt gets the tokenizer's special tokens (e.g. a leading bos), the response none.
        prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
        response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
        examples = [
            causal_example(p, r, eos_id, max_length, train_on_prompt) if pair else EMPTY_EXAMPLE
            for pair, p, r in zip(pairs, prompt_ids, response_ids, strict=True)
        ]
    elif task_type == "seq2seq":
        source_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
        target_ids = tokenizer(responses, add_special_tokens=True)["input_ids"]
        examples = [
            seq2seq_example(s, t, eos_id, append_eos, max_length, max_target_length)
            if pair
            else EMPTY_EXAMPLE
            for pair, s, t in zip(pairs, source_ids, target_ids, strict=True)
        ]
    else:
        raise ValueError(f"unknown task_type {task_type!r}")
    return {key: [example[key] for example in examples] for key in FEATURES}


def _is_kept(status: str) -> bool:
    return status == OK


def tokenize_split(
    split: Dataset, spec: FormatSpec, tokenizer: Any, cfg: TrainConfig, name: str
) -> tuple[Dataset, dict[str, int]]:
    """Tokenize one split, drop the unusable examples, and count what happened."""
    if len(split) == 0:
        return split, {"examples": 0, "truncated": 0, "dropped_empty": 0, "dropped_no_labels": 0}
    encoded = split.map(
        encode_batch,
        batched=True,
        fn_kwargs=dict(
            spec=spec,
            task_type=cfg.task_type,
            tokenizer=tokenizer,
            max_length=cfg.max_length,
            max_target_length=cfg.max_target_length or cfg.max_length,
            train_on_prompt=cfg.train_on_prompt,
            append_eos=not tokenizer_adds_eos(tokenizer),
        ),
        remove_columns=split.column_names,
        features=FEATURES,
        num_proc=cfg.num_proc,
        desc=f"Tokenizing {name}",
    )
    statuses = list(encoded[STATUS])
    counts = Counter(statuses)
    truncated = sum(1 for s, t in zip(statuses, encoded[TRUNCATED], strict=True) if t and s == OK)
    if counts[OK] < len(encoded):
        encoded = encoded.filter(
            _is_kept, input_columns=STATUS, num_proc=cfg.num_proc, desc=f"Filtering {name}"
        )
    stats = {
        "examples": len(encoded),
        "truncated": truncated,
        "dropped_empty": counts[EMPTY],
        "dropped_no_labels": counts[NO_LABELS],
    }
    return encoded.remove_columns([STATUS, TRUNCATED]), stats


def render_example(tokenizer: Any, example: dict[str, Any], task_type: str) -> str:
    """One tokenized example as text for the start-up log, showing what the loss sees.

    Causal: runs of masked label positions are wrapped as ``[masked: ...]``, the trained part
    follows as is. Seq2seq: the encoder source, then the target.
    """

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    if task_type == "seq2seq":
        return f"[source: {decode(example['input_ids'])}]\n{decode(example['labels'])}"
    pieces, run, run_masked = [], [], None
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        masked = label == IGNORE_INDEX
        if run and masked != run_masked:
            pieces.append(f"[masked: {decode(run)}]" if run_masked else decode(run))
            run = []
        run.append(token)
        run_masked = masked
    if run:
        pieces.append(f"[masked: {decode(run)}]" if run_masked else decode(run))
    return "".join(pieces)
