"""Batch tokenized examples: right-pad each field to the longest in the batch.

One collator serves both task types: each field is padded to its own longest length, so seq2seq
sources (``input_ids``/``attention_mask``) and targets (``labels``) get their own lengths, and in
causal batches all three already share one length. Packed causal batches also carry
``position_ids`` (restarting at 0 with every document), padded with 0: each padding token is then
a document of its own, which no real token attends to (padding comes last, attention is causal).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from kd_dist.data.tokenization import IGNORE_INDEX

Collator = Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]


def pad(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Right-pad ``rows`` with ``value`` into one int64 tensor."""
    width = max((len(row) for row in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def make_collator(tokenizer: Any) -> Collator:
    """A collate_fn padding ``input_ids`` with the pad token, ``attention_mask`` and
    ``position_ids`` (packed data) with 0 and ``labels`` with IGNORE_INDEX (so padding is never
    trained on). Causal and seq2seq batches pad alike: each field to its own longest row."""
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; set one before building the collator")
    pad_values = {
        "input_ids": tokenizer.pad_token_id,
        "attention_mask": 0,
        "labels": IGNORE_INDEX,
        "position_ids": 0,
    }

    def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        unknown = set(examples[0]) - set(pad_values)
        if unknown:
            raise KeyError(f"don't know how to pad {sorted(unknown)}; expected {list(pad_values)}")
        return {
            key: pad([example[key] for example in examples], value)
            for key, value in pad_values.items()
            if key in examples[0]
        }

    return collate
