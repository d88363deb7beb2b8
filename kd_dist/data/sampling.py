"""--group_by_length: an epoch order whose batches hold examples of similar lengths.

The order is Hugging Face Trainer's ``LengthGroupedSampler``: a seeded permutation cut into
megabatches of 50 batches, each sorted longest first, with the longest example of all moved to
the front (a batch that runs out of memory does so at the first step, not hours in). Batches
cut from a sorted megabatch need little padding, while the megabatches keep the epoch shuffled.
"""

from __future__ import annotations

from collections.abc import Iterator

import datasets
import pyarrow.compute
import torch
from torch.utils.data import Sampler

MEGABATCH_BATCHES = 50


def example_lengths(dataset: datasets.Dataset) -> list[int]:
    """Each example's token count, read from the Arrow column a slice at a time (no rows
    decoded, and never the whole column in memory at once)."""
    rows = dataset.select_columns("input_ids").with_format("arrow")
    return [
        length
        for start in range(0, len(dataset), LENGTH_ROWS)
        for length in pyarrow.compute.list_value_length(
            rows[start : start + LENGTH_ROWS].column("input_ids")
        ).to_pylist()
    ]


LENGTH_ROWS = 100_000


def length_grouped_order(
    lengths: list[int], batch_size: int, generator: torch.Generator
) -> list[int]:
    """A permutation of ``range(len(lengths))`` in megabatches sorted by length (longest first),
    the longest example first of all. Small datasets get smaller megabatches (at least four of
    them where possible), as in Hugging Face's ``get_length_grouped_indices``."""
    batches_per_megabatch = max(1, min(MEGABATCH_BATCHES, len(lengths) // (4 * batch_size)))
    size = batches_per_megabatch * batch_size
    order = torch.randperm(len(lengths), generator=generator).tolist()
    megabatches = [
        sorted(order[start : start + size], key=lambda i: lengths[i], reverse=True)
        for start in range(0, len(order), size)
    ]
    if not megabatches:
        return []
    longest = max(range(len(megabatches)), key=lambda m: lengths[megabatches[m][0]])
    megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
    return [index for megabatch in megabatches for index in megabatch]


class LengthGroupedSampler(Sampler[int]):
    """``length_grouped_order`` as a sampler; its order is a function of (seed, epoch).

    accelerate shards the batches this order makes over the processes (each takes every
    n-th batch), and forwards ``set_epoch`` to it, also through ``skip_first_batches``, so a
    resumed epoch sees the same order and skips what was already trained on.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int) -> None:
        self.lengths, self.batch_size, self.seed = lengths, batch_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(length_grouped_order(self.lengths, self.batch_size, generator))
