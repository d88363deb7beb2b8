"""Training data: load a dataset, detect its format, tokenize it with label masks, and batch it.

``build_datasets`` is the one entry point the trainer needs; ``make_collator`` batches its output.
The steps live in small modules: ``sources`` (load, pick splits), ``formats`` (detect the layout,
render a row as prompt/response), ``tokenization`` (ids, label masks, filtering) and ``collate``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import datasets

from kd_dist.config import ConfigError, TrainConfig
from kd_dist.data.collate import make_collator
from kd_dist.data.formats import FormatSpec, check_task_compatible, resolve_format
from kd_dist.data.sources import load_source, select_splits
from kd_dist.data.tokenization import IGNORE_INDEX, render_example, tokenize_split

__all__ = ["IGNORE_INDEX", "DataSplits", "build_datasets", "make_collator"]


@dataclass
class DataSplits:
    train: datasets.Dataset  # tokenized: input_ids, attention_mask, labels
    eval: datasets.Dataset | None  # tokenized, or None when there is no (non-empty) eval split
    format: str  # "text" | "instruction" | "seq2seq"
    # train_examples, eval_examples, truncated, dropped_empty, dropped_no_labels, and the same
    # three counts for the eval split prefixed with "eval_"
    stats: dict[str, int]
    example: str  # one training example as text, prompt marked [masked: ...], for the log


def build_datasets(
    cfg: TrainConfig,
    tokenizer: Any,
    main_process_first: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
) -> DataSplits:
    """Load ``cfg.dataset``, pick the train/eval splits, and tokenize both for ``cfg.task_type``.

    ``main_process_first`` (e.g. ``accelerator.main_process_first``) lets the main process load
    and tokenize first, so the other processes read its ``datasets`` cache instead of redoing it.
    """
    with main_process_first():
        raw_train, raw_eval = select_splits(load_source(cfg), cfg)
        spec = resolve_format(raw_train.column_names, cfg)
        check_task_compatible(spec, cfg.task_type)
        train, train_stats = tokenize_split(raw_train, spec, tokenizer, cfg, "train")
        eval_, eval_stats = None, {}
        if raw_eval is not None:
            _check_eval_columns(raw_eval, spec)
            eval_, eval_stats = tokenize_split(raw_eval, spec, tokenizer, cfg, "eval")

    if len(train) == 0:
        raise ConfigError(_empty_train_message(len(raw_train), train_stats, spec, cfg))
    stats = {
        "train_examples": train_stats.pop("examples"),
        "eval_examples": eval_stats.pop("examples", 0),
        **train_stats,
        **{f"eval_{key}": value for key, value in eval_stats.items()},
    }
    return DataSplits(
        train=train,
        # An eval split that lost every example would only break the evaluation loop.
        eval=eval_ if eval_ is not None and len(eval_) > 0 else None,
        format=spec.kind,
        stats=stats,
        example=render_example(tokenizer, train[0], cfg.task_type),
    )


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
        f"{stats['dropped_empty']} had an empty {'/'.join(spec.required)} and "
        f"{stats['dropped_no_labels']} had no token left to train on (the prompt fills "
        f"--max_length {cfg.max_length}; raise it or shorten the prompts)."
    )
