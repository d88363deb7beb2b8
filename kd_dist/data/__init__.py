"""Training data: load a dataset, detect its format, tokenize it with label masks, and batch it.

``build_datasets`` is the one entry point the trainer needs; ``make_collator`` batches its output.
The steps live in small modules: ``sources`` (load, pick splits), ``formats`` (detect the layout,
render a row as prompt/response), ``chat`` (conversations through a chat template),
``tokenization`` (ids, label masks, filtering, packing), ``collate`` and ``sampling``
(--group_by_length).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any

import datasets
import pyarrow.compute

from kd_dist.config import ConfigError, TrainConfig
from kd_dist.data.chat import end_of_turn_id
from kd_dist.data.collate import make_collator
from kd_dist.data.formats import (
    CHAT,
    FormatSpec,
    as_conversational,
    check_compatible,
    resolve_format,
)
from kd_dist.data.parallel import resolve_num_proc, usable_cpus
from kd_dist.data.sampling import LengthGroupedSampler, example_lengths
from kd_dist.data.sources import load_source, select_splits
from kd_dist.data.tokenization import (
    IGNORE_INDEX,
    ensure_chat_template,
    render_example,
    tokenize_split,
)

logger = logging.getLogger("kd_dist")

__all__ = [
    "IGNORE_INDEX",
    "DataSplits",
    "LengthGroupedSampler",
    "build_datasets",
    "content_fingerprint",
    "example_lengths",
    "make_collator",
]


@dataclass
class DataSplits:
    train: datasets.Dataset  # tokenized: input_ids, attention_mask, labels (+ position_ids packed)
    eval: datasets.Dataset | None  # tokenized, or None when there is no (non-empty) eval split
    format: str  # "text" | "instruction" | "chat" | "seq2seq"
    layout: str  # the FORMATS row (e.g. "dolly", "sharegpt") or "custom_<kind>"
    # train_rows, train_examples, eval_rows, eval_examples, truncated, dropped_empty,
    # dropped_no_labels (packed_documents with --packing), and the same counts for the eval split
    # prefixed with "eval_"; rows are the raw rows loaded, examples the tokenized ones
    stats: dict[str, int]
    example: str  # one training example as text, prompt marked [masked: ...], for the log
    # chat data: "tokenizer" (its own chat template, or the teacher's) or "plain" (the plain
    # template, given to the tokenizer, which is exported with it); None for other formats
    chat_template: str | None = None
    # causal chat data: the token the template ends each trained answer with (generation must
    # stop there); None for other data, or when the template writes no special token there
    end_of_turn_id: int | None = None

    def summary(self) -> str:
        """What was loaded and what was dropped or cut, for the start-up log."""
        stats = self.stats
        template = f", {self.chat_template} chat template" if self.chat_template else ""
        parts = [f"format {self.format} ({self.layout}{template})"]
        for prefix, name in (("", "train"), ("eval_", "eval")):
            if name == "eval" and self.eval is None:
                parts.append("no eval split")
                continue
            line = f"{name} {stats[name + '_examples']} examples"
            if prefix + "packed_documents" in stats:
                line += f" (packed from {stats[prefix + 'packed_documents']} documents)"
            line += (
                f"; {stats[prefix + 'truncated']} truncated at --max_length, "
                f"{stats[prefix + 'dropped_empty']} empty dropped, "
                f"{stats[prefix + 'dropped_no_labels']} with nothing to train on dropped"
            )
            parts.append(line)
        return "Data: " + "\n  ".join(parts)


def build_datasets(
    cfg: TrainConfig,
    tokenizer: Any,
    main_process_first: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
) -> DataSplits:
    """Load ``cfg.dataset``, pick the train/eval splits, and tokenize both for ``cfg.task_type``.

    ``main_process_first`` (e.g. ``accelerator.main_process_first``, or ``parallel.tokenize_first``
    on several nodes) lets the main process load and tokenize first, so the other processes read
    its ``datasets`` cache instead of redoing it.
    """
    if cfg.max_length is None:  # unresolved, it would silently mean "not truncated"
        raise ValueError("build_datasets needs --max_length: call models.resolve_lengths first.")
    with main_process_first():
        raw_train, raw_eval = select_splits(load_source(cfg), cfg)
        spec = as_conversational(resolve_format(raw_train.column_names, cfg), raw_train.features)
        check_compatible(spec, cfg)
        chat_template = (
            ensure_chat_template(tokenizer, cfg.task_type) if spec.kind == CHAT else None
        )
        end_of_turn = None
        if spec.kind == CHAT and cfg.task_type == "causal":  # seq2seq targets end with eos
            end_of_turn = end_of_turn_id(tokenizer)
            if end_of_turn is None:
                logger.warning(
                    "The chat template writes no special token after an answer (or refuses a "
                    "one-turn user/assistant conversation), so the exported student's "
                    "generation_config can stop only at its eos token (%s): pass a stop string "
                    "when generating with it.",
                    tokenizer.eos_token,
                )
        cpus = usable_cpus()
        train, train_stats = tokenize_split(
            raw_train, spec, tokenizer, _with_workers(cfg, len(raw_train), cpus, "train"), "train"
        )
        eval_, eval_stats = None, {}
        if raw_eval is not None:
            _check_eval_columns(raw_eval, spec)
            eval_cfg = _with_workers(cfg, len(raw_eval), cpus, "eval")
            eval_, eval_stats = tokenize_split(raw_eval, spec, tokenizer, eval_cfg, "eval")

    if len(train) == 0:
        raise ConfigError(_empty_train_message(len(raw_train), train_stats, spec, cfg))
    stats = {
        "train_rows": len(raw_train),
        "train_examples": train_stats.pop("examples"),
        "eval_rows": len(raw_eval) if raw_eval is not None else 0,
        "eval_examples": eval_stats.pop("examples", 0),
        **train_stats,
        **{f"eval_{key}": value for key, value in eval_stats.items()},
    }
    return DataSplits(
        train=train,
        # An eval split that lost every example would only break the evaluation loop.
        eval=eval_ if eval_ is not None and len(eval_) > 0 else None,
        format=spec.kind,
        layout=spec.name,
        stats=stats,
        example=render_example(tokenizer, train[0], cfg.task_type),
        chat_template=chat_template,
        end_of_turn_id=end_of_turn,
    )


def _with_workers(cfg: TrainConfig, rows: int, cpus: int, name: str) -> TrainConfig:
    """``cfg`` with the resolved --num_proc for a split of ``rows`` rows, said in the log."""
    workers, why = resolve_num_proc(cfg.num_proc, rows, cpus)
    logger.info("The %s split: %d rows, %d tokenizing process(es) (%s).", name, rows, workers, why)
    # datasets runs even num_proc=1 in a pool of one worker process; None keeps it in this one.
    return replace(cfg, num_proc=workers if workers > 1 else None)


def content_fingerprint(dataset: datasets.Dataset) -> str:
    """A hash of the tokenized examples in their order (input ids and labels).

    It identifies the data a resumed run would see. Unlike the ``datasets`` fingerprint it does
    not change when a data file is copied elsewhere (node-local disk on each requeue) or touched,
    and it does change with the content, the tokenizer or the masking. Arrow buffers are hashed
    directly: O(tokens), a few seconds per GB.
    """
    digest = hashlib.blake2b(digest_size=16)
    rows = dataset.with_format("arrow")
    for start in range(0, len(dataset), FINGERPRINT_ROWS):
        table = rows[start : start + FINGERPRINT_ROWS]  # the dataset's order, indices applied
        for column in ("input_ids", "labels"):
            lists = table.column(column).combine_chunks()
            for part in (pyarrow.compute.list_value_length(lists), lists.flatten()):
                digest.update(part.to_numpy(zero_copy_only=False).tobytes())
    return digest.hexdigest()


FINGERPRINT_ROWS = 10_000


def _check_eval_columns(raw_eval: datasets.Dataset, spec: FormatSpec) -> None:
    missing = [c for c in spec.required if c not in raw_eval.column_names]
    if missing:
        raise ConfigError(
            f"The eval split lacks the column(s) {', '.join(missing)} used for training "
            f"(its columns: {', '.join(raw_eval.column_names)})."
        )


def _empty_train_message(
    loaded: int, stats: dict[str, int], spec: FormatSpec, cfg: TrainConfig
) -> str:
    if loaded == 0:
        return f"The training split {cfg.dataset_split!r} of {cfg.dataset} has no examples."
    return (
        f"No training examples left: of the {loaded} examples loaded from {cfg.dataset}, "
        f"{stats['dropped_empty']} were empty (blank {'/'.join(spec.required)}"
        f"{', or no assistant answer' if spec.kind == CHAT else ''}) and "
        f"{stats['dropped_no_labels']} had no token left to train on (the prompt fills "
        f"--max_length {cfg.max_length}; raise it or shorten the prompts)."
    )
